//! Samples from a model `train --export DIR` wrote, loaded into candle-transformers' own
//! Llama (with its key/value cache) from the exported `config.json` and
//! `model.safetensors`: the export is a Hugging Face checkpoint any Llama reader takes.
//!
//! The main job's model learns a synthetic language (each token's successor is fixed by
//! `--seed`, with 10% noise), so what it says is token ids; this program prints them and
//! how many of the sampled transitions follow the rule the model was trained on (about 90%
//! for a model that learned it, 1/128 for one that did not).
//!
//! A model trained on text (`train --data`) is prompted with `--text` and answers in text,
//! through the same tokenizer (`--tokenizer`, bytes by default).
//!
//! ```text
//! cargo run --release --example train -- --steps 60 --export model
//! cargo run --release --example generate -- --model model --max-new-tokens 24
//! cargo run --release --example train -- --data docs/guide.md --seq-len 64 --steps 300 --export text-model
//! cargo run --release --example generate -- --model text-model --text "FSDP " --max-new-tokens 56
//! ```

mod common;

use anyhow::{ensure, Context};
use candle_core::{DType, Device, Tensor};
use candle_fsdp::data::TextTokenizer;
use candle_nn::VarBuilder;
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::llama as reference;
use clap::Parser;
use common::BigramTask;
use std::path::PathBuf;

/// Samples token ids from an exported Llama with a key/value cache.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The folder `train --export` wrote (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The prompt: comma-separated token ids.
    #[arg(long, default_value = "0")]
    prompt: String,
    /// A text prompt instead, for a model trained on text: encoded with `--tokenizer`, and
    /// the answer decoded with it.
    #[arg(long)]
    text: Option<String>,
    /// The `tokenizer.json` the model was trained with (`--text`); default: bytes.
    #[arg(long, requires = "text")]
    tokenizer: Option<PathBuf>,
    /// Tokens to sample (the prompt and these must fit the model's context).
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 takes the most likely token.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens holding this probability.
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    sampling_seed: u64,
    /// The `--seed` the model was trained with: its successor rule is checked.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu`, or `cuda` (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        #[cfg(feature = "cuda")]
        _ => Device::new_cuda(0)?,
        #[cfg(not(feature = "cuda"))]
        other => anyhow::bail!("--device {other}: this binary was built without the `cuda` feature"),
    };
    let config_path = args.model.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let config: reference::LlamaConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is not a Llama config", config_path.display()))?;
    let config = config.into_config(false);
    let weights = [args.model.join("model.safetensors")];
    // SAFETY: the file is not modified while it is mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &device) }
        .with_context(|| format!("reading {}", weights[0].display()))?;
    let model = reference::Llama::load(vb, &config).context("loading the Llama")?;
    let mut cache = reference::Cache::new(true, DType::F32, &config, &device)?;

    let tokenizer = match (&args.text, &args.tokenizer) {
        (Some(_), Some(file)) => Some(TextTokenizer::from_file(file)?),
        (Some(_), None) => Some(TextTokenizer::Bytes),
        (None, _) => None,
    };
    let prompt: Vec<u32> = match (&args.text, &tokenizer) {
        (Some(text), Some(tokenizer)) => tokenizer.encode(text)?,
        _ => args
            .prompt
            .split(',')
            .map(|t| t.trim().parse::<u32>().with_context(|| format!("`{t}` is not a token id")))
            .collect::<anyhow::Result<_>>()?,
    };
    ensure!(!prompt.is_empty(), "the prompt is empty");
    ensure!(
        prompt.iter().all(|&t| (t as usize) < config.vocab_size),
        "a prompt token is not below the vocabulary size {}",
        config.vocab_size
    );
    ensure!(
        prompt.len() + args.max_new_tokens <= config.max_position_embeddings,
        "the model's context is {} positions: a prompt of {} and {} new tokens do not fit",
        config.max_position_embeddings,
        prompt.len(),
        args.max_new_tokens
    );
    let temperature = (args.temperature > 0.0).then_some(args.temperature);
    let mut sampler = LogitsProcessor::new(args.sampling_seed, temperature, args.top_p);

    // The prompt in one pass, then one token at a time against the cache.
    let mut tokens = prompt.clone();
    let mut input = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
    let mut position = 0;
    for _ in 0..args.max_new_tokens {
        let logits = model.forward(&input, position, &mut cache)?.squeeze(0)?;
        position += input.dim(1)?;
        let next = sampler.sample(&logits)?;
        tokens.push(next);
        input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
    }
    let generated = &tokens[prompt.len() - 1..];
    if let Some(tokenizer) = &tokenizer {
        println!("{}", tokenizer.decode(&tokens)?);
        return Ok(());
    }
    println!("{}", tokens.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" "));

    let task = BigramTask::new(config.vocab_size, 0.1, args.seed);
    let follows = generated.windows(2).filter(|w| task.successor_of(w[0]) == w[1]).count();
    let transitions = generated.len() - 1;
    println!(
        "{follows} of {transitions} sampled transitions follow the successor rule of --seed {} ({:.0}%; chance: {:.1}%)",
        args.seed,
        100.0 * follows as f64 / transitions as f64,
        100.0 / config.vocab_size as f64
    );
    Ok(())
}
