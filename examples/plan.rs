//! Prints the FSDP sharding plan of a real model: how its parameters split into units, what
//! each rank stores, the peak of gathered parameters, the prefetch order and the bytes each
//! rank sends per step; and the static FQN table that `#[derive(Shardable)]` emitted for the
//! model's type at compile time.
//!
//! ```text
//! cargo run --release --example plan -- --model llama --world-size 4
//! cargo run --release --example plan -- --model transformer --strategy shard-grad-op --optimizer sgd
//! cargo run --release --example plan -- --model llama2-7b --world-size 8 --lora 8
//! cargo run --release --example plan -- --config path/to/config.json --world-size 4
//! ```
//!
//! With `--config`, the model is the one a Hugging Face `config.json` describes (Llama,
//! Qwen2, Qwen3, Mistral, Phi-3, Mixtral, Gemma 2 or 3), built without values.
//!
//! With `--lora RANK`, the Llama gets LoRA adapters on the projections `--lora-targets` names
//! and is planned with everything else frozen; the plan of full fine-tuning follows, and the
//! gradient and optimizer-state bytes per rank of the two side by side.

mod common;

use anyhow::Context;
use candle_core::Device;
use candle_fsdp::model::{Layout, Role, StaticTable};
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::lora::LoraConfig;
use candle_fsdp::models::transformer::{Transformer, TransformerConfig};
use candle_fsdp::{Bytes, MetaModel, Plan, PlanConfig, ShardableModel};
use candle_nn::{VarBuilder, VarMap};
use clap::{Parser, ValueEnum};
use common::{human_count, DTYPE};
use std::time::Instant;

/// Print the FSDP sharding plan of an example model (built on the CPU, f32).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The model to plan: `transformer` is the port of PyTorch's nn.Transformer at the size
    /// of PyTorch's backward-prefetch test (d_model 1024, 8 heads, 6 encoder + 6 decoder
    /// layers, feed-forward 2048: about 126M parameters); `llama` is a Llama decoder with
    /// hidden size 512, 8 layers, 8 heads (4 key/value heads) and a 32000-token vocabulary
    /// (about 56M parameters).
    #[arg(long, value_enum, default_value_t = ModelKind::Transformer)]
    model: ModelKind,

    /// Plan the model of this Hugging Face `config.json` instead of `--model`'s.
    #[arg(long)]
    config: Option<std::path::PathBuf>,

    /// LoRA adapters of this rank on the Llama's projections, everything else frozen.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    lora: Option<u64>,

    /// The projections that get adapters (PEFT's `target_modules`).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    lora_targets: Vec<String>,

    /// The adapters' `lora_alpha`.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,

    #[command(flatten)]
    fsdp: common::FsdpArgs,

    /// The optimizer, for its per-parameter state: AdamW keeps 2 tensors per parameter,
    /// SGD with momentum 1, plain SGD none.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    optimizer: OptimizerKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModelKind {
    Transformer,
    Llama,
    /// Llama 2 7B's shapes, built without values (`MetaModel`): nothing is allocated.
    Llama2_7b,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OptimizerKind {
    Adamw,
    SgdMomentum,
    Sgd,
}

impl OptimizerKind {
    fn states(self) -> usize {
        match self {
            Self::Adamw => 2,
            Self::SgdMomentum => 1,
            Self::Sgd => 0,
        }
    }
}

