//! Models built without values ([`MetaModel`]) and wrapped with [`Fsdp::wrap_meta`], which
//! draws each rank's shards from the initialisers the layers asked for:
//!
//! - the values are the same at every world size and strategy (each element is a function
//!   of the seed and the FQN only);
//! - each layer's values follow the distribution candle-nn draws for it (compared with a
//!   model candle-nn initialised itself, by mean and spread);
//! - training from such a model matches plain candle trained from the same values, and
//!   the same seed gives the same run bit for bit;
//! - a tied head is one tensor, drawn once;
//! - a constructor that reads a parameter before it exists gets an error naming it.

use candle_core::{DType, Device, Tensor};
use candle_fsdp::model::Layout;
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::transformer::{Transformer, TransformerConfig};
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::ConfigError;
use candle_fsdp::{launch, Error, Fsdp, FsdpConfig, LaunchOptions, MetaModel, ShardableModel, ShardingStrategy};
use candle_nn::Optimizer;
use fsdp_testkit as common;
use std::collections::BTreeMap;

fn llama_config() -> LlamaConfig {
    LlamaConfig { num_hidden_layers: 3, ..LlamaConfig::default() }
}

/// Every tensor of a plain model, by FQN.
fn tensors<M: ShardableModel>(model: &M) -> BTreeMap<String, Tensor> {
    Layout::of(model).unwrap().params.into_iter().map(|p| (p.fqn, p.tensor)).collect()
}

