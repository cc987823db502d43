//! How separate processes (one per GPU, or per CPU rank) find each other.
//!
//! The launcher (`fsdp-run`, `srun`, `mpirun`) gives every process the torchrun
//! environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT` ([`DistEnv`]), or its own variables, from which they are derived. Rank 0 hosts a
//! [`StoreServer`] at `MASTER_ADDR:MASTER_PORT`; every rank, rank 0 too, connects to it and
//! registers ([`Rendezvous::join`]). Afterwards ranks exchange small values through the
//! store (the NCCL unique id with [`Rendezvous::broadcast_bytes`]) and meet in barriers.

use super::launcher_env::{self, Found};
use super::store::{unique_token, Store, StoreServer};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The torchrun environment contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    /// This process's rank in the job (`RANK`).
    pub rank: usize,
    /// The number of processes in the job (`WORLD_SIZE`).
    pub world_size: usize,
    /// The rank among the processes of this node (selects the GPU).
    pub local_rank: usize,
    /// The number of processes on this node (`LOCAL_WORLD_SIZE`; the world size when
    /// not set).
    pub local_world_size: usize,
    /// The host of rank 0's store (`MASTER_ADDR`).
    pub master_addr: String,
    /// The port of rank 0's store (`MASTER_PORT`).
    pub master_port: u16,
    /// Set when torchrun's elastic agent hosts the store at `MASTER_ADDR:MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank joins it as a client.
    pub agent_store: Option<AgentStore>,
}

/// torchrun's agent store: which run and which attempt of it this process belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentStore {
    /// `TORCHELASTIC_RUN_ID`.
    pub run_id: String,
    /// `TORCHELASTIC_RESTART_COUNT`: 0 for the first attempt, then one more per restart.
    pub restart_count: u32,
}

impl AgentStore {
    /// Reads the agent's variables; `None` unless `TORCHELASTIC_USE_AGENT_STORE` is true.
    fn from_vars(get: &impl Fn(&str) -> Option<String>, problems: &mut Vec<String>) -> Option<Self> {
        let on = get("TORCHELASTIC_USE_AGENT_STORE")?;
        if !matches!(on.trim().to_ascii_lowercase().as_str(), "true" | "1") {
            return None;
        }
        let run_id = get("TORCHELASTIC_RUN_ID").unwrap_or_else(|| "none".to_string());
        let restart_count = match get("TORCHELASTIC_RESTART_COUNT").map(|v| v.trim().parse::<u32>()) {
            None => 0,
            Some(Ok(count)) => count,
            Some(Err(_)) => {
                problems.push("TORCHELASTIC_RESTART_COUNT is not a count".into());
                0
            }
        };
        Some(Self { run_id, restart_count })
    }

    /// The namespace of this attempt's keys in the agent's store: a restarted attempt never
    /// reads the keys of the one before.
    pub fn namespace(&self) -> String {
        format!("candle-fsdp/{}/attempt_{}", self.run_id, self.restart_count)
    }
}

