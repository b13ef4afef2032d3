#!/usr/bin/env bash
# One command for a GPU machine: every cuda-marked test and every benchmark on --device,
# written to one report file. Works without torch-pruning installed and without network:
# pat is installed from this working tree with --no-deps into a temporary target, and
# torch-pruning (and pytest, if missing) come from wheel files given with --wheel.
#
#   benchmarks/gpu_check.sh [--device cuda] [--wheel torch_pruning-*.whl ...] [--report FILE] [--quick]
#
# With --device cuda on a machine without CUDA it reports the skip and exits 0. --quick
# shrinks every benchmark (the suite runs it with --device cpu --quick as a smoke test).
set -u
DEVICE=cuda; REPORT=gpu_check_report.txt; QUICK=0; WHEELS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --report) REPORT="$2"; shift 2 ;;
    --wheel) WHEELS+=("$2"); shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
TARGET="$(mktemp -d)"
trap 'rm -rf "$TARGET"' EXIT
for wheel in "${WHEELS[@]+"${WHEELS[@]}"}"; do
  [ -f "$wheel" ] || { echo "gpu_check.sh: --wheel '$wheel' is not a file" >&2; exit 2; }
  "$PY" -m pip install --quiet --no-deps --no-index --target "$TARGET" "$wheel" || exit 2
done
if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --target "$TARGET" "$ROOT" 2>/dev/null; then
  cp -r "$ROOT/pat" "$TARGET/pat"  # no build backend here: the package is pure Python
fi
export PYTHONPATH="$TARGET:$ROOT"
: > "$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }
say "pat gpu_check: $(date -u +%FT%TZ), device $DEVICE, $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "SKIPPED: --device cuda but CUDA is not available here."
  exit 0
fi
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$REPORT"
"$PY" -c "import torch_pruning" 2>/dev/null || say "WARNING: torch-pruning is not importable; pass --wheel torch_pruning-*.whl"
FAILED=0
run() {  # run NAME COMMAND...: append its output to the report, note a failure
  say ""; say "== $1"; shift
  local start=$SECONDS
  (cd "$ROOT" && "$@") >> "$REPORT" 2>&1 || { FAILED=1; say "FAILED: $*"; }
  say "($((SECONDS - start)) s)"
}
if "$PY" -c "import pytest" 2>/dev/null; then
  if [ "$DEVICE" = cuda ]; then
    run "cuda tests" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
  else
    say ""; say "== cuda tests: SKIPPED (no CUDA device asked for)"
  fi
else
  say ""; say "== cuda tests: SKIPPED (pytest is not installed; pass its wheel with --wheel)"
fi
if [ "$QUICK" = 1 ]; then
  run "packed" "$PY" benchmarks/packed.py --device "$DEVICE" --models lenet-s --batch 16 --repeats 1
  run "together" "$PY" benchmarks/together.py --device "$DEVICE" --models lenet-s --kinds packed --epochs 1 --train-size 256 --repeats 1
  run "throughput" "$PY" benchmarks/throughput.py --device "$DEVICE" --model resnet8 --steps 2 --batch 16
else
  run "masks" "$PY" benchmarks/masks.py --device "$DEVICE"
  run "masked step" "$PY" benchmarks/masked_step.py
  run "data loader" "$PY" benchmarks/data_loader.py --device "$DEVICE"
  run "ensemble inference" "$PY" benchmarks/ensemble_inference.py --device "$DEVICE"
  run "packed" "$PY" benchmarks/packed.py --device "$DEVICE" --channels-last
  run "together" "$PY" benchmarks/together.py --device "$DEVICE" --train-size 8192
  run "throughput" "$PY" benchmarks/throughput.py --device "$DEVICE"
fi
say ""; say "report: $REPORT"
exit $FAILED