/// Every tensor of a plain model, by FQN, flattened.
fn values<M: ShardableModel>(model: &M) -> BTreeMap<String, Vec<f32>> {
    tensors(model).into_iter().map(|(fqn, t)| (fqn, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

/// The Llama materialised from `seed` on `world` thread ranks under `strategy`: every
/// rank's full values.
fn materialised_llama(world: usize, strategy: ShardingStrategy, seed: u64) -> Vec<BTreeMap<String, Vec<f32>>> {
    launch(LaunchOptions::new(world), |ctx| {
        let meta = MetaModel::build(DType::F32, &Device::Cpu, |vb| Llama::new(&llama_config(), vb))?;
        let fsdp = Fsdp::wrap_meta(meta, ctx.comm.clone(), FsdpConfig::default().strategy(strategy), seed)?;
        Ok(values(&fsdp.into_inner()?))
    })
    .unwrap()
}

#[test]
fn the_values_do_not_depend_on_the_world_size_or_the_strategy() {
    let reference = materialised_llama(1, ShardingStrategy::FullShard, 7).remove(0);
    assert_eq!(reference.len(), 3 + 3 * 9, "embedding, norm, head and 9 tensors per layer");
    for (world, strategy) in [
        (2, ShardingStrategy::FullShard),
        (3, ShardingStrategy::FullShard),
        (3, ShardingStrategy::ShardGradOp),
        (2, ShardingStrategy::NoShard),
    ] {
        for (rank, got) in materialised_llama(world, strategy, 7).into_iter().enumerate() {
            assert!(got == reference, "world {world}, {}, rank {rank}: other values than at world 1", strategy.name());
        }
    }
    let other_seed = materialised_llama(1, ShardingStrategy::FullShard, 8).remove(0);
    let name = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(other_seed[name], reference[name], "another seed draws other values");
}

/// Mean, standard deviation and kurtosis (3 for a normal distribution, 1.8 for a uniform
/// one: what tells the two apart at equal spread).
fn moments(values: &[f32]) -> (f64, f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let central = |k: i32| values.iter().map(|&v| (f64::from(v) - mean).powi(k)).sum::<f64>() / n;
    let var = central(2);
    (mean, var.sqrt(), central(4) / (var * var))
}

/// Against candle-nn's own initialisation of the same model (Xavier-uniform attention
/// weights, Kaiming-normal feed-forward weights with uniform biases, zero biases, unit
/// norms): constants equal, random tensors of equal mean and spread within five standard
/// errors, and of the same shape of distribution (kurtosis) where they are large.
#[test]
fn each_layer_draws_from_the_initialiser_candle_nn_would_use() {
    let config = TransformerConfig {
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        ..common::prefetch_test_fqns::prefetch_test_transformer_config(64, 2, 256)
    };
    let (model, _, _) = common::build(None, DType::F32, |vb| Transformer::new(&config, vb)).unwrap();
    let candle_nn_values = values(&model);
    let ours = launch(LaunchOptions::new(1), |ctx| {
        let meta = MetaModel::build(DType::F32, &Device::Cpu, |vb| Transformer::new(&config, vb))?;
        Ok(values(&Fsdp::wrap_meta(meta, ctx.comm.clone(), FsdpConfig::default(), 1)?.into_inner()?))
    })
    .unwrap()
    .remove(0);
    assert_eq!(ours.keys().collect::<Vec<_>>(), candle_nn_values.keys().collect::<Vec<_>>());
    let mut random = 0;
    for (fqn, theirs) in &candle_nn_values {
        let mine = &ours[fqn];
        let (their_mean, their_std, their_kurtosis) = moments(theirs);
        let (my_mean, my_std, my_kurtosis) = moments(mine);
        if their_std == 0.0 {
            assert_eq!(mine, theirs, "`{fqn}`: a constant");
            continue;
        }
        random += 1;
        let n = theirs.len() as f64;
        let mean_error = 5.0 * their_std * (2.0 / n).sqrt();
        assert!((my_mean - their_mean).abs() < mean_error, "`{fqn}`: mean {my_mean} vs candle-nn's {their_mean}");
        let spread_error = 5.0 * (1.0 / n).sqrt();
        assert!(
            (my_std / their_std - 1.0).abs() < spread_error.max(0.05),
            "`{fqn}`: std {my_std} vs candle-nn's {their_std} ({n} elements)"
        );
        if n >= 4096.0 {
            assert!(
                (my_kurtosis - their_kurtosis).abs() < 0.4,
                "`{fqn}`: kurtosis {my_kurtosis} vs candle-nn's {their_kurtosis}: another distribution"
            );
        }
    }
    assert!(random >= 10, "only {random} random tensors compared");
}

/// Three steps of SGD with momentum, each rank on its own batch: FSDP over two ranks from
/// a meta-built model against plain candle on both batches at once, from the same values.
#[test]
fn training_from_a_meta_model_matches_plain_candle() {
    const SGD: SgdMomentumConfig = SgdMomentumConfig { lr: 0.05, momentum: 0.9 };
    let config = llama_config();
    let start = launch(LaunchOptions::new(1), |ctx| {
        let meta = MetaModel::build(DType::F32, &Device::Cpu, |vb| Llama::new(&config, vb))?;
        Ok(tensors(&Fsdp::wrap_meta(meta, ctx.comm.clone(), FsdpConfig::default(), 3)?.into_inner()?))
    })
    .unwrap()
    .remove(0);
    // Each rank its own batch; the reference trains on both at once (equal sizes, so the
    // mean loss of the global batch is the mean of the ranks' losses).
    let tokens = |step: u64, rank: u64| {
        let ids: Vec<u32> = (0..2 * 12).map(|i| ((i as u64 * 37 + step * 11 + rank * 53) % 128) as u32).collect();
        Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap()
    };
    let loss_of = |logits: &Tensor, ids: &Tensor| -> candle_core::Result<Tensor> {
        let (batch, seq, vocab) = logits.dims3()?;
        let logits = logits.narrow(1, 0, seq - 1)?.reshape((batch * (seq - 1), vocab))?;
        let targets = ids.narrow(1, 1, seq - 1)?.flatten_all()?;
        candle_nn::loss::cross_entropy(&logits, &targets)
    };

    // The Hugging Face names are the `VarBuilder` paths: the snapshot fills the VarMap.
    let snapshot = common::Snapshot(start.into_iter().collect());
    let (plain, varmap, _) = common::build(Some(&snapshot), DType::F32, |vb| Llama::new(&config, vb)).unwrap();
    let mut optimizer = SgdMomentum::new(varmap.all_vars(), SGD).unwrap();
    let mut plain_losses = Vec::new();
    for step in 0..3 {
        let ids = Tensor::cat(&[tokens(step, 0), tokens(step, 1)], 0).unwrap();
        let loss = loss_of(&plain.forward(&ids).unwrap(), &ids).unwrap();
        optimizer.backward_step(&loss).unwrap();
        plain_losses.push(loss.to_scalar::<f32>().unwrap());
    }
    let plain_values = values(&plain);

    let results = launch(LaunchOptions::new(2), |ctx| {
        let meta = MetaModel::build(DType::F32, &Device::Cpu, |vb| Llama::new(&config, vb))?;
        let fsdp = Fsdp::wrap_meta(meta, ctx.comm.clone(), FsdpConfig::default(), 3)?;
        let mut optimizer = SgdMomentum::new(fsdp.parameters(), SGD)?;
        let mut losses = Vec::new();
        for step in 0..3 {
            let ids = tokens(step, ctx.rank as u64);
            let logits = fsdp.forward(|m| m.forward(&ids))?;
            let loss = loss_of(&logits, &ids)?;
            optimizer.step(&fsdp.backward(&loss)?)?;
            losses.push(loss.to_scalar::<f32>()?);
        }
        Ok((losses, values(&fsdp.into_inner()?)))
    })
    .unwrap();
    for (step, want) in plain_losses.iter().enumerate() {
        let got = (results[0].0[step] + results[1].0[step]) / 2.0;
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "step {step}: mean loss {got} vs {want}");
    }
    assert_ne!(results[0].0[0], results[1].0[0], "the ranks trained on different batches");
    for (rank, (_, trained)) in results.iter().enumerate() {
        for (fqn, want) in &plain_values {
            let got = Tensor::new(trained[fqn].as_slice(), &Device::Cpu).unwrap();
            let want = Tensor::new(want.as_slice(), &Device::Cpu).unwrap();
            common::assert_close(&got, &want, common::F32_ATOL, 1e-5, &format!("rank {rank}: `{fqn}`"));
        }
    }
}

#[test]
fn a_constructor_that_reads_a_parameter_gets_an_error_naming_it() {
    let result = MetaModel::build(DType::F32, &Device::Cpu, |vb| {
        let scale = vb.get((4, 4), "scale")?;
        // Reading the values: they do not exist yet.
        let total = scale.sum_all()?.to_scalar::<f32>()?;
        Ok(total)
    });
    match result {
        Err(Error::Config(ConfigError::MetaBuild { last: Some(name), .. })) => assert_eq!(name, "scale"),
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("the constructor read a tensor that has no values"),
    }
}

#[test]
fn a_shape_free_request_is_refused() {
    let result = MetaModel::build(DType::F32, &Device::Cpu, |vb| vb.get_unchecked("w"));
    let message = result.err().expect("no shape, no placeholder").to_string();
    assert!(message.contains("`w`") && message.contains("shape"), "{message}");
}

/// A tied head is the embedding tensor: one recorded placeholder, one draw, both names.
#[test]
fn a_tied_head_is_drawn_once() {
    let config = LlamaConfig { tie_word_embeddings: true, ..llama_config() };
    let trained = launch(LaunchOptions::new(2), |ctx| {
        let meta = MetaModel::build(DType::F32, &Device::Cpu, |vb| Llama::new(&config, vb))?;
        let fsdp = Fsdp::wrap_meta(meta, ctx.comm.clone(), FsdpConfig::default(), 9)?;
        let model = fsdp.into_inner()?;
        Ok((values(&model), model.lm_head.weight.flatten_all()?.to_vec1::<f32>()?))
    })
    .unwrap();
    for (rank, (values, head)) in trained.iter().enumerate() {
        assert!(!values.contains_key("lm_head.weight"), "rank {rank}: the head is no parameter of its own");
        assert_eq!(head, &values["model.embed_tokens.weight"], "rank {rank}");
    }
    assert_eq!(trained[0], trained[1]);
}

/// The same seed twice: the same losses, bit for bit.
#[test]
fn the_same_seed_gives_the_same_run() {
    let run = || {
        launch(LaunchOptions::new(2), |ctx| {
            let meta = MetaModel::build(DType::F32, &Device::Cpu, |vb| Llama::new(&llama_config(), vb))?;
            let fsdp = Fsdp::wrap_meta(meta, ctx.comm.clone(), FsdpConfig::default(), 21)?;
            let mut optimizer = SgdMomentum::new(fsdp.parameters(), SgdMomentumConfig { lr: 0.05, momentum: 0.9 })?;
            let ids =
                Tensor::from_vec((0..24u32).map(|i| (i * 7 + ctx.rank as u32) % 128).collect(), (2, 12), &Device::Cpu)?;
            let mut losses = Vec::new();
            for _ in 0..2 {
                let logits = fsdp.forward(|m| m.forward(&ids))?;
                let loss = logits.sqr()?.mean_all()?;
                optimizer.step(&fsdp.backward(&loss)?)?;
                losses.push(loss.to_scalar::<f32>()?.to_bits());
            }
            Ok(losses)
        })
        .unwrap()
    };
    assert_eq!(run(), run());
}

/// A layer holding a transposed placeholder holds no values of its own: refused at wrap,
/// naming the parameter and the placeholder, instead of reading released storage.
#[test]
fn a_view_of_a_placeholder_is_refused_at_wrap() {
    #[derive(candle_fsdp::Shardable)]
    struct Transposed {
        weight: Tensor,
    }
    let outcome = launch(LaunchOptions::new(1), |ctx| {
        let meta = MetaModel::build(DType::F32, &Device::Cpu, |vb| {
            Ok(Transposed { weight: vb.get_with_hints((3, 5), "w", candle_nn::Init::Const(1.0))?.t()? })
        })?;
        Fsdp::wrap_meta(meta, ctx.comm.clone(), FsdpConfig::default(), 0).map(|_| ())
    });
    match outcome {
        Err(Error::Config(ConfigError::MetaView { fqn, placeholder })) => {
            assert_eq!((fqn.as_str(), placeholder.as_str()), ("weight", "w"))
        }
        other => panic!("expected the view to be refused, got {:?}", other.map(|_| ())),
    }
}
