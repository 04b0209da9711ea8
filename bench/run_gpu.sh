#!/usr/bin/env bash
# One-shot GPU check: make pyflex.kernels importable, run the GPU tests, the op microbenchmarks, then the
# whole-step profile of bench/profile_model.py. Everything it reports goes under $OUT (default runs/gpu).
#
#   OUT=/tmp/gpu bash bench/run_gpu.sh            # full benchmark
#   OUT=/tmp/gpu bash bench/run_gpu.sh --quick    # one training shape, r=16
#   OUT=/tmp/gpu bash bench/run_gpu.sh --sweep    # block-size sweep of the Triton kernels
#   PYFLEX_GPU_INSTALL=1 ...                      # pip install -e . (builds the C++ extension too)
#   PYFLEX_SKIP_TESTS=1 / PYFLEX_SKIP_BENCH=1 / PYFLEX_SKIP_PROFILE=1   # skip a stage
#   PYFLEX_PROFILE_METHODS=hf_floor,pyflex_lora   # methods of the profile stage (default below)
# Wheels in .whl/ (e.g. liger-kernel for pyflex_lora_fused on a machine without network) are installed first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1
} | tee "$OUT/env.txt"

# pyflex.kernels imports from a checkout (pyflex/kernels is a symlink to kernels/); the editable install also
# builds the C++ extension, which the GPU tests do not need.
if [ "${PYFLEX_GPU_INSTALL:-0}" = "1" ]; then
  pip install --no-build-isolation --no-deps -e . > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl > /dev/null 2>&1; then
  pip install --no-index --no-deps --target /tmp/pyflex_site .whl/*.whl > "$OUT/pip_whl.log" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:/tmp/pyflex_site" || echo "installing .whl/ failed (see pip_whl.log)"
fi
python -c "import pyflex.kernels.flex_lora as f; print('kernels at', f.__file__)" | tee -a "$OUT/env.txt"

status=0
if [ "${PYFLEX_SKIP_TESTS:-0}" != "1" ]; then
  xdist=""
  python -c "import xdist" 2>/dev/null && xdist="-n 8"  # parallel workers share Triton's compile cache
  timeout "${PYFLEX_TEST_TIMEOUT:-300}" python -m pytest tests/kernels/test_flex_lora_kernels.py tests/lora/test_op_launches.py -q $xdist -p no:cacheprovider \
    --durations=5 > "$OUT/tests.txt" 2>&1 || status=$?
  if [ -f tests/lora/test_backend_contract.py ]; then  # the op-level tests, triton backend
    timeout "${PYFLEX_TEST_TIMEOUT:-300}" python -m pytest tests/lora/test_backend_contract.py -k triton -q $xdist \
      -p no:cacheprovider >> "$OUT/tests.txt" 2>&1 || status=$?
  fi
  # GPU-only model-level checks: liger composition numerics, gated-MLP recompute, patched models on CUDA
  timeout "${PYFLEX_TEST_TIMEOUT:-300}" python -m pytest tests/integrations/test_liger.py tests/layers/test_gated_mlp.py -q \
    -p no:cacheprovider >> "$OUT/tests.txt" 2>&1 || status=$?
  grep -E "passed|failed|FAILED|Error" "$OUT/tests.txt" | tail -25
fi
if [ "${PYFLEX_SKIP_BENCH:-0}" != "1" ]; then
  python bench/bench_gpu_flex_lora.py --out "$OUT/bench.json" "$@" 2> "$OUT/bench.err" | tee "$OUT/bench.txt"
  tail -5 "$OUT/bench.err"
  python bench/bench_gpu_gated_act.py --out "$OUT/gated_act.json" 2>> "$OUT/bench.err" | tee "$OUT/gated_act.txt"
  # op vs kernels alone at 4096²: per-kernel GPU time and GPU-busy fraction (CUDA traces in $OUT/trace)
  python bench/bench_gpu_flex_lora.py --trace "$OUT/trace" --out "$OUT/trace.json" 2>> "$OUT/bench.err" \
    | tee "$OUT/trace.txt"
fi
if [ "${PYFLEX_SKIP_PROFILE:-0}" != "1" ]; then
  methods=${PYFLEX_PROFILE_METHODS:-hf_floor,pyflex_lora,pyflex_lora_norecompute,pyflex_tau,pyflex_lora_fused,peft_bf16,ist}
  python bench/profile_model.py --methods "$methods" --warmup 2 --steps 6 --out "$OUT/profile" \
    > "$OUT/profile.txt" 2> "$OUT/profile.err" || status=$?
  tail -14 "$OUT/profile.txt"; tail -3 "$OUT/profile.err"
fi
exit $status
