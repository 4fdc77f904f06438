#!/usr/bin/env bash
# The GPU speed table in ONE device call: about 4-5 minutes on an H100 (with the cuBLAS
# products that merge_sdxl --device cuda asks for; merge_sdxl --triton-gemm keeps XLA's default,
# about 2 more minutes of compiling).
#
#   device tool:  run(command="bash benchmarks/gpu_check.sh", timeout_s=480)
#
# It needs no wheels: the device image's python3 has jax (CUDA) and torch (CUDA); the package runs
# from the working tree. What it writes lies under $OUT and comes back: merge.log and
# merge_sdxl.{json,md} (written after every stage, so a time limit keeps what was measured).
# Order (benchmarks/merge_sdxl.py --device cuda): first eager calls of merge() (per-stack kernels
# compiled and run: fast, exact with the default product-only geodesic, exact restoration, and with
# --eigh-row the exact merge with algorithm="eigh"), parity (fast on all blocks; exact vs float64 on
# 8 layers per size, on the CPU), our eager timings and the 16-point sweep (medians of 5), then the
# ahead-of-time compile of jit(merge) (about 50 s in all; its executables give the jit rows), the
# baseline fast preset, and last the reference's per-layer eig loop once (more than 80 s on the
# GPU), whose first call is its one measurement.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/orthofuse-gpu}"
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
timeout 420 python3 -m benchmarks.merge_sdxl --device cuda --results-dir "$OUT" --parity-layers 8 \
    --baseline-full-reps 0 --reps 5 --baseline-reps 5 --eigh-row >"$OUT/merge.log" 2>&1
echo "merge_sdxl exit status $?"
grep -v '^|--' "$OUT/merge.log" | cut -c1-400
