//! The data path: text files to tokens ([`TextCorpus`], [`TextTokenizer`]) and tokens to
//! the ranks' batches ([`WindowSampler`]). The text is written by the tests themselves.

use candle_core::Device;
use candle_fsdp::data::{DataError, TextCorpus, TextTokenizer, WindowSampler};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The windows (as their first token, which names them in a stream of distinct tokens)
/// that ranks `0..world` read with `batch` windows each at `position`, in rank order.
fn step_windows(sampler: &WindowSampler, position: u64, world: usize, batch: usize) -> Vec<u32> {
    (0..world)
        .flat_map(|rank| {
            let (inputs, targets) = sampler.rank_batch(position, rank, batch, &Device::Cpu).unwrap();
            let (inputs, targets) = (inputs.to_vec2::<u32>().unwrap(), targets.to_vec2::<u32>().unwrap());
            for (i, t) in inputs.iter().zip(&targets) {
                assert_eq!(&i[1..], &t[..t.len() - 1], "targets are the inputs shifted by one");
            }
            inputs.into_iter().map(|row| row[0])
        })
        .collect()
}

#[test]
fn ranks_read_disjoint_windows_and_a_step_reads_the_same_at_every_world_size() {
    let tokens: Vec<u32> = (0..4001).collect();
    let sampler = WindowSampler::new(tokens, 8, Some(3)).unwrap();
    assert_eq!(sampler.windows(), 500);
    // Global batch 8: 1 x 8, 2 x 4, 4 x 2, 8 x 1 read the same windows in the same order.
    for step in 0..70u64 {
        let position = step * 8;
        let one = step_windows(&sampler, position, 1, 8);
        for (world, batch) in [(2, 4), (4, 2), (8, 1)] {
            assert_eq!(step_windows(&sampler, position, world, batch), one, "step {step}, world {world}");
        }
        let distinct: BTreeSet<u32> = one.iter().copied().collect();
        assert_eq!(distinct.len(), 8, "step {step}: a window read twice");
    }
    // An epoch reads every window once; the next epoch in another order.
    let epoch: Vec<u32> = (0..500).map(|g| sampler.window(g)[0]).collect();
    let next: Vec<u32> = (500..1000).map(|g| sampler.window(g)[0]).collect();
    let every: BTreeSet<u32> = (0..500).map(|w| w * 8).collect();
    assert_eq!(epoch.iter().copied().collect::<BTreeSet<_>>(), every);
    assert_eq!(next.iter().copied().collect::<BTreeSet<_>>(), every);
    assert_ne!(epoch, next);
    assert_ne!(epoch, (0..500).map(|w| w * 8).collect::<Vec<_>>(), "shuffled");
}

