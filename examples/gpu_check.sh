#!/usr/bin/env bash
# The CuPy backend on a real NVIDIA GPU, in one device call of at most 10 minutes:
#   install  the wheels that examples/gpu_prepare.py put into $CARRY/wheels (scratch --target)
#   env      GPU, versions, the offline tokenizer, the data
#   tests    the GPU tests on hardware (tests/test_cupy.py, tests/test_cupy_kernels.py)
#   train    a short GPT-2-sized (124M) bf16 training on tiny Shakespeare: the loss must fall
#   bench    GPT-2 124M B=16 T=1024 bf16: gpt2np-cupy against torch compiled (--compare)
#   attention, profile   flash attention alone; one bf16 step layer by layer
# Only when named in PARTS: bench_tf32, bench_fp32 (no --compare), bench_noflash (bf16,
# GPT2NP_FLASH=0).
#
#   python examples/gpu_prepare.py      # here, with PyPI: fills .gpu_carry/ (git-ignored)
#   bash examples/gpu_check.sh          # there: device run(..., carry=[".gpu_carry"], timeout_s=600)
#   PARTS="bench bench_tf32 bench_fp32" bash examples/gpu_check.sh
#
# Expected on an H200 (README, "On an NVIDIA GPU"): ~5 minutes for the default. Every part runs
# under its own `timeout` (SIGINT: pytest still prints its summary; KILL 20 s later), cut
# further so that all parts end within BUDGET seconds. At the end $OUT holds 3 files:
# summary.txt (every part's verdict first, then key figures; also printed last), bench.json
# (all bench figures), logs.tar.gz (every log, the training's log.jsonl); they are rewritten
# after each part, and the part in progress logs to $OUT/<part>.log, so a killed run still
# brings back what it did. Training outputs (checkpoint, plot) stay in $WORK.
#
# Knobs (environment): OUT (default out/gpu_check), WORK (/tmp/gpu_check, emptied), CARRY
# (.gpu_carry), PARTS, BUDGET (seconds, default 540), PYTHON (default python3; may be a
# command with arguments, e.g. the CUDA simulator's tests/cuda_sim/simpython.py), PRESET
# (gpt2, or tiny: a 1-layer model for the simulator), COMPARE (1: bench against torch),
# TESTS (pytest arguments), STEPS (timed bench steps), TRAIN_STEPS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
WORK="${WORK:-/tmp/gpu_check}"
CARRY="${CARRY:-.gpu_carry}"
BUDGET="${BUDGET:-540}"
PARTS="${PARTS:-tests train bench attention profile}"  # "none": install and env only
read -ra PY <<< "${PYTHON:-python3}"
HOST_PY="${PY[0]}"  # the summary needs no GPU (nor the simulator)

case "${PRESET:-gpt2}" in
    gpt2) N_LAYER=12 N_HEAD=12 N_EMBD=768 VOCAB=50304 T=1024 B=16 TRAIN_B=8 STEPS="${STEPS:-10}"
          TRAIN_STEPS="${TRAIN_STEPS:-40}" EVAL_INTERVAL=20 LR=6e-4 WARMUP=5 ;;
    tiny) N_LAYER=1 N_HEAD=2 N_EMBD=32 VOCAB=256 T=16 B=2 TRAIN_B=2 STEPS="${STEPS:-1}"
          TRAIN_STEPS="${TRAIN_STEPS:-6}" EVAL_INTERVAL=3 LR=1e-2 WARMUP=1 ;;
    *) echo "error: PRESET=${PRESET} is not one of: gpt2 tiny" >&2; exit 2 ;;
esac
if [ "${COMPARE:-1}" = 1 ]; then COMPARE_FLAG=(--compare); else COMPARE_FLAG=(); fi
read -ra TEST_ARGS <<< "${TESTS:-tests/test_cupy.py tests/test_cupy_kernels.py}"

want() { [[ " $PARTS " == *" $1 "* ]]; }
plan=(install env)
for p in tests train bench attention profile bench_tf32 bench_fp32 bench_noflash; do
    want "$p" && plan+=("$p")
done
for p in $PARTS; do
    [[ " ${plan[*]} none " == *" $p "* ]] || { echo "error: unknown part '$p' in PARTS" >&2; exit 2; }
done

[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "error: BUDGET=$BUDGET is not a number of seconds" >&2; exit 2; }
w="$(realpath -m "$WORK")"
if [[ "$w" == / || "$(realpath .)/" == "$w/"* || "$(realpath -m "$OUT")/" == "$w/"* ]]; then
    echo "error: WORK=$WORK is emptied first: choose a folder holding neither the checkout nor OUT" >&2
    exit 2
