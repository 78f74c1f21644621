#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU-path tests, then the train-step, memory, inference and matching benches.
#
#   bash bench/device_check.sh OUT_DIR      # wheels for the packages the machine's image lacks in .whl/ (see below)
#
# The machine runs its own image's python3 and JAX (not requirements.txt's pins). The packages its image lacks
# (grain, ml_collections, array_record, portpicker, hotcoco, tensorboardX) travel as wheels in .whl/ (git-ignored;
# pass it in the run's carry); the image's flax is kept (2026-12-04: flax 0.12.10 beside jax 0.11.2 there; our pin,
# flax 0.12.8, fails to import under jax 0.11.2). Fetch the wheels here with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     grain==0.2.18 ml_collections==1.1.0 array_record==0.8.6 hotcoco==1.3.0 portpicker==1.6.0 \
#     tensorboardX==2.6.5
# Each stage has its own time limit, so one that hangs or fails leaves the others their time; every stage's output
# goes to OUT_DIR/log.txt and its figures to OUT_DIR/*.json.
set -uo pipefail
out=${1:?usage: bench/device_check.sh OUT_DIR}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import jax, flax, grain, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"

stage() {  # stage SECONDS NAME COMMAND...: run with a time limit, report its exit status and wall time.
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  echo "=== $name: exit $? in $((SECONDS - start)) s"
}

# The tests of the code whose GPU path differs from the CPU's (panoptic_jax/ops/dispatch.py: lax convolutions and
# matmuls, no fusion barriers, one post-processing block) or whose numerics the GPU's matmuls could move: float32
# matmuls at full precision here, as the tests' tolerances assume; training below runs at JAX's default GPU precision.
JAX_PLATFORMS=cuda XLA_FLAGS= JAX_DEFAULT_MATMUL_PRECISION=highest stage 120 "GPU tests" \
  python3 -m pytest -q -p no:cacheprovider tests/ops tests/model tests/inference tests/training/test_losses.py \
  tests/training/test_matching.py tests/training/test_memorise.py

stage 130 "train step 641 b2 (the port's setting)" \
  python3 bench/train.py --parts throughput --steps 8 --throughput_variants plain bf16 --out "$out/train_641.json"
stage 90 "train step 1281, 8 images (the recipe's per-device batch), bf16" \
  python3 bench/train.py --parts throughput --size 1281 --batch 8 --steps 5 --throughput_variants bf16 \
  --out "$out/train_1281.json"
stage 75 "train-step memory, COCO recipe 1281, 8 per device" \
  python3 bench/train.py --parts memory --per_device 8 --variants plain bf16 --out "$out/memory.json"
# The first GPU compile of the inference program autotunes its convolutions: over 60 s for 641 + 1281 on an H200.
stage 110 "inference 641 / 1281" python3 bench/model.py --sizes 641 1281 --iters 5 --out "$out/model.json"
stage 25 "matching" python3 bench/matching.py
