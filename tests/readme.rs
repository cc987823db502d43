//! The Rust blocks of the README and of `docs/` are code that compiles: every line of each
//! block (trimmed, blank lines left out) appears, in order, in `examples/quickstart.rs` (a
//! whole program the build compiles) or, for the block about candle-transformers,
//! `tests/hf_llama.rs`.

fn code_lines(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// The Rust blocks of a Markdown text.
fn rust_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, fence) if fence.starts_with("```rust") => current = Some(String::new()),
            (Some(_), fence) if fence.starts_with("```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Whether every line of `block`, in order, is one of `source`'s lines.
fn contains_in_order(source: &[&str], block: &str) -> Result<(), String> {
    let mut rest = source.iter();
    for line in code_lines(block) {
        if !rest.any(|s| *s == line) {
            return Err(line.to_string());
        }
    }
    Ok(())
}

/// The README and every Markdown file of `docs/`, by path.
fn documentation(root: &str) -> Vec<(String, String)> {
    let mut paths = vec![format!("{root}/README.md")];
    let mut docs: Vec<String> = std::fs::read_dir(format!("{root}/docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .map(|path| path.display().to_string())
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            (path, text)
        })
        .collect()
}

#[test]
fn every_documented_rust_line_is_in_compiled_code_in_order() {
    let root = env!("CARGO_MANIFEST_DIR");
    let read = |path: &str| std::fs::read_to_string(format!("{root}/{path}")).unwrap();
    let sources =
        [("examples/quickstart.rs", read("examples/quickstart.rs")), ("tests/hf_llama.rs", read("tests/hf_llama.rs"))];
    let mut checked = 0;
    for (doc, markdown) in documentation(root) {
        for (n, block) in rust_blocks(&markdown).iter().enumerate() {
            let misses: Vec<String> = sources
                .iter()
                .filter_map(|(path, text)| {
                    contains_in_order(&code_lines(text), block).err().map(|l| format!("{path}: `{l}`"))
                })
                .collect();
            assert!(misses.len() < sources.len(), "{doc}: Rust block {} is in no compiled file: {misses:?}", n + 1);
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} Rust blocks in the README and docs/");
}

#[test]
fn a_line_that_is_not_in_the_example_is_found() {
    let blocks = rust_blocks("text\n```rust\nlet a = 1;\n\nlet b = 2;\n```\nmore\n```sh\nls\n```\n");
    assert_eq!(blocks, ["let a = 1;\n\nlet b = 2;\n"]);
    assert_eq!(code_lines(&blocks[0]), ["let a = 1;", "let b = 2;"]);
    assert!(contains_in_order(&["let a = 1;", "x();", "let b = 2;"], &blocks[0]).is_ok());
    assert_eq!(contains_in_order(&["let b = 2;", "let a = 1;"], &blocks[0]), Err("let b = 2;".to_string()));
}
