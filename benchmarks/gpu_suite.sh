#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one script, for a machine that has Python 3.12,
# torch and transformers but none of hybridflow's other dependencies and no network (the
# single-H100 test machine). Prepare, in the repository root of a machine with network:
#     make gpu-wheels          # .whl/: tensordict, omegaconf, megatron-core, ... for Python 3.12
# then, in the repository root of the GPU machine, with .whl/ carried along (it is git-ignored),
# one line per call (each about 5-8 minutes on one H100, by estimate: never run there yet):
#     bash benchmarks/gpu_suite.sh check rollout
#     bash benchmarks/gpu_suite.sh update
#     bash benchmarks/gpu_suite.sh step
# Parts:
#   check    versions, GPU memory, and the GPU-only tests (CUDA-graph rollout == eager rollout ==
#            trainer log-probs; packed / flex-attention / compiled updates == padded update)
#   rollout  generate (hf) vs the static-cache rollout with CUDA graphs, then without graphs
#   update   actor update: padded / packed / packed with flex attention, with gradient
#            checkpointing; then without it, also with compiled decoder layers
#   step     whole GRPO and PPO steps with the static rollout, per stage (hf vs static
#            generation is compared by the rollout part)
# Every part writes <part>*.json and <part>.log into $OUT (default ./gpu_results) and goes on after
# a failure; the exit code is the number of failed commands.
# SMOKE=1 runs every part on the tiny CI config instead of the Qwen2-0.5B shape: a check of this
# script on any machine, not a measurement.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SITE="${HYBRIDFLOW_SITE:-/tmp/hybridflow_site}"
STAGE="${HYBRIDFLOW_STAGE:-/tmp/hybridflow_stage}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

# Dependencies: the wheels of .whl/ (make gpu-wheels) into $SITE.
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl \
    || { echo "gpu_suite: installing .whl/ failed" >&2; exit 100; }
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# hybridflow itself: an installed copy (pip install -e .) if there is one, else the source tree laid
# out as the wheel installs it (workers/ -> hybridflow/workers, trainer/ -> hybridflow/trainer,
# recipes/ -> hybridflow/recipes), with the benchmarks, tests and recipes beside it.
cd "$ROOT"
if ! "$PY" -c "import hybridflow.workers, hybridflow.trainer" 2> /dev/null; then
  rm -rf "$STAGE" && mkdir -p "$STAGE"
  cp -r hybridflow "$STAGE/hybridflow" && cp -r workers "$STAGE/hybridflow/workers" \
    && cp -r trainer "$STAGE/hybridflow/trainer" && cp -r recipes "$STAGE/hybridflow/recipes" \
    && cp -r benchmarks tests recipes pytest.ini "$STAGE/" \
    || { echo "gpu_suite: staging the source tree failed" >&2; exit 100; }
  cd "$STAGE"
  "$PY" -c "import hybridflow.workers, hybridflow.trainer, tensordict, omegaconf" \
    || { echo "gpu_suite: hybridflow does not import (missing .whl/? run make gpu-wheels)" >&2; exit 100; }
fi

if [ "${SMOKE:-0}" = 1 ]; then  # flex attention has no backward on CPU: no packed_flex variant there
  CFG=benchmarks/configs/tiny.yaml ROWS=8 MB=4 FLEX= FLEX_COMPILED= TESTS=(tests/workers/test_gpu_paths.py)
else
  CFG=benchmarks/configs/qwen2-0.5b.yaml ROWS=256 MB=16 FLEX=,packed_flex FLEX_COMPILED=,packed_flex_compiled
  # only the GPU test of test_rollout_static.py: its other tests are CPU references (fp32 engine,
  # eager decode, atol 1e-5; one needs pyarrow) and fail by design on a bf16 CUDA engine
  TESTS=(tests/workers/test_gpu_paths.py tests/workers/test_rollout_static.py::test_cuda_graph_equals_eager_on_gpu)
fi
FAILED=0

run() {  # run LOG CMD...: CMD's output to the screen and to $OUT/LOG
  local log="$OUT/$1"; shift
  echo "+ $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "gpu_suite: FAILED ($rc): $*" | tee -a "$log"; FAILED=$((FAILED + 1)); }
}

part_check() {
  run check.log "$PY" -c "import sys, torch, transformers, tensordict; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'tensordict', tensordict.__version__); print('cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), torch.version.cuda)"
  command -v nvidia-smi > /dev/null && run check.log nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv
  run check.log "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider -rs --junitxml "$OUT/check_tests.xml"
}

part_rollout() {
  run rollout.log "$PY" -m benchmarks.rollout_throughput --backends hf,static --config "$CFG" --warmup 1 --reps 3 \
    --out "$OUT/rollout.json"
  run rollout.log "$PY" -m benchmarks.rollout_throughput --backends static --config "$CFG" --warmup 1 --reps 2 \
    rollout.static.cuda_graph=false --out "$OUT/rollout_eager.json"
}

part_update() {
  run update.log "$PY" -m benchmarks.engine_update --config "$CFG" --rows "$ROWS" --micro-batch-size "$MB" --steps 3 \
    --gradient-checkpointing --variants "padded,packed$FLEX" --out "$OUT/update_gc.json"
  run update.log "$PY" -m benchmarks.engine_update --config "$CFG" --rows "$ROWS" --micro-batch-size "$MB" --steps 3 \
    --variants "padded,compiled$FLEX$FLEX_COMPILED" --out "$OUT/update_nogc.json"
}

part_step() {
  run step.log "$PY" -m benchmarks.rlhf_step --config "$CFG" rollout.backend=static --out "$OUT/step_grpo_static.json"
  run step.log "$PY" -m benchmarks.rlhf_step --config "$CFG" --algo ppo rollout.backend=static --out "$OUT/step_ppo_static.json"
}

[ $# -gt 0 ] || set -- check rollout update step
for part in "$@"; do
  case "$part" in
    check|rollout|update|step) echo "=== $part ($(date -u +%H:%M:%S))"; "part_$part" ;;
    *) echo "gpu_suite: unknown part '$part' (check, rollout, update, step)" >&2; FAILED=$((FAILED + 1)) ;;
  esac
done
echo "gpu_suite: done, $FAILED failed command(s); results in $OUT"
exit "$FAILED"
