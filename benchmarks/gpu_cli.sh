#!/usr/bin/env bash
# The command line on a GPU, end to end: full SDXL adapter files, `orthofuse-jax fuse` with an empty
# compile cache, then again with the cache filled. One device call, about 2-3 minutes:
#
#   device tool:  run(command="bash benchmarks/gpu_cli.sh", timeout_s=300)
#
# FULL=0 uses the small demo inventory instead (a dry run on the CPU). Logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/orthofuse-gpu-cli}"
FULL="${FULL:-1}"
work=$(mktemp -d)
mkdir -p "$OUT"
export XDG_CACHE_HOME="$work/xdg"
python3 - "$work" "$FULL" <<'PY' 2>&1 | tee "$OUT/cli.log"
import sys, time
from orthofuse_jax.fusion.demo import write_demo_pair
t0 = time.perf_counter()
print("demo pair:", *write_demo_pair(sys.argv[1], full_sdxl=sys.argv[2] == "1"), f"{time.perf_counter() - t0:.1f} s")
PY
c=$(ls "$work"/*concept*.safetensors) s=$(ls "$work"/*style*.safetensors)
ls -la "$work" | tee -a "$OUT/cli.log"
TIMEFORMAT="wall %R s"
for run in cold warm; do
  echo "fuse, $run compile cache:" | tee -a "$OUT/cli.log"
  { time python3 -m orthofuse_jax.cli fuse "$c" "$s" -o "$work/fused_$run.safetensors" --t 0.6 2>&1 \
      | tr '\r' '\n' | grep -v stack/s ; } 2>&1 | tee -a "$OUT/cli.log"
done
python3 - "$work" <<'PY' 2>&1 | tee -a "$OUT/cli.log"
import sys, numpy as np
from safetensors.numpy import load_file
a, b = (load_file(f"{sys.argv[1]}/fused_{r}.safetensors") for r in ("cold", "warm"))
print("cold and warm outputs: same keys", a.keys() == b.keys(), "max abs diff", max(float(np.abs(a[k] - b[k]).max()) for k in a))
PY
python3 -c "import jax; print('backend', jax.default_backend(), jax.devices())" | tee -a "$OUT/cli.log"
du -sh "$XDG_CACHE_HOME" | tee -a "$OUT/cli.log"
rm -rf "$work"
