//! Gathered-parameter memory per rank, measured by the runtime's accounting, against the
//! plan computed from the model before wrapping (PyTorch FSDP1's rule: under `BACKWARD_PRE` the peak
//! holds the current and the next unit; under `BACKWARD_POST` and without prefetch only
//! one unit besides the root).

use candle_core::DType;
use candle_fsdp::model::Layout;
use candle_fsdp::models::transformer::{Transformer, TransformerConfig};
use candle_fsdp::{launch, BackwardPrefetch, Fsdp, FsdpConfig, LaunchOptions, Plan, PlanConfig, ShardingStrategy};

use fsdp_testkit as common;

const D_MODEL: usize = 32;

fn config() -> TransformerConfig {
    common::prefetch_test_fqns::prefetch_test_transformer_config(D_MODEL, 4, 64)
}

struct Measured {
    /// Gathered bytes alive right after forward.
    after_forward: usize,
    /// The high-water mark over forward and backward.
    peak: usize,
    /// Gathered bytes alive after backward.
    after_backward: usize,
}

fn measure(strategy: ShardingStrategy, prefetch: BackwardPrefetch, forward_prefetch: bool) -> (Vec<Measured>, Plan) {
    let world = 2;
    let (model, _, snapshot) = common::build(None, DType::F32, |vb| Transformer::new(&config(), vb)).unwrap();
    let fsdp_config =
        FsdpConfig::default().strategy(strategy).backward_prefetch(prefetch).forward_prefetch(forward_prefetch);
    let plan = Plan::new(&Layout::of(&model).unwrap(), PlanConfig::new(world, fsdp_config)).unwrap();
    let measured = launch(LaunchOptions::new(world), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, |vb| Transformer::new(&config(), vb))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), fsdp_config)?;
        let src = common::randn(ctx.rank as u64, &[5, 2, D_MODEL]);
        let tgt = common::randn(ctx.rank as u64 + 10, &[4, 2, D_MODEL]);
        let out = fsdp.forward(|m| m.forward(&src, &tgt))?;
        let after_forward = fsdp.diagnostics().memory().gathered_bytes;
        fsdp.backward(&out.sum_all()?)?;
        Ok(Measured {
            after_forward,
            peak: fsdp.diagnostics().memory().gathered_peak,
            after_backward: fsdp.diagnostics().memory().gathered_bytes,
        })
    })
    .unwrap();
    (measured, plan)
}

fn whole_model_bytes(plan: &Plan) -> usize {
    plan.units.iter().map(|u| u.gathered_bytes).sum()
}

fn unit_bytes(plan: &Plan, name: &str) -> usize {
    plan.units.iter().find(|u| u.name == name).unwrap().gathered_bytes
}

#[test]
fn full_shard_backward_pre_peak_is_root_plus_two_adjacent_units() {
    let (measured, plan) = measure(ShardingStrategy::FullShard, BackwardPrefetch::Pre, false);
    // Independently of the plan's formula: the largest pair gathered together under
    // BACKWARD_PRE is two decoder layers (a decoder layer is larger than an encoder layer).
    let expected = unit_bytes(&plan, "<root>") + 2 * unit_bytes(&plan, "decoder.layers.0");
    assert_eq!(plan.memory.gathered_peak, expected);
    for (rank, m) in measured.iter().enumerate() {
        assert_eq!(m.peak, expected, "rank {rank}");
        assert!(m.peak * 4 < whole_model_bytes(&plan), "rank {rank}: the peak must stay far below the whole model");
        assert_eq!(m.after_forward, unit_bytes(&plan, "<root>"), "rank {rank}: only the root stays after forward");
        assert_eq!(m.after_backward, 0, "rank {rank}: everything is freed after backward");
    }
}

#[test]
fn full_shard_post_and_no_prefetch_peak_is_root_plus_one_unit() {
    for prefetch in [BackwardPrefetch::Post, BackwardPrefetch::None] {
        let (measured, plan) = measure(ShardingStrategy::FullShard, prefetch, false);
        let expected = unit_bytes(&plan, "<root>") + unit_bytes(&plan, "decoder.layers.0");
        assert_eq!(plan.memory.gathered_peak, expected, "{prefetch}");
        for (rank, m) in measured.iter().enumerate() {
            assert_eq!(m.peak, expected, "{prefetch}: rank {rank}");
        }
    }
}

#[test]
fn forward_prefetch_holds_the_next_unit_during_forward() {
    let (measured, plan) = measure(ShardingStrategy::FullShard, BackwardPrefetch::None, true);
    // A decoder layer's forward prefetches the next one: two decoder layers at once.
    let expected = unit_bytes(&plan, "<root>") + 2 * unit_bytes(&plan, "decoder.layers.0");
    assert_eq!(plan.memory.gathered_peak, expected);
    for (rank, m) in measured.iter().enumerate() {
        assert_eq!(m.peak, plan.memory.gathered_peak, "rank {rank}");
    }
}

#[test]
fn shard_grad_op_holds_the_whole_model_between_forward_and_backward() {
    let (measured, plan) = measure(ShardingStrategy::ShardGradOp, BackwardPrefetch::Pre, false);
    let whole = whole_model_bytes(&plan);
    assert_eq!(plan.memory.gathered_peak, whole);
    for (rank, m) in measured.iter().enumerate() {
        assert_eq!(m.after_forward, whole, "rank {rank}");
        assert_eq!(m.peak, whole, "rank {rank}");
        assert_eq!(m.after_backward, 0, "rank {rank}");
    }
}

/// A unit's full gradients wait for its reduction; the root's arrive from the first
/// backward step to the last. At one rank without collectives they are the shards' own.
#[test]
fn the_plan_counts_the_root_and_the_largest_unit_of_full_gradients_awaiting_reduction() {
    let layout = {
        let (model, _, _) = common::build(None, DType::F32, |vb| Transformer::new(&config(), vb)).unwrap();
        Layout::of(&model).unwrap()
    };
    let plan = |world: usize, fsdp: FsdpConfig| Plan::new(&layout, PlanConfig::new(world, fsdp)).unwrap();
    let two = plan(2, FsdpConfig::default());
    let expected = unit_bytes(&two, "<root>") + unit_bytes(&two, "decoder.layers.0");
    for strategy in ShardingStrategy::ALL {
        assert_eq!(plan(2, FsdpConfig::default().strategy(strategy)).memory.unreduced_grads_peak, expected);
    }
    assert_eq!(plan(1, FsdpConfig::default()).memory.unreduced_grads_peak, 0);
    assert_eq!(plan(1, FsdpConfig::default().collectives_at_world_one(true)).memory.unreduced_grads_peak, expected);
}