fn transformer_config() -> TransformerConfig {
    TransformerConfig {
        d_model: 1024,
        nhead: 8,
        num_encoder_layers: 6,
        num_decoder_layers: 6,
        dim_feedforward: 2048,
        layer_norm_eps: 1e-5,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lora = args.lora.map(|r| LoraConfig::new(r as usize, args.lora_alpha, args.lora_targets.clone()));
    if lora.is_some() && args.model == ModelKind::Transformer && args.config.is_none() {
        anyhow::bail!("--lora adapts the Llama's projections: use it with --model llama or llama2-7b");
    }
    let mut fsdp_config = args.fsdp.fsdp_config();
    if lora.is_some() {
        fsdp_config = fsdp_config.freeze(LoraConfig::FROZEN);
    }
    let plan_config = PlanConfig::new(args.fsdp.world_size, fsdp_config).optimizer_states(args.optimizer.states());

    let var_map = VarMap::new();
    let vb = VarBuilder::from_varmap(&var_map, DTYPE, &Device::Cpu);
    let started = Instant::now();
    // The layout borrows nothing from the model, so the model can be dropped right after.
    let (name, description, layout, table) = match args.model {
        ModelKind::Transformer if args.config.is_none() => {
            let config = transformer_config();
            let model = Transformer::new(&config, vb).context("building the transformer")?;
            let description = format!(
                "d_model {}, {} heads, {} encoder + {} decoder layers, feed-forward {}",
                config.d_model,
                config.nhead,
                config.num_encoder_layers,
                config.num_decoder_layers,
                config.dim_feedforward
            );
            ("Transformer", description, Layout::of(&model)?, <Transformer as ShardableModel>::TABLE)
        }
        _ => {
            let preset = preset(&args)?;
            let config = LlamaConfig { lora: lora.clone(), ..preset };
            let layout = if args.model == ModelKind::Llama2_7b || args.config.is_some() {
                MetaModel::build(DTYPE, &Device::Cpu, |vb| Llama::new(&config, vb))?.layout()?
            } else {
                Layout::of(&Llama::new(&config, vb).context("building the Llama model")?)?
            };
            let description = format!(
                "{}: vocab {}, hidden {}, {} layers, {} heads ({} key/value heads), MLP {}",
                config.family.architecture(),
                config.vocab_size,
                config.hidden_size,
                config.num_hidden_layers,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.intermediate_size
            );
            ("Llama", description, layout, <Llama as ShardableModel>::TABLE)
        }
    };
    let built_in = started.elapsed();
    if args.model != ModelKind::Llama2_7b && args.config.is_none() {
        layout.check_var_map(&var_map).context("the model's FQNs disagree with its VarMap")?;
    }

    let plan = Plan::new(&layout, plan_config)?;

    let trained: Vec<_> = layout.params.iter().filter(|p| p.role == Role::Parameter).collect();
    let numel: usize = trained.iter().map(|p| p.tensor.elem_count()).sum();
    let bytes: usize = trained.iter().map(|p| p.tensor.elem_count() * p.tensor.dtype().size_in_bytes()).sum();
    println!("model: {name} ({description})");
    println!(
        "       {} trained parameters ({numel}), {} in {:?}; {} tensors, {} units; built on the CPU in {:.1} s",
        human_count(numel),
        Bytes(bytes),
        DTYPE,
        layout.params.len(),
        layout.units.len(),
        built_in.as_secs_f64()
    );

    print_static_table(name, &table, &layout);

    println!("\n== sharding plan ==");
    print!("{plan}");
    if let Some(lora) = &lora {
        compare_with_full_fine_tuning(&args, lora, &layout, &plan)?;
    }
    Ok(())
}

/// The plan of training every parameter of the model without adapters, and the state
/// bytes per rank of the two.
fn compare_with_full_fine_tuning(args: &Args, lora: &LoraConfig, layout: &Layout, plan: &Plan) -> anyhow::Result<()> {
    let preset = preset(args)?;
    let full_layout = MetaModel::build(DTYPE, &Device::Cpu, |vb| Llama::new(&preset, vb))?.layout()?;
    let full_config =
        PlanConfig::new(args.fsdp.world_size, args.fsdp.fsdp_config()).optimizer_states(args.optimizer.states());
    let full = Plan::new(&full_layout, full_config)?;
    let adapters: usize =
        layout.params.iter().filter(|p| p.fqn.contains(".lora_")).map(|p| p.tensor.elem_count()).sum();
    let state = |p: &Plan| p.memory.grads + p.memory.optimizer;
    println!(
        "\n== LoRA r={} (alpha {}, on {}) against full fine-tuning ==\n  \
         adapter parameters {} ({:.3}% of the {} of full fine-tuning)\n  \
         per rank: gradients + optimizer state {} against {} ({:.3}%); total peak {} against {}",
        lora.r,
        lora.alpha,
        lora.target_modules.join(", "),
        human_count(adapters),
        100.0 * adapters as f64 / full.units.iter().map(|u| u.numel).sum::<usize>() as f64,
        human_count(full.units.iter().map(|u| u.numel).sum::<usize>()),
        Bytes(state(plan)),
        Bytes(state(&full)),
        100.0 * state(plan) as f64 / state(&full) as f64,
        Bytes(plan.memory.total_peak()),
        Bytes(full.memory.total_peak()),
    );
    Ok(())
}

/// The Llama-shaped model planned: `--config`'s, or `--model`'s preset.
fn preset(args: &Args) -> anyhow::Result<LlamaConfig> {
    Ok(match (&args.config, args.model) {
        (Some(path), _) => LlamaConfig::from_hf_file(path)?,
        (None, ModelKind::Llama2_7b) => common::llama_presets::llama2_7b(),
        (None, _) => common::llama_presets::plan_default(),
    })
}

/// The compile-time table: unit templates with their parameter templates (`{index}` stands
/// for a `Vec` element), and how many concrete units each template expanded to here.
fn print_static_table(name: &str, table: &StaticTable, layout: &Layout) {
    println!(
        "\n== static FQN table of `{name}` (emitted by #[derive(Shardable)] at compile time) ==\n{} unit templates, {} parameter templates",
        table.units.len(),
        table.params.len()
    );
    for (index, unit) in table.units.iter().enumerate() {
        let instances = layout.units.iter().filter(|u| u.template == index).count();
        let parent = match unit.parent {
            Some(p) => format!("parent {}", table.units[p].display_name()),
            None => "no parent".to_string(),
        };
        let params: Vec<_> = table.unit_params(index).collect();
        println!(
            "  unit template {index}: {}  ({parent}; {} parameter templates; {instances} concrete unit{} in this model)",
            unit.display_name(),
            params.len(),
            if instances == 1 { "" } else { "s" }
        );
        for param in params {
            let role = match param.role {
                Role::Parameter => "",
                Role::Buffer => "  [buffer]",
            };
            println!("      {}{role}", param.fqn);
        }
    }
    let names = |order: &[usize]| order.iter().map(|&u| table.units[u].display_name()).collect::<Vec<_>>().join(" -> ");
    println!("  forward order (templates):      {}", names(table.forward_order));
    println!("  post-forward order (templates): {}", names(table.post_forward_order));
}
