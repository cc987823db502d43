//! FSDP across processes: `fsdp-run` starts two ranks as processes, they meet through the
//! rendezvous at MASTER_ADDR:MASTER_PORT and train over the TCP backend. Every loss and
//! every trained parameter must be bit-identical to the same training with thread ranks
//! (both backends reduce in rank order), under each sharding strategy.
//!
//! The child ranks are this test binary, run again with only `process_rank_child` selected
//! and the work folder in `CHILD_DIR`.

use fsdp_testkit as common;

use candle_core::Module;
use candle_core::{DType, Tensor};
use candle_fsdp::dist::ReduceOp;
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{launch, Backend, Fsdp, FsdpConfig, LaunchOptions, ProcessGroup, RankContext, ShardingStrategy};
use candle_nn::Optimizer;
use common::{build, Snapshot};
use fsdp_testkit::fsdp_test_models::NestedWrappedModule;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const CHILD_DIR: &str = "CANDLE_FSDP_TEST_CHILD_DIR";
const STEPS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Trains `NestedWrappedModule` from `snapshot` under every strategy in turn; returns the
/// global losses and the full trained parameters, by name (`{strategy}/loss/{step}`,
/// `{strategy}/{fqn}`).
fn train(ctx: &RankContext, snapshot: &Snapshot) -> candle_fsdp::Result<HashMap<String, Tensor>> {
    let mut results = HashMap::new();
    for strategy in ShardingStrategy::ALL {
        let (model, _, _) = build(Some(snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().strategy(strategy))?;
        let mut optimizer = SgdMomentum::new(fsdp.parameters(), SgdMomentumConfig { lr: 1e-2, momentum: 0.9 })?;
        let x = common::rand(1 + ctx.rank as u64, &[4, 8]);
        for step in 0..STEPS {
            let loss = fsdp.forward(|m| m.forward(&x))?.sum_all()?;
            let global = ctx.comm.all_reduce(&loss.reshape(1)?, ReduceOp::Avg, "loss")?.wait()?;
            results.insert(format!("{}/loss/{step}", strategy.name()), global);
            optimizer.step(&fsdp.backward(&loss)?)?;
        }
        for (fqn, value) in fsdp.full_parameters()? {
            results.insert(format!("{}/{fqn}", strategy.name()), value);
        }
    }
    Ok(results)
}

fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("snapshot.safetensors")
}

fn rank_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank{rank}.safetensors"))
}

/// One rank of the launched job; does nothing unless started by the test below.
#[test]
fn process_rank_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR).map(PathBuf::from) else {
        return;
    };
    let group = ProcessGroup::from_env(Backend::Tcp, TIMEOUT).expect("joining the job");
    let ctx = group.context();
    let snapshot = Snapshot(candle_core::safetensors::load(snapshot_path(&dir), &candle_core::Device::Cpu).unwrap());
    let results = train(&ctx, &snapshot).expect("training");
    candle_core::safetensors::save(&results, rank_path(&dir, ctx.rank)).unwrap();
    group.finish().expect("leaving the job");
}

#[test]
fn processes_over_tcp_train_like_thread_ranks() {
    let dir = std::env::temp_dir().join(format!("candle-fsdp-process-training-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_, _, snapshot) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    candle_core::safetensors::save(&snapshot.0, snapshot_path(&dir)).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_fsdp-run"))
        .args(["--nproc-per-node", "2", "--master-port", "0", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "process_training::process_rank_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR, &dir)
        .output()
        .expect("starting fsdp-run");
    assert!(
        output.status.success(),
        "the launched job failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let threads = launch(LaunchOptions::new(2).timeout(TIMEOUT), |ctx| train(&ctx, &snapshot)).unwrap();
    for (rank, expected) in threads.iter().enumerate() {
        let got = candle_core::safetensors::load(rank_path(&dir, rank), &candle_core::Device::Cpu).unwrap();
        let mut names: Vec<&String> = expected.keys().collect();
        names.sort();
        assert_eq!(got.len(), expected.len(), "rank {rank}: the processes produced other results");
        assert_eq!(names.len(), 3 * (STEPS + snapshot.0.len()), "3 strategies × (losses + parameters)");
        for name in names {
            let (a, b) = (&got[name], &expected[name]);
            let bits = |t: &Tensor| {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(a), bits(b), "rank {rank}: `{name}` differs between processes and threads");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