impl DistEnv {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` (optional: the world
    /// size when not given), `MASTER_ADDR` and `MASTER_PORT` from the environment; each one
    /// not set is taken from SLURM's, Open MPI's or PMI's own variables (see
    /// docs/launching.md for the table), so `srun` and `mpirun` need no
    /// wrapper.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over any source of variables. The error lists every missing or
    /// invalid variable at once, naming the variable each value was read from.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut problems = Vec::new();
        let mut required = |name: &str| -> Option<Found> {
            let found = launcher_env::lookup(&get, name);
            if found.is_none() {
                problems.push(format!("{name} is not set (looked for {})", launcher_env::looked_for(name)));
            }
            found
        };
        let rank = required("RANK");
        let world_size = required("WORLD_SIZE");
        let local_rank = required("LOCAL_RANK");
        let master_addr = required("MASTER_ADDR");
        let master_port = required("MASTER_PORT");
        let local_world_size = launcher_env::lookup(&get, "LOCAL_WORLD_SIZE");
        let agent_store = AgentStore::from_vars(&get, &mut problems);

        let rank = parse::<usize>(&mut problems, "RANK", rank);
        let world_size = parse::<usize>(&mut problems, "WORLD_SIZE", world_size);
        let local_rank = parse::<usize>(&mut problems, "LOCAL_RANK", local_rank);
        let master_port = parse::<u16>(&mut problems, "MASTER_PORT", master_port);
        let local_world_size = match local_world_size {
            None => world_size,
            some => parse::<usize>(&mut problems, "LOCAL_WORLD_SIZE", some),
        };
        let master_addr = master_addr.map(|found| found.value);
        let master_addr = master_addr.map(|a| a.trim().to_string());
        if master_addr.as_deref() == Some("") {
            problems.push("MASTER_ADDR is empty".into());
        }

        if world_size == Some(0) {
            problems.push("WORLD_SIZE=0: a world needs at least one rank".into());
        }
        if let (Some(rank), Some(world_size)) = (rank, world_size) {
            if world_size > 0 && rank >= world_size {
                problems.push(format!("RANK={rank} is not below WORLD_SIZE={world_size}"));
            }
        }
        if local_world_size == Some(0) {
            problems.push("LOCAL_WORLD_SIZE=0: a node needs at least one rank".into());
        }
        if let (Some(local_rank), Some(local_world_size)) = (local_rank, local_world_size) {
            if local_world_size > 0 && local_rank >= local_world_size {
                problems.push(format!("LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world_size}"));
            }
        }
        if let (Some(local_world_size), Some(world_size)) = (local_world_size, world_size) {
            if local_world_size > world_size {
                problems.push(format!("LOCAL_WORLD_SIZE={local_world_size} is larger than WORLD_SIZE={world_size}"));
            }
        }
        if let (Some(0), Some(world_size)) = (master_port, world_size) {
            if world_size > 1 {
                problems.push("MASTER_PORT=0: the other ranks could not know which port rank 0 picked".into());
            }
        }
        match (rank, world_size, local_rank, local_world_size, master_addr, master_port) {
            (
                Some(rank),
                Some(world_size),
                Some(local_rank),
                Some(local_world_size),
                Some(master_addr),
                Some(master_port),
            ) if problems.is_empty() => {
                Ok(DistEnv { rank, world_size, local_rank, local_world_size, master_addr, master_port, agent_store })
            }
            _ => Err(Error::LaunchEnv { problems }),
        }
    }

    /// True when `RANK` and `WORLD_SIZE`, or a launcher's own pair (`SLURM_PROCID` and
    /// `SLURM_STEP_NUM_TASKS`, ...), are in the environment: this process was launched as one of
    /// several.
    pub fn is_set() -> bool {
        launcher_env::launched(&|name| std::env::var(name).ok())
    }

    /// `MASTER_ADDR:MASTER_PORT` as a connectable address (an IPv6 literal in brackets).
    pub fn master_endpoint(&self) -> String {
        endpoint(&self.master_addr, self.master_port)
    }
}

fn parse<T: std::str::FromStr>(problems: &mut Vec<String>, name: &str, found: Option<Found>) -> Option<T> {
    let Found { value, source } = found?;
    match value.trim().parse::<T>() {
        Ok(v) => Some(v),
        Err(_) => {
            let from = if source == name { String::new() } else { format!(" (from {source})") };
            problems.push(format!("{name}=`{value}`{from} is not a valid number"));
            None
        }
    }
}

fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Store keys of the registration.
mod key {
    pub const WORLD_SIZE: &str = "rendezvous/world_size";
    pub const ARRIVED: &str = "rendezvous/arrived";
    pub const COMPLETE: &str = "rendezvous/complete";
    /// The first registration failure any rank found, for every rank to report.
    pub const ERROR: &str = "rendezvous/error";
    pub const LEFT: &str = "rendezvous/left";
    pub const ALL_LEFT: &str = "rendezvous/all-left";
    pub fn rank(rank: usize) -> String {
        format!("rendezvous/rank/{rank}")
    }
}

/// A joined process group: the environment, a client of the store, and on rank 0 the store
/// itself.
pub struct Rendezvous {
    /// The environment the process joined with.
    pub env: DistEnv,
    /// This process's client of the job's store.
    pub store: Store,
    /// Rank 0's server; dropping it stops the store, so rank 0 keeps it to [`Rendezvous::finish`].
    server: Option<StoreServer>,
    /// How often each key was broadcast, so a key can be broadcast again (every rank makes
    /// the same calls in the same order, so the counts agree).
    broadcasts: Mutex<HashMap<String, u64>>,
}

impl Rendezvous {
    /// Rank 0 binds MASTER_ADDR:MASTER_PORT and serves; every rank (0 too) connects and
    /// registers; returns once all `world_size` ranks registered. Rank 0's timeout error
    /// lists the ranks that never arrived; another rank's error says that no rendezvous
    /// answered at the address (or that peers never arrived).
    pub fn join(env: DistEnv, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let master = env.master_endpoint();
        if let Some(agent) = &env.agent_store {
            // torchrun's agent serves the store: every rank, rank 0 too, is a client.
            let store = Store::connect_c10d(&master, env.rank, &agent.namespace(), deadline, timeout)?;
            let rendezvous = Rendezvous { env, store, server: None, broadcasts: Mutex::new(HashMap::new()) };
            rendezvous.register(deadline, timeout)?;
            return Ok(rendezvous);
        }
        let (server, addr) = if env.rank == 0 {
            let listen = listen_address(&env);
            let server = StoreServer::bind(&listen).map_err(|e| match e {
                Error::Rendezvous { message, .. } => Error::Rendezvous {
                    rank: 0,
                    addr: listen.clone(),
                    message: format!("{message} (is another job using MASTER_PORT={}?)", env.master_port),
                },
                other => other,
            })?;
            // With port 0 (a world of one) connect to the port actually picked.
            let addr = endpoint(&env.master_addr, server.local_addr().port());
            (Some(server), addr)
        } else {
            (None, master)
        };
        let store = Store::connect_by(&addr, env.rank, deadline, timeout)?;
        let rendezvous = Rendezvous { env, store, server, broadcasts: Mutex::new(HashMap::new()) };
        rendezvous.register(deadline, timeout)?;
        Ok(rendezvous)
    }

    fn register(&self, deadline: Instant, timeout: Duration) -> Result<()> {
        let (rank, world_size) = (self.env.rank, self.env.world_size);
        let store = &self.store;

        // Every rank must agree on WORLD_SIZE: the first to register sets it.
        let mine = format!("{world_size} {rank}");
        let stored = String::from_utf8_lossy(&store.set_if_absent(key::WORLD_SIZE, mine.as_bytes())?).into_owned();
        let mut fields = stored.split(' ');
        let (theirs, by) = (fields.next().unwrap_or("?"), fields.next().unwrap_or("?"));
        if theirs != world_size.to_string() {
            return Err(self.publish_failure(format!(
                "WORLD_SIZE disagrees: rank {rank} has WORLD_SIZE={world_size} but rank {by} registered \
                 WORLD_SIZE={theirs}; every process needs the same WORLD_SIZE"
            )));
        }

        // Each RANK is claimed once; a second claimant means two processes got the same RANK.
        let claim = format!("{}|pid {} on {}", unique_token(), std::process::id(), hostname());
        let holder = String::from_utf8_lossy(&store.set_if_absent(&key::rank(rank), claim.as_bytes())?).into_owned();
        if holder != claim {
            return Err(self.publish_failure(format!(
                "duplicate RANK={rank}: claimed by {} and again by {}; every process needs its own RANK",
                describe_claim(&holder),
                describe_claim(&claim)
            )));
        }

        let arrived = store.add(key::ARRIVED, 1)?;
        if arrived == world_size as i64 {
            store.set(key::COMPLETE, arrived.to_string().as_bytes())?;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match store.wait_any(&[key::ERROR, key::COMPLETE], left)? {
            Some((0, failure)) => Err(store.error(String::from_utf8_lossy(&failure).into_owned())),
            Some(_) => Ok(()),
            None => {
                let mut missing = Vec::new();
                for r in 0..world_size {
                    if store.try_get(&key::rank(r))?.is_none() {
                        missing.push(r);
                    }
                }
                let shown: Vec<String> = missing.iter().take(32).map(|r| r.to_string()).collect();
                let more = if missing.len() > shown.len() { ", ..." } else { "" };
                Err(store.error(format!(
                    "rank(s) {}{more} never arrived within {timeout:?} ({} of {world_size} registered)",
                    shown.join(", "),
                    world_size - missing.len()
                )))
            }
        }
    }

    /// Records a registration failure for every rank to report, and returns it as this
    /// rank's error.
    fn publish_failure(&self, message: String) -> Error {
        let message = format!("registration failed: {message}");
        match self.store.set_if_absent(key::ERROR, message.as_bytes()) {
            Ok(_) => self.store.error(message),
            Err(e) => e,
        }
    }

    /// `root` publishes `value` under `key`; every rank returns root's bytes. Other ranks'
    /// `value` is ignored. The same key may be broadcast again later.
    pub fn broadcast_bytes(&self, key: &str, root: usize, value: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
        let world_size = self.env.world_size;
        if root >= world_size {
            return Err(self
                .store
                .error(format!("broadcast `{key}`: root {root} is not a rank of a world of {world_size}")));
        }
        let round = {
            let mut counts = self.broadcasts.lock().unwrap_or_else(|e| e.into_inner());
            let count = counts.entry(key.to_string()).or_insert(0);
            *count += 1;
            *count - 1
        };
        let store_key = format!("broadcast/{key}/{round}");
        if self.env.rank == root {
            let value = value.ok_or_else(|| {
                self.store.error(format!("broadcast `{key}`: this rank is the root but was given no value"))
            })?;
            self.store.set(&store_key, value)?;
            return Ok(value.to_vec());
        }
        match self.store.wait_any(&[&store_key], timeout)? {
            Some((_, value)) => Ok(value),
            None => {
                Err(self.store.error(format!("broadcast `{key}`: rank {root} published nothing within {timeout:?}")))
            }
        }
    }

    /// Returns once every rank called `barrier` with the same `name` (names can be reused).
    pub fn barrier(&self, name: &str, timeout: Duration) -> Result<()> {
        self.store.barrier(&format!("user/{name}"), self.env.world_size, timeout)
    }

    /// A barrier, then rank 0 stops serving: call at the end so rank 0 does not take the
    /// store away while others still read.
    pub fn finish(self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let world_size = self.env.world_size;
        self.store.barrier("rendezvous/finish", world_size, timeout)?;
        if self.env.rank != 0 {
            // The last call this rank makes: rank 0 waits for every rank's before it stops.
            if self.store.add(key::LEFT, 1)? == world_size as i64 - 1 {
                self.store.set(key::ALL_LEFT, b"")?;
            }
            return Ok(());
        }
        if world_size > 1 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.store.wait_any(&[key::ALL_LEFT], left)?.is_none() {
                let gone = self.store.add(key::LEFT, 0)?;
                return Err(self.store.error(format!(
                    "finish: only {gone} of the {} other ranks left the final barrier within {timeout:?}",
                    world_size - 1
                )));
            }
        }
        drop(self.server);
        Ok(())
    }
}

/// Where rank 0 listens. A loopback MASTER_ADDR stays on loopback; any other address listens
/// on every interface, because a host name may resolve to a loopback address on its own
/// node (127.0.1.1 on Debian) while the other nodes reach it by its real address.
fn listen_address(env: &DistEnv) -> String {
    let host = env.master_addr.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
    if loopback {
        return env.master_endpoint();
    }
    let ipv6 = match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_ipv6(),
        Err(_) => {
            let resolved = env.master_endpoint().to_socket_addrs().ok().and_then(|mut addrs| addrs.next());
            resolved.is_some_and(|a| a.is_ipv6())
        }
    };
    if ipv6 {
        format!("[::]:{}", env.master_port)
    } else {
        format!("0.0.0.0:{}", env.master_port)
    }
}

fn describe_claim(claim: &str) -> &str {
    claim.split_once('|').map_or(claim, |(_, who)| who)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    const FULL: &[(&str, &str)] = &[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];

    fn error_of(pairs: &[(&str, &str)]) -> String {
        DistEnv::from_vars(vars(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn full_environment_parses() {
        let env = DistEnv::from_vars(vars(FULL)).unwrap();
        assert_eq!(
            env,
            DistEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: 2,
                master_addr: "10.0.0.1".into(),
                master_port: 29500,
                agent_store: None,
            }
        );
        assert_eq!(env.master_endpoint(), "10.0.0.1:29500");
    }

    #[test]
    fn local_world_size_defaults_to_world_size() {
        let pairs: Vec<_> = FULL.iter().copied().filter(|(k, _)| *k != "LOCAL_WORLD_SIZE").collect();
        assert_eq!(DistEnv::from_vars(vars(&pairs)).unwrap().local_world_size, 8);
    }

    #[test]
    fn every_missing_variable_is_named() {
        let err = error_of(&[("LOCAL_RANK", "0")]);
        let problems: Vec<&str> = err.split_once("is not usable: ").unwrap().1.split("; ").collect();
        assert_eq!(
            problems,
            [
                "RANK is not set (looked for RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID)",
                "WORLD_SIZE is not set (looked for WORLD_SIZE, OMPI_COMM_WORLD_SIZE, PMI_SIZE, SLURM_STEP_NUM_TASKS)",
                "MASTER_ADDR is not set (looked for MASTER_ADDR, SLURM_STEP_NODELIST)",
                "MASTER_PORT is not set (looked for MASTER_PORT, SLURM_JOB_ID)"
            ],
            "{err}"
        );
    }

    /// A job of four tasks on a first node and two on a second (`SLURM_TASKS_PER_NODE`
    /// `4,2`), as the second node's second task sees it.
    /// The job-wide variables (a larger allocation) must not be read.
    const SLURM: &[(&str, &str)] = &[
        ("SLURM_PROCID", "5"),
        ("SLURM_STEP_NUM_TASKS", "6"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "4,2"),
        ("SLURM_TASKS_PER_NODE", "4(x4)"),
        ("SLURM_STEP_NODELIST", "gpu-node[07-08]"),
        ("SLURM_JOB_NODELIST", "gpu-node[01-08]"),
        ("SLURM_JOB_ID", "4312345"),
        ("SLURM_STEP_ID", "3"),
    ];

    #[test]
    fn slurm_variables_need_no_translation() {
        let env = DistEnv::from_vars(vars(SLURM)).unwrap();
        // The second node's entry of `4,2`.
        let expected = DistEnv {
            rank: 5,
            world_size: 6,
            local_rank: 1,
            local_world_size: 2,
            master_addr: "gpu-node07".into(),
            // 20000 + (16 · 4312345 + 3) % 10000
            master_port: 27523,
            agent_store: None,
        };
        assert_eq!(env, expected);
        // Set torchrun variables win over derived ones.
        let mut pairs = SLURM.to_vec();
        pairs.extend([("MASTER_ADDR", "10.1.2.3"), ("MASTER_PORT", "29400"), ("LOCAL_WORLD_SIZE", "4")]);
        let env = DistEnv::from_vars(vars(&pairs)).unwrap();
        assert_eq!((env.master_addr.as_str(), env.master_port), ("10.1.2.3", 29400));
        // A value that cannot be read names the launcher's variable it came from.
        let mut pairs = SLURM.to_vec();
        pairs[0] = ("SLURM_PROCID", "six");
        let err = error_of(&pairs);
        assert!(err.contains("RANK=`six` (from SLURM_PROCID) is not a valid number"), "{err}");
    }

    /// `mpirun` inside an allocation: its ranks inherit the SLURM variables of the daemon
    /// `srun` started, and the MPI ones must win, all of them together.
    #[test]
    fn mpi_variables_win_over_inherited_slurm_ones() {
        let mut pairs = SLURM.to_vec();
        pairs.extend([
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ("MASTER_PORT", "29500"),
        ]);
        let env = DistEnv::from_vars(vars(&pairs)).unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank, env.local_world_size), (3, 4, 3, 4));
        assert_eq!(env.master_endpoint(), "127.0.0.1:29500");
        // A batch script: SLURM_PROCID without the step's variables is no launched rank.
        let batch = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "7")];
        assert!(!launcher_env::launched(&vars(&batch)));
        assert!(launcher_env::launched(&vars(SLURM)));
    }

    #[test]
    fn open_mpi_and_pmi_variables_on_one_node_meet_on_loopback() {
        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("MASTER_PORT", "29500"),
        ];
        let env = DistEnv::from_vars(vars(&ompi)).unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank, env.local_world_size), (1, 2, 1, 2));
        assert_eq!(env.master_endpoint(), "127.0.0.1:29500");
        let pmi = [("PMI_RANK", "3"), ("PMI_SIZE", "4"), ("MPI_LOCALRANKID", "1"), ("MPI_LOCALNRANKS", "2")];
        let mut pairs = pmi.to_vec();
        pairs.push(("MASTER_PORT", "29500"));
        // Two nodes: no address to derive, and the error says where it looked.
        let err = error_of(&pairs);
        assert!(err.contains("MASTER_ADDR is not set (looked for MASTER_ADDR, SLURM_STEP_NODELIST)"), "{err}");
        pairs.push(("MASTER_ADDR", "head"));
        let env = DistEnv::from_vars(vars(&pairs)).unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank, env.local_world_size), (3, 4, 1, 2));
    }

    #[test]
    fn bad_numbers_are_named() {
        let mut pairs = FULL.to_vec();
        pairs[1] = ("WORLD_SIZE", "eight");
        pairs[5] = ("MASTER_PORT", "70000");
        let err = error_of(&pairs);
        assert!(err.contains("WORLD_SIZE=`eight` is not a valid number"), "{err}");
        assert!(err.contains("MASTER_PORT=`70000` is not a valid number"), "{err}");
    }

    #[test]
    fn ranks_must_be_below_their_sizes() {
        let mut pairs = FULL.to_vec();
        pairs[0] = ("RANK", "8");
        pairs[2] = ("LOCAL_RANK", "2");
        let err = error_of(&pairs);
        assert!(err.contains("RANK=8 is not below WORLD_SIZE=8"), "{err}");
        assert!(err.contains("LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"), "{err}");
    }

    #[test]
    fn port_zero_only_for_a_world_of_one() {
        let mut pairs = FULL.to_vec();
        pairs[5] = ("MASTER_PORT", "0");
        assert!(error_of(&pairs).contains("MASTER_PORT=0"));
    }

    #[test]
    fn ipv6_endpoint_gets_brackets() {
        assert_eq!(endpoint("::1", 29500), "[::1]:29500");
        assert_eq!(endpoint("[::1]", 29500), "[::1]:29500");
    }

    #[test]
    fn ranks_as_threads_join_broadcast_and_finish() {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let results: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    scope.spawn(move || {
                        let env = DistEnv {
                            rank,
                            world_size: 3,
                            local_rank: rank,
                            local_world_size: 3,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            agent_store: None,
                        };
                        let rdv = Rendezvous::join(env, Duration::from_secs(10)).unwrap();
                        let value = (rank == 1).then_some(&b"from one"[..]);
                        let got = rdv.broadcast_bytes("id", 1, value, Duration::from_secs(10)).unwrap();
                        let again = rdv.broadcast_bytes("id", 1, value.map(|_| &b"twice"[..]), Duration::from_secs(10));
                        assert_eq!(again.unwrap(), b"twice");
                        rdv.barrier("b", Duration::from_secs(10)).unwrap();
                        rdv.finish(Duration::from_secs(10)).unwrap();
                        got
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r == b"from one"));
    }
}
