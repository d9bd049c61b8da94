#!/bin/bash
# The GPU measurements of the README's training-speed section, as one call on a lent GPU
# machine (no network there: diffusers, ml_collections and importlib_metadata come as
# wheels in .whl/; jax, flax, optax, orbax and torch are the machine's own).
#   bash bench/gpu_run.sh OUTDIR [STAGE...]    stages: attention full small (default: all)
set -u
out=${1:-/tmp/gpu_bench}
shift
stages=${*:-attention full small}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, diffusers; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'orbax', o.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__); \
print(jax.devices())"
run() { echo "== $*"; local t=$SECONDS; "$@" 2>&1 | tee -a "$out/log.txt"; echo "   ($((SECONDS - t)) s)"; }
for stage in $stages; do
  case $stage in
    attention) run python3 bench/attention_speed.py --batch=32 --out="$out/attention.json" ;;
    full) run python3 bench/train_speed.py --sizes=full --batch=32 --steps=10 \
      --attention=auto,vd --out="$out/train_full.json" ;;
    small) run python3 bench/train_speed.py --sizes=tiny,small --batch=8 --steps=10 \
      --attention=auto --out="$out/train_small.json" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
