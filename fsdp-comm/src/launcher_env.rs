//! torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`) taken from Open MPI's, PMI's or SLURM's own when they are
//! not set, so that `mpirun` and `srun` start ranks without a wrapper script.
//!
//! A torchrun variable that is set always wins. Otherwise one launcher provides them all:
//! the first of Open MPI, PMI and SLURM whose rank variable is set. MPI comes first because
//! `mpirun` inside a SLURM allocation starts its daemons with `srun`, whose SLURM
//! variables its ranks inherit. Of SLURM, only what `srun` sets for its job step is read
//! (a batch script, or a step on part of the allocation, sees job-wide values that do not
//! describe the ranks).
//!
//! | variable | Open MPI | PMI (MPICH, Intel MPI) | SLURM (`srun`) |
//! |---|---|---|---|
//! | `RANK` | `OMPI_COMM_WORLD_RANK` | `PMI_RANK` | `SLURM_PROCID` |
//! | `WORLD_SIZE` | `OMPI_COMM_WORLD_SIZE` | `PMI_SIZE` | `SLURM_STEP_NUM_TASKS` |
//! | `LOCAL_RANK` | `OMPI_COMM_WORLD_LOCAL_RANK` | `MPI_LOCALRANKID` | `SLURM_LOCALID` |
//! | `LOCAL_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_SIZE` | `MPI_LOCALNRANKS` | this node's entry of `SLURM_STEP_TASKS_PER_NODE` (by `SLURM_NODEID`) |
//! | `MASTER_ADDR` | – | – | the first host of `SLURM_STEP_NODELIST` |
//! | `MASTER_PORT` | – | – | `20000 + (16 · SLURM_JOB_ID + SLURM_STEP_ID) % 10000` |
//!
//! With no `MASTER_ADDR` from anywhere, a job whose ranks all run on one node (its local
//! world size is the world size) meets on `127.0.0.1`.

/// One variable's value and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    pub value: String,
    /// The variable read (the torchrun name itself, or a launcher's).
    pub source: String,
}

/// A launcher: the variable that says it started this process, and its source of each
/// torchrun variable.
struct Launcher {
    rank: &'static str,
    sources: fn(&str) -> Option<&'static str>,
}

const LAUNCHERS: [Launcher; 3] = [
    Launcher {
        rank: "OMPI_COMM_WORLD_RANK",
        sources: |name| match name {
            "WORLD_SIZE" => Some("OMPI_COMM_WORLD_SIZE"),
            "LOCAL_RANK" => Some("OMPI_COMM_WORLD_LOCAL_RANK"),
            "LOCAL_WORLD_SIZE" => Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
            _ => None,
        },
    },
    Launcher {
        rank: "PMI_RANK",
        sources: |name| match name {
            "WORLD_SIZE" => Some("PMI_SIZE"),
            "LOCAL_RANK" => Some("MPI_LOCALRANKID"),
            "LOCAL_WORLD_SIZE" => Some("MPI_LOCALNRANKS"),
            _ => None,
        },
    },
    Launcher {
        rank: "SLURM_PROCID",
        sources: |name| match name {
            "WORLD_SIZE" => Some("SLURM_STEP_NUM_TASKS"),
            "LOCAL_RANK" => Some("SLURM_LOCALID"),
            "LOCAL_WORLD_SIZE" => Some("SLURM_STEP_TASKS_PER_NODE"),
            "MASTER_ADDR" => Some("SLURM_STEP_NODELIST"),
            "MASTER_PORT" => Some("SLURM_JOB_ID"),
            _ => None,
        },
    },
];

/// The launcher's variable for torchrun's `name`.
fn source(launcher: &Launcher, name: &str) -> Option<&'static str> {
    if name == "RANK" {
        Some(launcher.rank)
    } else {
        (launcher.sources)(name)
    }
}

/// The launcher that started this process: the first whose rank variable is set.
fn launcher(get: &dyn Fn(&str) -> Option<String>) -> Option<&'static Launcher> {
    LAUNCHERS.iter().find(|l| get(l.rank).is_some())
}

/// The variables `name` may come from, for an error that says what was looked for.
pub(crate) fn looked_for(name: &str) -> String {
    std::iter::once(name).chain(LAUNCHERS.iter().filter_map(|l| source(l, name))).collect::<Vec<_>>().join(", ")
}

