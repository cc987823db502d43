//! Several real processes on loopback: the torchrun environment, the rendezvous through
//! rank 0's store, and the `fsdp-run` launcher.
//!
//! The rank processes are this test binary itself, re-executed to run only `child_rank`
//! with `CHILD_SCENARIO` set; without that variable `child_rank` returns at once.

use candle_fsdp::dist::{DistEnv, Rendezvous};
use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Tells a re-executed test binary which part to play.
const SCENARIO: &str = "CHILD_SCENARIO";
/// The child's rendezvous timeout in milliseconds.
const TIMEOUT_MS: &str = "CHILD_TIMEOUT_MS";
/// No test process may run longer than this; a hang fails the test instead of the suite.
const PROCESS_LIMIT: Duration = Duration::from_secs(25);

/// The rank process. Prints `JOIN_ERROR <error>` and exits 3 when the rendezvous fails.
#[test]
fn child_rank() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let timeout = Duration::from_millis(std::env::var(TIMEOUT_MS).ok().and_then(|t| t.parse().ok()).unwrap_or(10_000));
    let env = DistEnv::from_env().unwrap_or_else(|e| exit_with(5, &format!("ENV_ERROR {e}")));
    println!(
        "ENV rank={} world_size={} local_rank={} local_world_size={}",
        env.rank, env.world_size, env.local_rank, env.local_world_size
    );
    let rank = env.rank;
    let rendezvous = Rendezvous::join(env, timeout).unwrap_or_else(|e| exit_with(3, &format!("JOIN_ERROR {e}")));
    println!("JOINED pid={}", std::process::id());
    match scenario.as_str() {
        "join" => {}
        "broadcast" => {
            let mine = (rank == 0).then(random_bytes);
            let got = rendezvous
                .broadcast_bytes("nccl-id", 0, mine.as_deref(), timeout)
                .unwrap_or_else(|e| exit_with(4, &format!("BROADCAST_ERROR {e}")));
            println!("BYTES {}", hex(&got));
        }
        "fail-rank-1" => {
            if rank == 1 {
                exit_with(7, "rank 1 fails on purpose");
            }
            // Waits for rank 1 far longer than the test allows: only fsdp-run ends this.
            let outcome = rendezvous.barrier("never", Duration::from_secs(60));
            exit_with(4, &format!("BARRIER_RETURNED {outcome:?}"));
        }
        other => exit_with(6, &format!("unknown scenario {other}")),
    }
    rendezvous.finish(timeout).unwrap_or_else(|e| exit_with(4, &format!("FINISH_ERROR {e}")));
}

fn exit_with(code: i32, message: &str) -> ! {
    println!("{message}");
    std::process::exit(code)
}

