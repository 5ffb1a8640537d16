#!/usr/bin/env bash
# Runs benchmarks/accelerator.py on a GPU machine whose image already has jax (with CUDA), optax and orbax but
# maybe not axmini's pins: wheels in .whl/ (flax, optax, ml-collections: pure Python) are installed beside it
# only when the image's flax is not the 0.12 line axmini is written for. Output: $OUT (or /tmp) accelerator.json.
set -uo pipefail
out=${OUT:-/tmp}
site=/tmp/axmini-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
if python3 -c 'import flax, sys; sys.exit(0 if flax.__version__.startswith("0.12") else 1)' 2>/dev/null; then
  rm -rf "$site"/flax "$site"/flax-*
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
python3 -c 'import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())'
python3 benchmarks/accelerator.py --out "$out/accelerator.json" "$@" 2>&1 | tee "$out/accelerator.log"
