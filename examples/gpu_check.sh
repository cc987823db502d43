#!/usr/bin/env bash
# The GPU check in one call, on a machine with an NVIDIA GPU and the driver (no Rust needed
# there: build gpu_check elsewhere with the `cuda` feature and carry the binary over).
#
#   examples/gpu_check.sh PATH/TO/gpu_check [--quick] [other gpu_check options]
#
# 1. Finds NCCL and the CUDA libraries candle loads (cuBLAS, cuRAND): $NCCL_LIB_DIR if set,
#    else the NVIDIA wheels of the Python that has PyTorch, else the system's libraries.
# 2. Runs the sections that can hang (environment, kernels, NCCL collectives, stream
#    ordering) under a short deadline first, so a hang costs minutes, not the whole run;
#    stops there if they fail.
# 3. Runs the rest (memory, parity, prefetch sequences, step time, fused ops), then PyTorch FSDP2 on
#    the same models when python3 has torch.
# 4. Prints a compact summary. Full logs go to $OUT (or a temporary folder).
set -u
bin=${1:?usage: gpu_check.sh GPU_CHECK_BINARY [gpu_check options]}
shift
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
first_deadline=${FIRST_DEADLINE_SECS:-150}
rest_deadline=${REST_DEADLINE_SECS:-300}

# --- libraries -------------------------------------------------------------------------
python=${PYTHON:-python3}
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
dirs=()
[ -n "${NCCL_LIB_DIR:-}" ] && dirs+=("$NCCL_LIB_DIR")
if [ -n "$site" ]; then
  for d in "$site"/nvidia/nccl/lib "$site"/nvidia/cu13/lib "$site"/nvidia/cublas/lib "$site"/nvidia/curand/lib; do
    [ -d "$d" ] && dirs+=("$d")
  done
fi
for d in /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do [ -d "$d" ] && dirs+=("$d"); done
nccl=""
for d in "${dirs[@]}"; do
  for name in libnccl.so libnccl.so.2; do
    if [ -z "$nccl" ] && [ -e "$d/$name" ]; then nccl="$d/$name"; fi
  done
done
[ -z "$nccl" ] && nccl=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so/ { print $NF; exit }')
# cudarc asks for `libnccl.so`; NCCL's wheels ship only `libnccl.so.2`.
shim=$(mktemp -d)
if [ -n "$nccl" ]; then
  ln -sf "$nccl" "$shim/libnccl.so"
  echo "NCCL: $nccl"
else
  echo "NCCL: not found (set NCCL_LIB_DIR); the check will say so"
fi
lib_path="$shim"
for d in "${dirs[@]}"; do lib_path="$lib_path:$d"; done
export LD_LIBRARY_PATH="$lib_path:${LD_LIBRARY_PATH:-}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader

# Runs gpu_check's sections $2 under a deadline of $3 seconds; logs under $out/gpu_check_$1.
run_sections() {
  local name=$1 sections=$2 deadline=$3
  timeout $((deadline + 30)) "$bin" --sections "$sections" --deadline-secs "$deadline" \
    --log "$out/gpu_check_$name.log" "${args[@]}" > "$out/gpu_check_$name.txt" 2>&1
  local status=$?
  echo "== sections $sections: exit $status"
  grep -E "FAIL" "$out/gpu_check_$name.txt" | cut -c1-300 | head -30
  sed -n '/=== SUMMARY ===/,$p' "$out/gpu_check_$name.txt" | cut -c1-300
  return $status
}
args=("$@")

# The sections that can hang, under a short deadline; the rest only when they pass.
if ! run_sections first 1,2,3,4 "$first_deadline"; then
  echo "sections 1-4 did not pass: the rest is not run (full log: $out/gpu_check_first.txt)"
  exit 1
fi
run_sections rest 5,6,7,8,9 "$rest_deadline"
rest=$?

# --- PyTorch FSDP2 on the same models ---------------------------------------------------
if "$python" -c 'import torch' 2>/dev/null; then
  for model in small medium; do
    timeout 120 "$python" "$here/fsdp2_reference.py" --model "$model" --steps 6 --warmup 2 --rounds 1 \
      > "$out/fsdp2_$model.txt" 2>&1
    echo "== PyTorch FSDP2, $model model: exit $?"
    tail -7 "$out/fsdp2_$model.txt" | cut -c1-400
  done
  # The fused kernels' comparison: PyTorch with its fused attention (SDPA).
  timeout 180 "$python" "$here/fsdp2_reference.py" --model large --attention sdpa --steps 6 --warmup 2 --rounds 1 \
    > "$out/fsdp2_large_sdpa.txt" 2>&1
  echo "== PyTorch FSDP2 (SDPA), large model: exit $?"
  tail -7 "$out/fsdp2_large_sdpa.txt" | cut -c1-400
else
  echo "== PyTorch FSDP2: python3 has no torch; skipped"
fi
exit "$rest"
