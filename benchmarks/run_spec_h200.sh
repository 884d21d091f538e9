#!/usr/bin/env bash
# Speculative decoding on ONE H200 (issue 16, item 3), about 6-8 minutes in all:
#  1. `mogelm train` of a ~1B-active MoGE model (hidden 2048, 16 layers, 16/4 heads of 128, 16 experts
#     of 512 in 8 groups, top-8, shared 2048, vocab 32768: 0.91 B active, 1.31 B in all; the 0.91B
#     config of benchmarks/bench_train.py with 16 instead of 64 experts, so the checkpoint
#     (weights + AdamW state, fp32) is ~16 GB instead of ~45 GB on /tmp) with --mtp-depth 1 on the
#     first 6 MB of the embedded corpus: STEPS (350) steps of 16 x 1,024 tokens, ~2-3 minutes
#     (killed after TRAIN_TIMEOUT = 270 s: then only the 72B section runs);
#     the checkpoint goes to $CKPT_DIR/final (default /tmp/spec_1b);
#  2. benchmarks/bench_spec_decode.py: decode tokens/s with and without drafts (n-gram, MTP; k = 1..3)
#     at batch 1, 16, 64, 256 on held-out prompts (documents past the 6 MB), greedy, plus acceptance;
#     the 72B layout's verify cost per draft length (random weights, fp8 experts, 2 and 4 layers
#     scaled to 48) and the predicted speedup. ~3-4 minutes (no new measurement after 240 s).
# Writes $OUT/train.log, $OUT/bench.log, $OUT/bench_spec_decode.json (table at the end of bench.log).
#
# Knobs (environment): STEPS, TRAIN_TIMEOUT, BENCH_BUDGET (s), SECTIONS (engine,verify72b), BATCHES
# (1,16,64,256), KS (draft lengths forced, 1,2,3), GEN (new tokens per request, 128).
#
#   OUT=benchmarks/results/spec_h200_$(date +%F) bash benchmarks/run_spec_h200.sh
#   OUT=/tmp/s QUICK=1 bash benchmarks/run_spec_h200.sh       # CPU dry run of both steps (toy sizes)
set -u
OUT=${OUT:?set OUT to the folder for the results}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
CKPT_DIR=${CKPT_DIR:-/tmp/spec_1b}
STEPS=${STEPS:-350}
MAX_BYTES=${MAX_BYTES:-6000000}
t0=$(date +%s)

if [ -n "${QUICK:-}" ]; then
    export TRITON_INTERPRET=1
    MODEL=(--preset debug) STEPS=${QUICK_STEPS:-4} MAX_BYTES=200000
    TRAIN=(--seq-len 64 --batch-size 4 --device cpu)
    BENCH=(--quick --device cpu --batches 1,2)
else
    export TRITON_INTERPRET=0
    CFG="$CKPT_DIR.config.json"
    mkdir -p "$(dirname "$CFG")"
    $PY - "$CFG" <<'EOF'
import json, sys
from mogelm.config import ModelConfig
cfg = ModelConfig(vocab_size=32768, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=128,
                  rope_theta=1.6e7, max_seq_len=2048, num_experts=16, num_groups=8, num_experts_per_tok=8,
                  moe_intermediate_size=512, shared_expert_intermediate_size=2048, name="spec-0.91b-active")
json.dump(cfg.to_dict(), open(sys.argv[1], "w"))
EOF
    MODEL=(--config "$CFG")
    TRAIN=(--seq-len 1024 --batch-size 16 --lr 1e-3 --device cuda)
    BENCH=(--max-bytes "$MAX_BYTES" --budget-s "${BENCH_BUDGET:-240}" --sections "${SECTIONS:-engine,verify72b}"
           --batches "${BATCHES:-1,16,64,256}" --ks "${KS:-1,2,3}" --gen-tokens "${GEN:-128}")
fi

echo "== train: $STEPS steps (log: $OUT/train.log)"
rm -rf "$CKPT_DIR"
timeout "${TRAIN_TIMEOUT:-270}" $PY -m mogelm train "${MODEL[@]}" --mtp-depth 1 --mtp-weight 0.3 \
    --max-bytes "$MAX_BYTES" --max-steps "$STEPS" "${TRAIN[@]}" --eval-every 200 --eval-batches 4 \
    --save-every 100000 --out "$CKPT_DIR" --progress lines >"$OUT/train.log" 2>&1
rc=$?
tail -n 5 "$OUT/train.log"
echo "== train exit $rc after $(( $(date +%s) - t0 )) s"

if [ -f "$CKPT_DIR/final/config.json" ]; then
    echo "== bench on $CKPT_DIR/final (log: $OUT/bench.log)"
    $PY benchmarks/bench_spec_decode.py --ckpt "$CKPT_DIR/final" --out "$OUT" "${BENCH[@]}" 2>&1 | tee "$OUT/bench.log"
else
    echo "== no trained checkpoint: the 72B verify costs only (log: $OUT/bench.log)"
    $PY benchmarks/bench_spec_decode.py --sections verify72b --out "$OUT" ${QUICK:+--quick --device cpu} \
        2>&1 | tee "$OUT/bench.log"
fi
echo "== done in $(( $(date +%s) - t0 )) s; results in $OUT"
