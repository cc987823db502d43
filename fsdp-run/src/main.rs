//! `fsdp-run`: starts one process per rank on this node with the torchrun environment
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`),
//! prefixes each child's output lines with `[rank R] `, and fails the whole job as soon as
//! one rank fails: the others would otherwise wait for it in a collective until their
//! timeouts.
//!
//! ```sh
//! fsdp-run --nproc-per-node 2 -- target/release/examples/train --steps 10
//! ```

use clap::Parser;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often the children are polled for their exit.
const POLL: Duration = Duration::from_millis(20);
/// How long the output of exited children may take to drain before fsdp-run exits anyway
/// (a grandchild can keep a pipe open).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "fsdp-run",
    about = "Start one process per rank with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, \
             LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
)]
struct Args {
    /// Processes (ranks) to start on this node.
    #[arg(long)]
    nproc_per_node: usize,
    /// Nodes in the job (each runs fsdp-run with its own --node-rank).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index among the nodes.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// The address of the node that runs global rank 0 (it hosts the rendezvous store).
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// The rendezvous port; 0 picks a free one (only with --nnodes 1).
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// Fail the job (stopping every rank) if it has not finished after this many seconds.
    #[arg(long)]
    timeout_secs: Option<f64>,
    /// After a rank fails, how long the others get to exit on their own before they are killed.
    #[arg(long, default_value_t = 2.0)]
    grace_secs: f64,
    /// The program to run and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// One started rank.
struct Rank {
    rank: usize,
    child: Child,
    /// `None` while it runs.
    status: Option<ExitStatus>,
}

fn main() {
    let args = Args::parse();
    std::process::exit(match run(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("fsdp-run: {message}");
            1
        }
    });
}

/// Runs the job; returns the exit code, or an error that stops it before it starts.
fn run(args: Args) -> Result<i32, String> {
    if args.nproc_per_node == 0 {
        return Err("--nproc-per-node must be at least 1".into());
    }
    if args.nnodes == 0 || args.node_rank >= args.nnodes {
        return Err(format!("--node-rank {} is not below --nnodes {}", args.node_rank, args.nnodes));
    }
    if !(args.grace_secs >= 0.0 && args.grace_secs.is_finite()) {
        return Err(format!("--grace-secs {} is not a duration", args.grace_secs));
    }
    let job_limit = match args.timeout_secs {
        Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
        Some(s) => return Err(format!("--timeout-secs {s} is not a positive duration")),
        None => None,
    };
    let master_port = match args.master_port {
        0 if args.nnodes > 1 => {
            return Err("--master-port 0 needs --nnodes 1: the other nodes could not know the port".into())
        }
        0 => free_port(&args.master_addr)?,
        port => port,
    };
    let world_size = args.nproc_per_node * args.nnodes;
    let (program, program_args) = args.command.split_first().expect("clap requires a command");

    // candle sizes its CPU kernels' thread pool from the environment only: unless the
    // caller chose, each rank gets its share of this node's cores (as torchrun sets
    // OMP_NUM_THREADS), so that the ranks do not oversubscribe them.
    let chosen = ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"].iter().any(|name| std::env::var_os(name).is_some());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu_threads = (!chosen).then(|| (cores / args.nproc_per_node.max(1)).max(1));

    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let mut readers = 0;
    let mut ranks: Vec<Rank> = Vec::new();
    for local_rank in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local_rank;
        let mut command = Command::new(program);
        command
            .args(program_args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", master_port.to_string())
            .envs(cpu_threads.map(|threads| ("CANDLE_NUM_THREADS", threads.to_string())))
            // Only rank 0 reads the terminal: several readers would steal each other's input.
            .stdin(if rank == 0 { Stdio::inherit() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let message = format!("could not start rank {rank} (`{}`): {e}", program.to_string_lossy());
                stop_all(&mut ranks, Duration::ZERO);
                return Err(message);
            }
        };
        if let Some(out) = child.stdout.take() {
            forward_lines(out, rank, false, drained_tx.clone());
            readers += 1;
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(err, rank, true, drained_tx.clone());
            readers += 1;
        }
        ranks.push(Rank { rank, child, status: None });
    }
    drop(drained_tx);

    let started = Instant::now();
    let mut code = 0;
    loop {
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            if let Ok(Some(status)) = r.child.try_wait() {
                r.status = Some(status);
            }
        }
        if let Some(failed) = ranks.iter().find(|r| r.status.is_some_and(|s| !s.success())) {
            let status = failed.status.expect("exited");
            eprintln!(
                "fsdp-run: rank {} (pid {}) failed: {}; stopping the other ranks",
                failed.rank,
                failed.child.id(),
                describe(status)
            );
            code = status.code().filter(|&c| c != 0).unwrap_or(1);
            stop_all(&mut ranks, Duration::from_secs_f64(args.grace_secs));
            break;
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            break;
        }
        if let Some(limit) = job_limit.filter(|&l| started.elapsed() > l) {
            let running: Vec<String> =
                ranks.iter().filter(|r| r.status.is_none()).map(|r| r.rank.to_string()).collect();
            eprintln!(
                "fsdp-run: the job did not finish within {limit:?}; rank(s) {} still running; stopping them",
                running.join(", ")
            );
            code = 1;
            stop_all(&mut ranks, Duration::ZERO);
            break;
        }
        std::thread::sleep(POLL);
    }

    // Let the last output lines through, but do not wait on a pipe a grandchild holds open.
    let deadline = Instant::now() + OUTPUT_DRAIN;
    for _ in 0..readers {
        let left = deadline.saturating_duration_since(Instant::now());
        if drained_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    Ok(code)
}