#[test]
fn a_run_resumed_at_its_position_on_another_world_size_reads_what_the_uninterrupted_run_reads() {
    let tokens: Vec<u32> = (0..2001).collect();
    let sampler = WindowSampler::new(tokens, 10, Some(9)).unwrap();
    // Uninterrupted: 2 ranks x 3 windows for 40 steps (crossing epochs of 200 windows).
    let mut position = 0;
    let mut uninterrupted = Vec::new();
    for _ in 0..40 {
        uninterrupted.push(step_windows(&sampler, position, 2, 3));
        position += 6;
    }
    // Stopped after 25 steps; the position saved; resumed on 3 ranks x 2 windows (a fresh
    // sampler, as a new process makes).
    let saved = 25 * 6;
    let resumed_sampler = WindowSampler::new((0..2001).collect::<Vec<u32>>(), 10, Some(9)).unwrap();
    let mut position = saved;
    for (step, expected) in uninterrupted.iter().enumerate().skip(25) {
        assert_eq!(&step_windows(&resumed_sampler, position, 3, 2), expected, "step {step}");
        position += 6;
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn a_folder_is_read_in_name_order_and_its_tail_held_out() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.txt", "second file. ".repeat(20).as_bytes());
    write(dir.path(), "a.txt", "first file, ünïcode. ".repeat(20).as_bytes());
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(&dir.path().join("sub"), "c.txt", b"not read");
    let corpus = TextCorpus::load(dir.path(), &TextTokenizer::Bytes, 0.1).unwrap();
    let expected: Vec<u32> =
        ["first file, ünïcode. ".repeat(20), "second file. ".repeat(20)].concat().bytes().map(u32::from).collect();
    let held_out = (expected.len() as f64 * 0.1).round() as usize;
    assert_eq!(corpus.files.len(), 2, "files of the folder only, not of subfolders");
    assert_eq!(corpus.train, expected[..expected.len() - held_out]);
    assert_eq!(corpus.eval, expected[expected.len() - held_out..]);
    let first = "first file, ünïcode.";
    assert_eq!(TextTokenizer::Bytes.decode(&corpus.train[..first.len()]).unwrap(), first);
    let again = TextCorpus::load(dir.path(), &TextTokenizer::Bytes, 0.1).unwrap();
    assert_eq!(corpus.fingerprint(), again.fingerprint());
    write(dir.path(), "b.txt", "second file! ".repeat(20).as_bytes());
    let edited = TextCorpus::load(dir.path(), &TextTokenizer::Bytes, 0.1).unwrap();
    assert_ne!(corpus.fingerprint(), edited.fingerprint(), "other text, another fingerprint");
}

#[test]
fn text_that_cannot_be_used_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "good.txt", b"fine text");
    write(dir.path(), "latin1.txt", b"caf\xe9 au lait");
    let error = TextCorpus::load(dir.path(), &TextTokenizer::Bytes, 0.0).err().expect("refused");
    assert!(matches!(&error, DataError::NotUtf8 { offset: 3, .. }), "{error}");
    assert!(error.to_string().contains("latin1.txt"), "{error}");

    let missing = dir.path().join("nowhere.txt");
    let error = TextCorpus::load(&missing, &TextTokenizer::Bytes, 0.0).err().expect("refused");
    assert!(error.to_string().contains("nowhere.txt"), "{error}");

    let empty = tempfile::tempdir().unwrap();
    let error = TextCorpus::load(empty.path(), &TextTokenizer::Bytes, 0.0).err().expect("refused");
    assert!(error.to_string().contains("0 file(s)"), "{error}");
    assert!(TextCorpus::load(dir.path(), &TextTokenizer::Bytes, 0.9).is_err(), "a held-out share above a half");
}

#[test]
fn a_hugging_face_tokenizer_file_sets_the_vocabulary_and_the_ids() {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let words = ["[UNK]", "the", "cat", "sat", "on", "mat", "."];
    let vocab: HashMap<String, u32> = words.iter().enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect();
    let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("[UNK]".into()).build().unwrap();
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenizer.json");
    tokenizer.save(&file, false).unwrap();

    let loaded = TextTokenizer::from_file(&file).unwrap();
    assert_eq!(loaded.vocab_size(), words.len());
    // Independent of our code: the ids by hand from the vocabulary above.
    assert_eq!(loaded.encode("the cat sat on the mat.").unwrap(), [1, 2, 3, 4, 1, 5, 6]);
    assert_eq!(loaded.encode("the dog").unwrap(), [1, 0], "an unknown word is [UNK]");
    write(dir.path(), "text.txt", "the cat sat on the mat . ".repeat(10).as_bytes());
    let corpus = TextCorpus::load(&dir.path().join("text.txt"), &loaded, 0.0).unwrap();
    assert_eq!(corpus.train.len(), 70);
    assert_eq!(&corpus.train[..7], [1, 2, 3, 4, 1, 5, 6]);

    write(dir.path(), "broken.json", b"{ not a tokenizer");
    let error = TextTokenizer::from_file(&dir.path().join("broken.json")).err().expect("refused");
    assert!(error.to_string().contains("broken.json"), "{error}");
}
