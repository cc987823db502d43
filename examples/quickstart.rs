//! The documentation's code, whole and compiled: a small model declared for FSDP, trained on 2 CPU
//! ranks (threads), checkpointed, resumed and exported; run as one process per rank when
//! started by `fsdp-run`, `srun` or `mpirun`. `tests/readme.rs` checks that every
//! Rust block of the README and of docs/ appears in this file, line for line.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_fsdp::checkpoint::{self, Checkpointer, ExportOptions, LoadOptions, Progress};
use candle_fsdp::dist::DistEnv;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{
    launch, Backend, Fsdp, FsdpConfig, LaunchOptions, MetaModel, ProcessGroup, RankContext, Shardable, Unit,
};
use candle_nn::{Embedding, Linear, Optimizer, VarBuilder, VarMap};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

const VOCAB: usize = 64;
const HIDDEN: usize = 32;

/// One residual MLP block: each is an FSDP unit.
#[derive(Shardable)]
struct Block {
    up: Linear,
    down: Linear,
}

impl Block {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            up: candle_nn::linear(HIDDEN, 4 * HIDDEN, vb.pp("up"))?,
            down: candle_nn::linear(4 * HIDDEN, HIDDEN, vb.pp("down"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x + self.down.forward(&self.up.forward(x)?.gelu()?)?
    }
}

#[derive(Shardable)]
struct Model {
    #[fsdp(rename = "model.embed_tokens")]
    embed: Embedding,
    #[fsdp(rename = "model.layers")]
    layers: Vec<Unit<Block>>, // each element is one FSDP unit
    lm_head: Linear, // parameters in no Unit form the root unit
    #[fsdp(skip)]
    scale: f64, // not a parameter
}

impl Model {
    fn new(vb: VarBuilder) -> Result<Self> {
        let layers = (0..2).map(|i| Block::new(vb.pp("model.layers").pp(i)).map(Unit::new)).collect::<Result<_>>()?;
        Ok(Self {
            embed: candle_nn::embedding(VOCAB, HIDDEN, vb.pp("model.embed_tokens"))?,
            layers,
            lm_head: candle_nn::linear(HIDDEN, VOCAB, vb.pp("lm_head"))?,
            scale: 1.0,
        })
    }

    /// Token ids `(batch, seq)` to logits `(batch, seq, VOCAB)`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut x = (self.embed.forward(ids)? * self.scale)?;
        for layer in &self.layers {
            x = layer.run(x, |block, x| block.forward(&x))?; // gathered, run, freed
        }
        self.lm_head.forward(&x)
    }
}

/// Each token's successor is the next id: a rule the model learns in a few steps.
fn batch(step: usize, rank: usize) -> Result<(Tensor, Tensor)> {
    let ids: Vec<u32> = (0..4)
        .flat_map(|row| {
            let first = step * 13 + rank * 29 + row * 7;
            (0..9).map(move |t| ((first + t) % VOCAB) as u32)
        })
        .collect();
    let ids = Tensor::from_vec(ids, (4, 9), &Device::Cpu)?;
    Ok((ids.narrow(1, 0, 8)?, ids.narrow(1, 1, 8)?))
}

fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)
}

/// Every rank builds the same model from one snapshot of initial values.
fn initial_values() -> Result<VarMap> {
    let var_map = VarMap::new();
    Model::new(VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu))?;
    Ok(var_map)
}

fn train(ctx: RankContext, var_map: &VarMap, dir: &Path) -> candle_fsdp::Result<f32> {
    let vb = VarBuilder::from_varmap(var_map, DType::F32, &Device::Cpu);
    let model = Model::new(vb)?; // every rank builds its copy
    let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
    let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-2, ..ParamsAdamW::default() })?; // shard Vars
    let mut last = f32::NAN;
    for step in 1..=20 {
        let (ids, targets) = batch(step, ctx.rank)?;
        let logits = fsdp.forward(|m| m.forward(&ids))?;
        let loss = loss(&logits, &targets)?;
        let mut grads = fsdp.backward(&loss)?; // shard gradients, averaged over ranks
        fsdp.clip_grad_norm(&mut grads, 1.0, 2.0)?;
        optimizer.step(&grads)?;
        last = loss.to_scalar::<f32>()?;
    }
    save_resume_export(&fsdp, &mut optimizer, dir)?;
    let unbuilt = wrap_unbuilt(&ctx)?;
    let (ids, _) = batch(0, ctx.rank)?;
    unbuilt.forward_inference(|m| m.forward(&ids))?;
    Ok(last)
}

/// A model too big for one rank: no rank builds it whole.
fn wrap_unbuilt(ctx: &RankContext) -> candle_fsdp::Result<Fsdp<Model>> {
    let meta = MetaModel::build(DType::F32, &Device::Cpu, Model::new)?; // shapes and initialisers only
    Fsdp::wrap_meta(meta, ctx.comm.clone(), FsdpConfig::default(), 42) // each rank draws its shards
}

fn save_resume_export(fsdp: &Fsdp<Model>, optimizer: &mut AdamW, dir: &Path) -> candle_fsdp::Result<()> {
    let step = 20;
    let checkpointer = Checkpointer::new(dir.join("ckpt")).keep_last(2);
    // every rank, between steps: its shards of the parameters and of the optimizer state
    checkpointer.save(fsdp, Some(&*optimizer), &Progress { step, scheduler: None, extras: json!({}) })?;
    // any number of ranks, any strategy: each reads the ranges its new shards cover, every
    // file checked against its checksum; a damaged newest checkpoint is passed over, said
    if let Some(resumed) = checkpointer.load_latest(fsdp, Some(optimizer), &LoadOptions::default())? {
        assert_eq!(resumed.progress.step, step);
    }
    // the full model in the Hugging Face layout, one unit gathered at a time, rank 0 writes
    checkpoint::export_hf(fsdp, &dir.join("model"), &ExportOptions::default())?;
    // start from Hugging Face weights: each rank reads only its shards' ranges
    checkpoint::load_pretrained(fsdp, &dir.join("model/model.safetensors"))?;
    Ok(())
}

/// One process per rank, started by `fsdp-run`, `srun` or `mpirun`.
fn as_one_process(var_map: &VarMap, dir: &Path) -> candle_fsdp::Result<f32> {
    let group = ProcessGroup::from_env(Backend::Tcp, Duration::from_secs(60))?; // or Backend::Nccl
    let ctx = group.context(); // rank, world_size, comm, device
    let last = train(ctx, var_map, dir)?;
    group.finish()?; // a last barrier, so rank 0 keeps the store until all are done
    Ok(last)
}

fn main() -> anyhow::Result<()> {
    let var_map = initial_values()?;
    let losses = if DistEnv::is_set() {
        // The processes of one node share a folder; wrapping takes rank 0's initial values.
        let dir = std::env::temp_dir().join("candle-fsdp-quickstart");
        vec![as_one_process(&var_map, &dir)?]
    } else {
        let dir = tempfile::tempdir()?;
        launch(LaunchOptions::new(2), |ctx| train(ctx, &var_map, dir.path()))?
    };
    println!("last loss per rank: {losses:?} (ln {VOCAB} = {:.3} knows nothing)", (VOCAB as f64).ln());
    anyhow::ensure!(losses.iter().all(|&l| (l as f64) < (VOCAB as f64).ln() - 1.0), "the loss did not fall");
    Ok(())
}
