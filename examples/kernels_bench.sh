#!/usr/bin/env bash
# The training step on the CPU against PyTorch's, side by side: for each model (the main
# job's `train` and the bench's `small`) and thread count, rounds that take turns between
# candle-fsdp (examples/bench: plain candle and FSDP at world size 1, on the fused and the
# composed kernels) and PyTorch (examples/fsdp2_reference.py: plain PyTorch and FSDP2 at
# world size 1 on gloo), so that load from elsewhere on the machine spreads over all of
# them. Prints every run's medians and the ratios of the last round.
#
#   examples/kernels_bench.sh [PYTHON_WITH_TORCH] [ROUNDS]
set -eu
python=${1:-python3}
rounds=${2:-2}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
cargo build --release --example bench >/dev/null
for threads in 1 2; do
  for model in train small; do
    for round in $(seq "$rounds"); do
      echo "== $model, $threads thread(s), round $round"
      for kernels in fused composed; do
        target/release/examples/bench --model "$model" --kernels "$kernels" --candle-threads "$threads" \
          --steps 10 --rounds 1 | awk -v k="$kernels" '/^  \((a|b)\) .* ms /{ print "candle " k ": " $0 }'
      done
      "$python" examples/fsdp2_reference.py --device cpu --threads "$threads" --model "$model" --steps 10 \
        --rounds 1 2>/dev/null | awk '/^  \((a|b)\) /{ print "pytorch: " $0 }'
    done
  done
done