fn random_bytes() -> Vec<u8> {
    let state = RandomState::new();
    (0..16u64)
        .flat_map(|i| {
            let mut hasher = state.build_hasher();
            hasher.write_u64(i);
            hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
            hasher.finish().to_le_bytes()
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The command that re-runs this binary as a rank playing `scenario`.
fn child_command(scenario: &str, timeout_ms: u64) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("test binary path"));
    command
        .args(["--exact", "launch_processes::child_rank", "--nocapture", "--test-threads", "1"])
        .env(SCENARIO, scenario)
        .env(TIMEOUT_MS, timeout_ms.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// `fsdp-run <launcher_args> -- <this binary as a rank playing scenario>`.
fn fsdp_run(launcher_args: &[&str], scenario: &str, timeout_ms: u64) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fsdp-run"));
    command.args(launcher_args).arg("--");
    let child = child_command(scenario, timeout_ms);
    command.arg(child.get_program()).args(child.get_args());
    for (key, value) in child.get_envs() {
        command.env(key, value.expect("set"));
    }
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command.spawn().expect("start fsdp-run")
}

/// One rank started directly with the torchrun environment.
fn spawn_rank(rank: usize, world_size: usize, port: u16, scenario: &str, timeout_ms: u64) -> Child {
    child_command(scenario, timeout_ms)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world_size.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world_size.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .spawn()
        .expect("start a rank")
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Waits for `child` (killing it past `PROCESS_LIMIT`) and collects its output.
fn finish(mut child: Child) -> Finished {
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break status;
        }
        if started.elapsed() > PROCESS_LIMIT {
            let _ = child.kill();
            panic!("process {} did not finish within {PROCESS_LIMIT:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().unwrap().port()
}

/// The lines `[rank R] ...<tag> <rest>` of fsdp-run's output, as R -> rest. (The tag need
/// not start the line: the test harness prints `test child_rank ... ` without a newline.)
fn tagged(output: &str, tag: &str) -> BTreeMap<usize, String> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("[rank ")?;
            let (rank, rest) = rest.split_once("] ")?;
            let (_, value) = rest.split_once(&format!("{tag} "))?;
            Some((rank.parse().ok()?, value.to_string()))
        })
        .collect()
}

#[test]
fn three_processes_receive_rank_zeros_random_bytes() {
    let run =
        finish(fsdp_run(&["--nproc-per-node", "3", "--master-port", "0", "--timeout-secs", "20"], "broadcast", 10_000));
    assert!(run.status.success(), "fsdp-run failed: {}", run.all());
    let env = tagged(&run.stdout, "ENV");
    assert_eq!(env.len(), 3, "{}", run.all());
    for (rank, vars) in &env {
        assert_eq!(vars, &format!("rank={rank} world_size=3 local_rank={rank} local_world_size=3"));
    }
    let bytes = tagged(&run.stdout, "BYTES");
    assert_eq!(bytes.keys().copied().collect::<Vec<_>>(), [0, 1, 2], "{}", run.all());
    let root = &bytes[&0];
    assert_eq!(root.len(), 256, "128 bytes in hex");
    assert_ne!(root, &"0".repeat(256));
    assert!(bytes.values().all(|b| b == root), "ranks received different bytes: {bytes:?}");
}

#[test]
fn rank_zero_names_the_rank_that_never_arrived() {
    let port = free_port();
    let started = Instant::now();
    let ranks: Vec<Child> = (0..2).map(|rank| spawn_rank(rank, 3, port, "join", 3000)).collect();
    let outputs: Vec<Finished> = ranks.into_iter().map(finish).collect();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    for (rank, output) in outputs.iter().enumerate() {
        assert_eq!(output.status.code(), Some(3), "rank {rank}: {}", output.all());
    }
    let rank0 = outputs[0].all();
    assert!(
        rank0.contains(&format!(
            "JOIN_ERROR rank 0: rendezvous at 127.0.0.1:{port}: rank(s) 2 never arrived within 3s (2 of 3 registered)"
        )),
        "{rank0}"
    );
}

#[test]
fn a_rank_without_rank_zero_times_out_naming_the_address() {
    let port = free_port();
    let env = DistEnv {
        rank: 1,
        world_size: 2,
        local_rank: 1,
        local_world_size: 2,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: None,
    };
    let started = Instant::now();
    let err = Rendezvous::join(env, Duration::from_millis(800)).err().expect("no rank 0").to_string();
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(
        err.starts_with(&format!("rank 1: rendezvous at 127.0.0.1:{port}: no rendezvous store answered within 800ms")),
        "{err}"
    );
    assert!(err.contains("is rank 0 running"), "{err}");
}

#[test]
fn fsdp_run_stops_the_survivors_when_one_rank_fails() {
    let started = Instant::now();
    let run = finish(fsdp_run(
        &["--nproc-per-node", "3", "--master-port", "0", "--grace-secs", "0.5", "--timeout-secs", "20"],
        "fail-rank-1",
        10_000,
    ));
    let elapsed = started.elapsed();
    assert_eq!(run.status.code(), Some(7), "{}", run.all());
    assert!(elapsed < Duration::from_secs(10), "fsdp-run took {elapsed:?}");
    assert!(run.stderr.contains("fsdp-run: rank 1 (pid "), "{}", run.all());
    assert!(run.stderr.contains("failed: exit code 7; stopping the other ranks"), "{}", run.all());
    assert!(run.stderr.contains("fsdp-run: killed rank(s) 0, 2"), "{}", run.all());
    assert!(run.stdout.contains("[rank 1] rank 1 fails on purpose"), "{}", run.all());
    let joined = tagged(&run.stdout, "JOINED");
    assert_eq!(joined.len(), 3, "{}", run.all());
    for (rank, pid) in joined.iter().filter(|(rank, _)| **rank != 1) {
        let pid = pid.strip_prefix("pid=").unwrap();
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "rank {rank} (pid {pid}) still runs");
    }
}

#[test]
fn a_duplicated_rank_fails_every_process_promptly() {
    let port = free_port();
    let started = Instant::now();
    let ranks: Vec<Child> = [0, 1, 1].into_iter().map(|rank| spawn_rank(rank, 3, port, "join", 8000)).collect();
    let outputs: Vec<Finished> = ranks.into_iter().map(finish).collect();
    assert!(started.elapsed() < Duration::from_secs(6), "waited out the timeout: {:?}", started.elapsed());
    for output in &outputs {
        assert_eq!(output.status.code(), Some(3), "{}", output.all());
        assert!(output.stdout.contains("registration failed: duplicate RANK=1: claimed by pid "), "{}", output.all());
    }
}

#[test]
fn a_world_size_disagreement_is_reported() {
    let port = free_port();
    let rank0 = spawn_rank(0, 2, port, "join", 8000);
    let rank1 = spawn_rank(1, 3, port, "join", 8000);
    for output in [finish(rank0), finish(rank1)] {
        assert_eq!(output.status.code(), Some(3), "{}", output.all());
        assert!(output.stdout.contains("registration failed: WORLD_SIZE disagrees: rank "), "{}", output.all());
    }
}

#[test]
fn fsdp_run_reports_a_program_it_cannot_start() {
    let run = finish(
        Command::new(env!("CARGO_BIN_EXE_fsdp-run"))
            .args(["--nproc-per-node", "2", "--master-port", "0", "--", "/nonexistent/program"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(run.status.code(), Some(1));
    assert!(run.stderr.contains("fsdp-run: could not start rank 0 (`/nonexistent/program`)"), "{}", run.stderr);
}
