#!/usr/bin/env bash
# The issue-14 stage-2 GPU run on one H200 in one call (about 6 minutes; every step under its own
# timeout, 7.7 minutes at most), results in $OUT (7 files, one level):
#
#   gpu_tests.log       pytest -m gpu of the new tests: fused kernels vs fp64, graphed fused fp8
#                       decode vs eager, one 72B-width decode row with its breakdown         <= 80 s
#   tuning.json         mogelm bench decode --sections tune: tile sweeps of the routed experts
#                       (bf16, fp8 weight-only) at T = 1..512 and of the fp8 small-M dense kernel,
#                       W8A8 vs weight-only per size                                         <= 60 s
#   bench_decode.json   mogelm bench decode --sections hf,decode --tuning tuning.json: the
#                       transformers baseline, then 48 layers fp8-all, batch 1/16/64/128/256 and
#                       the largest that fits, ctx 2048, e4m3 then bf16 KV                    <= 140 s
#   bench_prefill.json  mogelm bench prefill: one 2,048-token prompt; 64 x 512, 48 layers    <= 60 s
#   run.log             stdout/stderr of the three bench commands, in order
#   serve.log           benchmarks/run_serve_h200.sh: mogelm serve --random-weights + bench serve
#   bench_serve.json    (256 requests, 1,024-token prompts, 256 new tokens)                   <= 120 s
#
#   OUT=/tmp/out bash benchmarks/run_72b_h200.sh
set -u
OUT=${OUT:?set OUT to the folder for the results}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
export TRITON_INTERPRET=0
PY=${PYTHON:-python}
LOG="$OUT/run.log"
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }

say "gpu tests"
timeout 80 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_infer_kernels.py \
    tests/test_bench_model.py >"$OUT/gpu_tests.log" 2>&1
say "gpu tests: status $? ($(tail -n 1 "$OUT/gpu_tests.log"))"

say "tune"
timeout 60 $PY -m mogelm bench decode --sections tune --out "$OUT" >>"$LOG" 2>&1
say "tune: status $?"
TUNING=()
[ -f "$OUT/tuning.json" ] && TUNING=(--tuning "$OUT/tuning.json")

say "decode"
timeout 140 $PY -m mogelm bench decode --sections hf,decode ${TUNING[@]+"${TUNING[@]}"} --out "$OUT" >>"$LOG" 2>&1
say "decode: status $?"

say "prefill"
timeout 60 $PY -m mogelm bench prefill ${TUNING[@]+"${TUNING[@]}"} --out "$OUT" >>"$LOG" 2>&1
say "prefill: status $?"

say "serve"
timeout 120 bash benchmarks/run_serve_h200.sh >/dev/null 2>&1
say "serve: status $?"

echo "=== run.log (tail) ==="; tail -n 45 "$LOG"
echo "=== serve ==="; tail -n 8 "$OUT/serve.log"
