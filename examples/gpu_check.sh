#!/usr/bin/env bash
# Check gpt2np on your GPU machine, offline: the CuPy backend on real hardware in one command.
#
#   python examples/gpu_prepare.py                  # where PyPI is reachable: fills .gpu_bundle/
#   bash examples/gpu_check.sh [--bundle DIR] [--out DIR]      # on the GPU machine, no network
#
# Parts, in order (install and env always run; PARTS picks the others):
#   install  the wheels that gpu_prepare.py put into BUNDLE/wheels, into a scratch --target
#   env      GPU, versions, the offline tokenizer, the data
#   tests    the GPU tests on the hardware (tests/test_cupy.py, tests/test_cupy_kernels.py)
#   train    a short GPT-2-sized (124M) bf16 training on tiny Shakespeare: the loss must fall
#   bench    GPT-2 124M B=16 T=1024 bf16: gpt2np-cupy against torch compiled (--compare)
#   attention, profile   flash attention alone; one bf16 step layer by layer
#   bench_tf32, bench_fp32 (no --compare), bench_noflash (bf16, GPT2NP_FLASH=0): only when
#            named in PARTS, e.g.  PARTS="bench bench_tf32 bench_fp32" bash examples/gpu_check.sh
#
# Every part runs under its own `timeout` (SIGINT, so pytest still prints its summary; KILL
# 20 s later), cut further so that the whole check ends within BUDGET seconds. The output
# folder (--out) ends with three files: summary.txt (every part's verdict first, then its key
# figures; also printed last), bench.json (all benchmark figures) and logs.tar.gz (every log,
# the training's log.jsonl). They are rewritten after each part, and the part in progress logs
# to OUT/<part>.log, so a check stopped from outside (Ctrl-C, a job's time limit) still leaves
# what it did. Training outputs (checkpoint, plot) stay in WORK.
#
# Flags: --bundle DIR  what gpu_prepare.py made (default .gpu_bundle in the checkout)
#        --out DIR     the output folder (default out/gpu_check in the checkout)
# Knobs (environment): WORK (scratch, emptied first; default /tmp/gpu_check), PARTS (default
# "tests train bench attention profile"; "none": install and env only), BUDGET (seconds,
# default 540: under ten minutes in all), PYTHON (default python3; may be a command with
# arguments, e.g. the CUDA simulator's tests/cuda_sim/simpython.py), PRESET (gpt2, or tiny: a
# 1-layer model for the simulator), COMPARE (1: bench against torch), TESTS (pytest
# arguments), STEPS (timed bench steps), TRAIN_STEPS. Tiny Shakespeare: the bundle's copy,
# else $GPT2NP_DATA.
set -uo pipefail
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
BUNDLE=.gpu_bundle OUT=out/gpu_check
while (( $# )); do
    case "$1" in
        --bundle|--out)
            (( $# >= 2 )) || { echo "error: $1 needs a folder" >&2; exit 2; }
            # a folder named by the user is relative to where the user is
            if [ "$1" = --bundle ]; then BUNDLE="$(realpath -m -- "$2")"; else OUT="$(realpath -m -- "$2")"; fi
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (flags: --bundle DIR, --out DIR; knobs: see --help)" >&2
           exit 2 ;;
    esac
done
WORK="$(realpath -m -- "${WORK:-/tmp/gpu_check}")"
cd "$(dirname "$0")/.."
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
if [[ "$WORK" == / || "$(realpath .)/" == "$WORK/"* || "$(realpath -m "$OUT")/" == "$WORK/"* ]]; then
    echo "error: WORK=$WORK is emptied first: choose a folder holding neither the checkout nor --out" >&2
    exit 2
fi
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$OUT" || exit 1
rm -f "$OUT"/summary.txt "$OUT"/bench.json "$OUT"/logs.tar.gz "$OUT"/*.log
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg \
    GPT2NP_CACHE="$WORK/cache" PYTHONDONTWRITEBYTECODE=1 \
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

# the data: the bundle's copy, else $GPT2NP_DATA
for d in "$BUNDLE/data/tinyshakespeare.txt" "${GPT2NP_DATA:-}"; do
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
    report  # a check stopped from outside says which part it was in
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

wheels=("$BUNDLE"/wheels/*.whl)
if [ -e "${wheels[0]}" ]; then
    # no pip configuration either (its find-links, index): exactly these files, offline
    run_part install 90 env PIP_CONFIG_FILE=/dev/null "${PY[@]}" -m pip install --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$WORK/site" "${wheels[@]}"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
    skip install "no $BUNDLE/wheels/*.whl: run python examples/gpu_prepare.py where PyPI is reachable, and pass its folder as --bundle"
fi
run_part env 60 "${PY[@]}" examples/gpu_check_report.py env

SIZES=(--n-layer "$N_LAYER" --n-head "$N_HEAD" --n-embd "$N_EMBD")
want tests && run_part tests 180 "${PY[@]}" -m pytest -q -p no:cacheprovider --durations=5 \
    "${TEST_ARGS[@]}"
if want train; then
    if [ -n "${GPT2NP_DATA:-}" ]; then
        # eval on 4 batches; one checkpoint (at the end), outside OUT; log.jsonl to the logs
        run_part train 180 "${PY[@]}" examples/train_shakespeare.py --backend cupy --precision bf16 \
            "${SIZES[@]}" --block-size "$T" --batch-size "$TRAIN_B" --vocab-size 50304 --lr "$LR" \
            --warmup-steps "$WARMUP" --max-steps "$TRAIN_STEPS" --eval-interval "$EVAL_INTERVAL" \
            --eval-batches 4 --save-interval "$TRAIN_STEPS" --num-samples 1 --sample-tokens 32 \
            --no-progress --overwrite --out-dir "$WORK/train" --cache-dir "$WORK/cache"
        cp "$WORK/train/log.jsonl" "$WORK/logs/train_log.jsonl" 2>/dev/null && report
    else
        skip train "no tiny Shakespeare: run python examples/gpu_prepare.py (its bundle holds it) or set GPT2NP_DATA"
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
