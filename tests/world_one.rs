//! The switch that runs every collective over a group of one rank
//! (`FsdpConfig::collectives_at_world_one`), which lets one GPU exercise the path of several:
//! all-gather, copy-out, reduce-scatter. At world size 1 it must make the runtime issue the
//! collectives (counted here) and change no bit of the training: the same losses and the
//! same trained parameters as without it, on the thread and the TCP backends, under every
//! sharding strategy and prefetch mode.

use fsdp_testkit as common;

use candle_core::{DType, Module, Tensor};
use candle_fsdp::dist::{Collectives, Store, StoreServer, TcpComm};
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{launch, BackwardPrefetch, Fsdp, FsdpConfig, LaunchOptions, ShardingStrategy};
use candle_nn::Optimizer;
use common::fsdp_test_models::NestedWrappedModule;
use common::{build, Fault, FaultyCollectives, Snapshot};
use std::sync::Arc;
use std::time::Duration;

const STEPS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(30);

/// What a run ends with, as bits, and the collectives it issued.
#[derive(Debug, PartialEq)]
struct Run {
    losses: Vec<u32>,
    params: Vec<(String, Vec<u32>)>,
}

struct Calls {
    all_gather: usize,
    reduce_scatter: usize,
    all_reduce: usize,
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

/// Trains `NestedWrappedModule` for a few SGD-momentum steps on one rank over `comm`.
fn train(comm: Arc<dyn Collectives>, snapshot: &Snapshot, config: FsdpConfig) -> candle_fsdp::Result<(Run, Calls)> {
    let counted = Arc::new(FaultyCollectives::new(comm, Fault::None));
    let (model, _, _) = build(Some(snapshot), DType::F32, NestedWrappedModule::new)?;
    let fsdp = Fsdp::wrap(model, counted.clone(), config)?;
    let mut opt = SgdMomentum::new(fsdp.parameters(), SgdMomentumConfig { lr: 1e-2, momentum: 0.9 })?;
    let x = common::rand(1, &[4, 8]);
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let loss = fsdp.forward(|m| m.forward(&x))?.sum_all()?;
        losses.push(loss.to_scalar::<f32>()?.to_bits());
        opt.step(&fsdp.backward(&loss)?)?;
    }
    let params = fsdp.full_parameters()?.into_iter().map(|(name, value)| (name, bits(&value))).collect();
    let calls = Calls {
        all_gather: counted.calls("all_gather"),
        reduce_scatter: counted.calls("reduce_scatter"),
        all_reduce: counted.calls("all_reduce"),
    };
    Ok((Run { losses, params }, calls))
}

fn on_threads(snapshot: &Snapshot, config: FsdpConfig) -> (Run, Calls) {
    let mut runs = launch(LaunchOptions::new(1), |ctx| train(ctx.comm.clone(), snapshot, config)).expect("train");
    runs.remove(0)
}

fn on_tcp(snapshot: &Snapshot, config: FsdpConfig) -> (Run, Calls) {
    let server = StoreServer::bind("127.0.0.1:0").expect("bind a store");
    let addr = server.local_addr().to_string();
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(LaunchOptions::new(1).stack_size)
            .spawn_scoped(scope, || {
                let store = Store::connect(&addr, 0, TIMEOUT)?;
                let comm: Arc<dyn Collectives> = Arc::new(TcpComm::connect(&store, 0, 1, TIMEOUT)?);
                train(comm, snapshot, config)
            })
            .expect("start the rank")
            .join()
            .expect("the rank panicked")
            .expect("train")
    })
}

#[test]
fn collectives_at_world_one_change_no_bit() {
    let (_, _, snapshot) = build(None, DType::F32, NestedWrappedModule::new).expect("build the model");
    for strategy in ShardingStrategy::ALL {
        for backward_prefetch in BackwardPrefetch::ALL {
            for forward_prefetch in [false, true] {
                let config = FsdpConfig::default()
                    .strategy(strategy)
                    .backward_prefetch(backward_prefetch)
                    .forward_prefetch(forward_prefetch);
                let what =
                    format!("{strategy}, backward prefetch {backward_prefetch}, forward prefetch {forward_prefetch}");
                for (backend, run) in
                    [("threads", on_threads as fn(&Snapshot, FsdpConfig) -> (Run, Calls)), ("tcp", on_tcp)]
                {
                    let (plain, plain_calls) = run(&snapshot, config);
                    let (forced, forced_calls) = run(&snapshot, config.collectives_at_world_one(true));
                    assert_eq!(
                        (plain_calls.all_gather, plain_calls.reduce_scatter, plain_calls.all_reduce),
                        (0, 0, 0),
                        "{backend}, {what}: one rank issued collectives without the switch"
                    );
                    if strategy.shards() {
                        assert!(
                            forced_calls.all_gather >= STEPS && forced_calls.reduce_scatter >= STEPS,
                            "{backend}, {what}: the switch issued {} all-gathers and {} reduce-scatters in {STEPS} steps",
                            forced_calls.all_gather,
                            forced_calls.reduce_scatter
                        );
                    } else {
                        assert!(
                            forced_calls.all_reduce >= STEPS,
                            "{backend}, {what}: the switch issued {} all-reduces in {STEPS} steps",
                            forced_calls.all_reduce
                        );
                    }
                    assert_eq!(plain, forced, "{backend}, {what}: the switch changed the training");
                }
            }
        }
    }
}
