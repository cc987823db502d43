//! The main job (`examples/train.rs`) as an operator runs it, as a process: a diverged
//! run stops before it can save a non-finite checkpoint, and the good one resumes; a
//! learning rate given on resume is applied and said; a resumed run of two steps ends
//! well; every output path is checked before the first step.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The example binary `cargo test` builds beside the test binaries.
fn train_binary() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let binary = deps.parent().unwrap().join("examples").join("train");
    assert!(binary.is_file(), "{} is built by `cargo test`", binary.display());
    binary
}

/// Runs the main job on 2 thread ranks (small sizes) with `args`.
fn train(args: &[&str]) -> Output {
    Command::new(train_binary())
        .args(["--world-size", "2", "--batch-size", "2", "--seq-len", "16", "--peak-tflops", "1", "--log-every", "1"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn steps_saved(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_diverged_run_stops_before_saving_and_the_last_good_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().to_str().unwrap();
    let first = train(&["--steps", "4", "--save-every", "2", "--keep-last", "1", "--save-dir", save]);
    assert!(first.status.success(), "{}", text(&first));
    assert_eq!(steps_saved(dir.path()), ["step-00000004"]);

    // Resumed at a rate that makes the parameters huge after step 5 and the gradients of
    // step 6 overflow: the run stops, naming step 6, before its update; the last
    // checkpoint (step 5, finite) stays, and is not rotated away by a NaN one.
    let diverged = train(&[
        "--steps",
        "8",
        "--save-every",
        "1",
        "--keep-last",
        "1",
        "--save-dir",
        save,
        "--resume",
        "--lr",
        "1e30",
    ]);
    let out = text(&diverged);
    assert!(!diverged.status.success(), "{out}");
    assert!(out.contains("--lr 0.01 -> 1e+30"), "{out}");
    assert!(out.contains("stopped before its update") && out.contains("step 6:"), "{out}");
    assert!(!out.contains("stack backtrace"), "{out}");
    assert_eq!(steps_saved(dir.path()), ["step-00000005"], "{out}");

    // Skipping instead: every non-finite step is said and skipped, the run ends.
    let skipped = train(&["--steps", "8", "--save-dir", save, "--resume", "--lr", "1e30", "--on-non-finite", "skip"]);
    let out = text(&skipped);
    assert!(skipped.status.success(), "{out}");
    assert!(out.contains("step 6: the loss is") && out.contains("update skipped"), "{out}");
}

#[test]
fn a_learning_rate_given_on_resume_is_applied_and_a_short_resumed_run_ends_well() {
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("ckpt");
    let save = save.to_str().unwrap();
    assert!(train(&["--steps", "3", "--save-dir", save]).status.success());
    let metrics = dir.path().join("metrics.jsonl");
    let resumed = train(&[
        "--steps",
        "5",
        "--save-dir",
        save,
        "--resume",
        "--lr",
        "0.002",
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    let out = text(&resumed);
    assert!(resumed.status.success(), "{out}");
    assert!(out.contains("resumed") && out.contains("at step 3"), "{out}");
    assert!(out.contains("changed since the checkpoint, and applied: --lr 0.01 -> 0.002"), "{out}");
    let rates: Vec<f64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["lr"].as_f64().unwrap())
        .collect();
    assert_eq!(rates, [0.002, 0.002], "steps 4 and 5 train at the rate given");
}

#[test]
fn every_output_path_is_checked_before_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let file = file.to_str().unwrap();
    let missing = dir.path().join("no-such-folder").join("loss.png");
    let cases = [
        (vec!["--save-dir", file], "--save-dir"),
        (vec!["--export", file], "--export"),
        (vec!["--plot", missing.to_str().unwrap()], "--plot"),
        (vec!["--metrics", dir.path().to_str().unwrap()], "--metrics"),
    ];
    for (args, flag) in cases {
        let output = train(&args);
        let out = text(&output);
        assert!(!output.status.success(), "{args:?}: {out}");
        assert!(out.contains(flag) && !out.contains("step    1"), "{args:?}: {out}");
    }
    // Two jobs given one --save-dir: the second is refused while the first holds it.
    let save = dir.path().join("shared");
    let save = save.to_str().unwrap();
    let mut first = Command::new(train_binary())
        .args(["--world-size", "1", "--steps", "400", "--save-dir", save, "--peak-tflops", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = Path::new(save).join(".lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&lock).is_ok_and(|holder| !holder.is_empty()) {
        assert!(std::time::Instant::now() < deadline, "the first job never locked {save}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = train(&["--steps", "2", "--save-dir", save]);
    first.kill().unwrap();
    first.wait().unwrap();
    let out = text(&second);
    assert!(!second.status.success() && out.contains("another job saves into this directory"), "{out}");
}

/// `--from-pretrained` starts from an exported model (its first loss is the trained
/// model's, far below a fresh one's), `--lora` trains adapters alone, and `--export` /
/// `--export-merged` write them in PEFT's files and merged as a plain model.
#[test]
fn lora_from_a_pretrained_export_saves_peft_adapters_and_a_merged_model() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapters, merged) = (dir.path().join("base"), dir.path().join("adapters"), dir.path().join("merged"));
    let first = train(&["--steps", "30", "--export", base.to_str().unwrap()]);
    assert!(first.status.success(), "{}", text(&first));
    let step_losses = |out: &str| -> Vec<f64> {
        let steps = out.lines().filter(|l| l.starts_with("step "));
        steps.map(|l| l.split("loss ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()).collect()
    };
    let last_loss = |out: &str| *step_losses(out).last().unwrap();
    let first_loss = |out: &str| step_losses(out)[0];
    let pretrained_loss = last_loss(&text(&first));

    let run = train(&[
        "--steps",
        "4",
        "--from-pretrained",
        base.to_str().unwrap(),
        "--lora",
        "4",
        "--lora-targets",
        "q_proj,v_proj,down_proj",
        "--export",
        adapters.to_str().unwrap(),
        "--export-merged",
        merged.to_str().unwrap(),
    ]);
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    // A fresh model starts near ln(128) = 4.85; the pretrained one where the first run ended.
    assert!((first_loss(&out) - pretrained_loss).abs() < 0.5, "{out}");
    let weights =
        candle_core::safetensors::load(adapters.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(weights.len(), 4 * 3 * 2, "4 layers, 3 targets, lora_A and lora_B: {:?}", weights.keys());
    assert!(weights.keys().all(|k| k.starts_with("base_model.model.model.layers.") && k.contains(".lora_")));
    let config = candle_fsdp::models::lora::LoraConfig::from_peft_dir(&adapters).unwrap();
    assert_eq!((config.r, config.alpha), (4, 16.0));
    let plain = candle_fsdp::models::llama::LlamaConfig::from_hf_file(&merged.join("config.json")).unwrap();
    assert!(plain.lora.is_none());
    let merged_weights =
        candle_core::safetensors::load(merged.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let base_weights =
        candle_core::safetensors::load(base.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = merged_weights.keys().collect();
    let mut expected: Vec<&String> = base_weights.keys().collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected, "the merged export holds the base's tensors, no adapters");
}
