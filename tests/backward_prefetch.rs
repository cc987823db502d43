//! Port of PyTorch's `test_fsdp_backward_prefetch.py`: which unit each backward
//! prefetch targets, under no prefetch, `BACKWARD_PRE` and `BACKWARD_POST`.
//!
//! The PyTorch test's model is `nn.Transformer(d_model=1024, nhead=8)` with 6 encoder and 6
//! decoder layers, each layer a unit and the root holding the two final norms; world size
//! 2, two iterations of SGD(lr 1e-2) on `model(src, tgt).sum()`. Here d_model is 64 and
//! dim_feedforward 128 for CPU speed; the structure (layers, units, orders) is the PyTorch test's.
//!
//! PyTorch's test records, at every prefetch decision made in the configured mode, the FQNs of
//! the unit returned (or None); per iteration it expects 13 entries under both modes.

use candle_core::{DType, Tensor};
use candle_fsdp::models::transformer::{Transformer, TransformerConfig};
use candle_fsdp::{launch, BackwardPrefetch, Fsdp, FsdpConfig, LaunchOptions, TraceEvent};
use candle_nn::{Optimizer, SGD};

use common::prefetch_test_fqns::expected_prefetch_entry;
use fsdp_testkit as common;

const NUM_ITERS: usize = 2;
const TOTAL_NUM_PREFETCH_FOR_PRE: usize = 12;
const TOTAL_NUM_PREFETCH_FOR_POST: usize = 11;
const ENCODER_BEGIN_INDEX_FOR_PRE: usize = 6;
const ENCODER_BEGIN_INDEX_FOR_POST: usize = 5;
const D_MODEL: usize = 64;

fn config() -> TransformerConfig {
    common::prefetch_test_fqns::prefetch_test_transformer_config(D_MODEL, 8, 128)
}

/// Trains as the PyTorch test does and returns, per rank and iteration, the recorded prefetch
/// targets as FQN lists.
fn recorded_prefetches(mode: BackwardPrefetch) -> Vec<Vec<Vec<Option<Vec<String>>>>> {
    let (_, _, snapshot) = common::build(None, DType::F32, |vb| Transformer::new(&config(), vb)).unwrap();
    launch(LaunchOptions::new(2), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, |vb| Transformer::new(&config(), vb))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().backward_prefetch(mode))?;
        let units = fsdp.diagnostics().units();
        let fqns_of = |name: &str| units.iter().find(|(n, _)| n == name).map(|(_, f)| f.clone()).unwrap();
        let mut optimizer = SGD::new(fsdp.parameters(), 1e-2)?;
        let seed = ctx.rank as u64 + 1;
        let src = common::randn(seed, &[10, 1, D_MODEL]);
        let tgt = common::randn(seed + 100, &[20, 1, D_MODEL]);
        let mut per_iteration = Vec::new();
        for _ in 0..NUM_ITERS {
            let loss = fsdp.forward(|m| m.forward(&src, &tgt))?.sum_all()?;
            optimizer.step(&fsdp.backward(&loss)?)?;
            let recorded = fsdp
                .diagnostics()
                .take_trace()
                .into_iter()
                .filter_map(|event| match event {
                    TraceEvent::BackwardPrefetch { target, .. } => Some(target.map(|t| fqns_of(&t))),
                    _ => None,
                })
                .collect();
            per_iteration.push(recorded);
        }
        Ok(per_iteration)
    })
    .unwrap()
}

fn check(mode: BackwardPrefetch, expected_len: usize, begin: usize) {
    for (rank, iterations) in recorded_prefetches(mode).into_iter().enumerate() {
        assert_eq!(iterations.len(), NUM_ITERS);
        for (iteration, recorded) in iterations.into_iter().enumerate() {
            assert_eq!(recorded.len(), expected_len, "{mode}: rank {rank} iteration {iteration}");
            for (k, entry) in recorded.iter().enumerate() {
                assert_eq!(
                    entry,
                    &expected_prefetch_entry(k, begin),
                    "{mode}: rank {rank} iteration {iteration} entry {k}"
                );
            }
        }
    }
}

#[test]
fn no_backward_prefetch_records_nothing() {
    check(BackwardPrefetch::None, 0, 0);
}

#[test]
fn backward_pre_prefetches_dec5_to_enc0_then_none() {
    check(BackwardPrefetch::Pre, TOTAL_NUM_PREFETCH_FOR_PRE + 1, ENCODER_BEGIN_INDEX_FOR_PRE);
}

#[test]
fn backward_post_prefetches_dec4_to_enc0_then_none_twice() {
    check(BackwardPrefetch::Post, TOTAL_NUM_PREFETCH_FOR_POST + 2, ENCODER_BEGIN_INDEX_FOR_POST);
}

/// The prefetches are real gathers, not only decisions: under `BACKWARD_PRE` every unit
/// but the first-prefetched decoder layer is gathered by a prefetch in backward.
#[test]
fn backward_pre_gathers_through_prefetch() {
    let (_, _, snapshot) = common::build(None, DType::F32, |vb| Transformer::new(&config(), vb)).unwrap();
    let causes = launch(LaunchOptions::new(2), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, |vb| Transformer::new(&config(), vb))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let src = common::randn(1, &[10, 1, D_MODEL]);
        let tgt: Tensor = common::randn(2, &[20, 1, D_MODEL]);
        let loss = fsdp.forward(|m| m.forward(&src, &tgt))?.sum_all()?;
        fsdp.backward(&loss)?;
        Ok(fsdp
            .diagnostics()
            .take_trace()
            .into_iter()
            .filter_map(|e| match e {
                TraceEvent::Unshard { unit, cause: candle_fsdp::UnshardCause::BackwardPrefetch } => Some(unit),
                _ => None,
            })
            .collect::<Vec<_>>())
    })
    .unwrap();
    let expected: Vec<String> = (0..6)
        .rev()
        .map(|i| format!("decoder.layers.{i}"))
        .chain((0..6).rev().map(|i| format!("encoder.layers.{i}")))
        .collect();
    assert_eq!(causes[0], expected);
}