/// `name`'s value: set, or derived from the launcher's variables.
pub(crate) fn lookup(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<Found> {
    if let Some(value) = get(name) {
        return Some(Found { value, source: name.to_string() });
    }
    if let Some(source) = launcher(get).and_then(|l| source(l, name)) {
        if let Some(raw) = get(source) {
            let number = |var: &str| get(var).and_then(|v| v.trim().parse::<u64>().ok());
            let value = match source {
                "SLURM_STEP_TASKS_PER_NODE" => {
                    tasks_on_node(&raw, number("SLURM_NODEID").unwrap_or(0) as usize).map(|n| n.to_string())
                }
                "SLURM_STEP_NODELIST" => first_host(&raw),
                "SLURM_JOB_ID" => raw.trim().parse::<u64>().ok().map(|job| {
                    let step = number("SLURM_STEP_ID").unwrap_or(0);
                    (20_000 + (16 * job + step) % 10_000).to_string()
                }),
                _ => Some(raw.clone()),
            };
            // A source that cannot be read is handed on as it is, for the error to show it.
            return Some(Found { value: value.unwrap_or(raw), source: source.to_string() });
        }
    }
    if name == "MASTER_ADDR" {
        let size = |n: &str| lookup(get, n).and_then(|f| f.value.trim().parse::<usize>().ok());
        if let (Some(local), Some(world)) = (size("LOCAL_WORLD_SIZE"), size("WORLD_SIZE")) {
            if local == world {
                return Some(Found {
                    value: "127.0.0.1".into(),
                    source: "one node: LOCAL_WORLD_SIZE = WORLD_SIZE".into(),
                });
            }
        }
    }
    None
}

/// Whether this process is one rank of a launched job: torchrun's `RANK` and `WORLD_SIZE`,
/// or a launcher's own pair.
pub(crate) fn launched(get: &dyn Fn(&str) -> Option<String>) -> bool {
    lookup(get, "RANK").is_some() && lookup(get, "WORLD_SIZE").is_some()
}

/// The first host of a SLURM node list: `node[01-04,07],gpu5` gives `node01`.
pub(crate) fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => return true,
                _ => {}
            }
            false
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    // Each bracket group contributes its first number, zero padding kept.
    let mut host = String::new();
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        let close = open + rest[open..].find(']')?;
        host.push_str(&rest[..open]);
        let first = rest[open + 1..close].split([',', '-']).next()?.trim();
        if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        host.push_str(first);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    (!host.is_empty()).then_some(host)
}

/// Node `node`'s task count in SLURM's `SLURM_TASKS_PER_NODE` (`2(x3),1`: three nodes of
/// two tasks, then one of one).
pub(crate) fn tasks_on_node(list: &str, node: usize) -> Option<usize> {
    let mut seen = 0;
    for entry in list.trim().split(',') {
        let (tasks, repeat) = match entry.split_once("(x") {
            Some((tasks, repeat)) => (tasks, repeat.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (entry, 1),
        };
        let tasks = tasks.trim().parse::<usize>().ok()?;
        seen += repeat;
        if node < seen {
            return Some(tasks);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_host_of_a_node_list() {
        assert_eq!(first_host("node07").as_deref(), Some("node07"));
        assert_eq!(first_host("node[01-04]").as_deref(), Some("node01"));
        assert_eq!(first_host("node[003,010-012],gpu[1-2]").as_deref(), Some("node003"));
        assert_eq!(first_host("gpu5,node[1-2]").as_deref(), Some("gpu5"));
        assert_eq!(first_host("rack[2-3]-n[08-09]").as_deref(), Some("rack2-n08"));
        assert_eq!(first_host("a-b-[7-9].cluster").as_deref(), Some("a-b-7.cluster"));
        assert_eq!(first_host("node[x-y]"), None);
        assert_eq!(first_host("node[01"), None);
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn tasks_per_node_with_repeats() {
        assert_eq!(
            (0..5).map(|n| tasks_on_node("2(x3),1", n)).collect::<Vec<_>>(),
            [Some(2), Some(2), Some(2), Some(1), None]
        );
        assert_eq!(tasks_on_node("4", 0), Some(4));
        assert_eq!(tasks_on_node("4(x2", 0), None);
    }
}