/// Gives the ranks still running `grace` to exit on their own, then kills them, and reaps all.
fn stop_all(ranks: &mut [Rank], grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && ranks.iter_mut().any(|r| r.status.is_none() && !exited(r)) {
        std::thread::sleep(POLL);
    }
    // Kill every survivor before reaping any: one rank's death (rank 0 takes the store with
    // it) must not make the others exit in between with errors of their own.
    let mut killed = Vec::new();
    for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
        if !exited(r) {
            let _ = r.child.kill();
            killed.push(r.rank.to_string());
        }
    }
    for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
        r.status = r.child.wait().ok();
    }
    if !killed.is_empty() {
        eprintln!("fsdp-run: killed rank(s) {}", killed.join(", "));
    }
}

/// Polls one rank; true once it has exited.
fn exited(rank: &mut Rank) -> bool {
    if rank.status.is_none() {
        if let Ok(Some(status)) = rank.child.try_wait() {
            rank.status = Some(status);
        }
    }
    rank.status.is_some()
}

fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = match signal {
                1 => " (SIGHUP)",
                2 => " (SIGINT)",
                6 => " (SIGABRT)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            return format!("killed by signal {signal}{name}");
        }
    }
    status.to_string()
}

/// Copies `pipe` line by line to this process's stdout (or stderr) with a `[rank R] ` prefix;
/// sends on `done` at the end of the output.
fn forward_lines(pipe: impl Read + Send + 'static, rank: usize, to_stderr: bool, done: mpsc::Sender<()>) {
    let prefix = format!("[rank {rank}] ");
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            // One locked write per line, so lines of different ranks never interleave.
            let written = if to_stderr {
                let mut err = std::io::stderr().lock();
                err.write_all(prefix.as_bytes()).and_then(|()| err.write_all(&line))
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(prefix.as_bytes()).and_then(|()| out.write_all(&line)).and_then(|()| out.flush())
            };
            if written.is_err() {
                break;
            }
        }
        let _ = done.send(());
    });
}

/// A port free on `host` now. Another process could take it before rank 0 binds it, but
/// for single-node jobs that race is rare and ends in a clear bind error.
fn free_port(host: &str) -> Result<u16, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let probe = std::net::TcpListener::bind((host, 0))
        .map_err(|e| format!("could not find a free port on {host} for --master-port 0: {e}"))?;
    probe.local_addr().map(|a| a.port()).map_err(|e| format!("could not find a free port on {host}: {e}"))
}