fi
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$OUT" || exit 1
rm -f "$OUT"/summary.txt "$OUT"/bench.json "$OUT"/logs.tar.gz "$OUT"/*.log
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg \
    GPT2NP_CACHE="$WORK/cache" PYTHONDONTWRITEBYTECODE=1 \
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

# the data: the carried copy, else $GPT2NP_DATA, else the shared copy beside the checkout
for d in "$CARRY/data/tinyshakespeare.txt" "${GPT2NP_DATA:-}" ../shared/data/tinyshakespeare.txt; do
    if [ -n "$d" ] && [ -f "$d" ]; then export GPT2NP_DATA="$(realpath "$d")"; break; fi
done
[ -f "${GPT2NP_DATA:-}" ] || unset GPT2NP_DATA

T0=$SECONDS
report() { "$HOST_PY" examples/gpu_check_report.py summary --work "$WORK" --out "$OUT" "$@"; }
record() {  # name verdict rc seconds limit what
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/parts.tsv"
}
run_part() {  # name limit command...: run it bounded, log it, record its verdict
    local name="$1" limit="$2"; shift 2
    local left=$((BUDGET - (SECONDS - T0)))
    if (( left < 15 )); then
        record "$name" SKIP - 0 "$limit" "no time left of BUDGET=$BUDGET s"
        echo "== $name: SKIP (no time left)"; report; return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit $limit s): $*"
    echo "$name" > "$WORK/running.txt"
    report  # a run killed from outside says which part it was in
    local t0=$SECONDS rc
    timeout -s INT -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    mv "$OUT/$name.log" "$WORK/logs/$name.txt"
    rm -f "$WORK/running.txt"
    local verdict=PASS
    if (( rc == 124 || rc == 137 )); then verdict=TIMEOUT; elif (( rc != 0 )); then verdict=FAIL; fi
    record "$name" "$verdict" "$rc" "$((SECONDS - t0))" "$limit" "$*"
    echo "   $verdict (rc $rc) in $((SECONDS - t0)) s"
    report
}
skip() { record "$1" SKIP - 0 0 "$2"; echo "== $1: SKIP ($2)"; report; }

echo "${plan[*]}" > "$WORK/plan.txt"
report

wheels=("$CARRY"/wheels/*.whl)
if [ -e "${wheels[0]}" ]; then
    # no pip configuration either (its find-links, index): exactly these files, offline
    run_part install 90 env PIP_CONFIG_FILE=/dev/null "${PY[@]}" -m pip install --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$WORK/site" "${wheels[@]}"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
    skip install "no $CARRY/wheels/*.whl: run python examples/gpu_prepare.py where PyPI is reachable, and carry $CARRY"
fi
run_part env 60 "${PY[@]}" examples/gpu_check_report.py env

SIZES=(--n-layer "$N_LAYER" --n-head "$N_HEAD" --n-embd "$N_EMBD")
want tests && run_part tests 180 "${PY[@]}" -m pytest -q -p no:cacheprovider --durations=5 \
    "${TEST_ARGS[@]}"
if want train; then
    if [ -n "${GPT2NP_DATA:-}" ]; then
        # eval on 4 batches; one checkpoint (at the end), outside $OUT; log.jsonl to the logs
        run_part train 180 "${PY[@]}" examples/train_shakespeare.py --backend cupy --precision bf16 \
            "${SIZES[@]}" --block-size "$T" --batch-size "$TRAIN_B" --vocab-size 50304 --lr "$LR" \
            --warmup-steps "$WARMUP" --max-steps "$TRAIN_STEPS" --eval-interval "$EVAL_INTERVAL" \
            --eval-batches 4 --save-interval "$TRAIN_STEPS" --num-samples 1 --sample-tokens 32 \
            --no-progress --overwrite --out-dir "$WORK/train" --cache-dir "$WORK/cache"
        cp "$WORK/train/log.jsonl" "$WORK/logs/train_log.jsonl" 2>/dev/null && report
    else
        skip train "no tiny Shakespeare: run python examples/gpu_prepare.py and carry $CARRY"
    fi
fi
bench() {  # name limit precision [flags...]
    local name="$1" limit="$2" prec="$3"; shift 3
    run_part "$name" "$limit" "${PY[@]}" examples/bench.py --backend cupy "$@" "${SIZES[@]}" \
        --vocab-size "$VOCAB" --block-size "$T" --seq-len "$T" -B "$B" --precision "$prec" \
        --steps "$STEPS" --json "$WORK/logs/$name.json"
}
want bench && bench bench 240 bf16 "${COMPARE_FLAG[@]}"
want attention && run_part attention 90 "${PY[@]}" examples/bench_attention.py --backend cupy \
    -B "$B" --n-head "$N_HEAD" -T "$T" --head-size $((N_EMBD / N_HEAD)) --json "$WORK/logs/attention.json"
want profile && run_part profile 90 "${PY[@]}" examples/profile_step.py --backend cupy "${SIZES[@]}" \
    --vocab-size "$VOCAB" -T "$T" -B "$B" --precision bf16 --steps 3
want bench_tf32 && bench bench_tf32 120 tf32
want bench_fp32 && bench bench_fp32 150 fp32
want bench_noflash && { export GPT2NP_FLASH=0; bench bench_noflash 120 bf16; unset GPT2NP_FLASH; }

echo "== done in $((SECONDS - T0)) s: $OUT/summary.txt, $OUT/bench.json, $OUT/logs.tar.gz"
report --print
