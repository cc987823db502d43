#!/usr/bin/env bash
# Per-rank memory of Llama training at world sizes 1, 2 and 4, one process per rank, with
# the model built whole on every rank (--init full) and built without values
# (--init meta); then the demonstration: under one per-process limit on the address space,
# the model fails at world 1 and trains at world 4.
#
#   examples/memory_bench.sh [memory_bench options, e.g. --hidden 1024 --layers 16]
#
# LIMIT_MIB sets the per-process limit of the demonstration (default 2200 MiB, between
# what a world-4 rank and a world-1 rank of the default 134M-parameter model need).
set -u
cd "$(dirname "$0")/.."
cargo build --release --example memory_bench -q && cargo build --release -p fsdp-run -q || exit 1
bench=target/release/examples/memory_bench
run=target/release/fsdp-run
limit_mib=${LIMIT_MIB:-2200}

# Rows of rank 0's table, one per run.
table() {
  "$run" --nproc-per-node "$1" --master-port 0 -- "$bench" --init "$2" "${@:3}" 2>&1 | sed 's/^\[rank 0\] //'
}
header=1
for init in full meta; do
  for world in 1 2 4; do
    if [ "$header" = 1 ]; then table "$world" "$init" "$@"; header=0; else table "$world" "$init" "$@" | tail -n +2; fi
  done
done

# The address-space limit is inherited by fsdp-run's children: every rank gets it.
echo
echo "== under a limit of $limit_mib MiB per process (ulimit -v):"
for world in 1 4; do
  (
    ulimit -v $((limit_mib * 1024))
    # glibc reserves 64 MiB of address space per thread arena; keep it to a few.
    export MALLOC_ARENA_MAX=2
    if "$run" --nproc-per-node "$world" --master-port 0 -- "$bench" --init meta "$@" > /tmp/memory_bench_limit.txt 2>&1; then
      echo "world $world: trained ($(tail -2 /tmp/memory_bench_limit.txt | head -1 | sed 's/^\[rank 0\] //' | tr -s ' '))"
    else
      echo "world $world: failed: $(grep -m1 -iE 'memory|alloc|error' /tmp/memory_bench_limit.txt | cut -c1-160)"
    fi
  )
done
