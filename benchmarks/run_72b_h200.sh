#!/usr/bin/env bash
# The issue-14 stage-2 GPU run on one H200 in one call (about 6 minutes, at most 7.5), every step
# under its own timeout, results in $OUT (8 files, one level):
#
#   gpu_tests.log        pytest -m gpu of the new tests (fused kernels vs fp64, graphed fused fp8 decode,
#                        one 72B-width decode row and a tile sweep)                          <= 75 s
#   decode.log           mogelm bench decode --sections tune,hf,decode: tile sweeps of the routed
#   bench_decode.json    experts and the fp8 small-M kernel (installed for the run), the transformers
#   tuning.json          baseline, then 48 layers fp8-all at batch 1/16/64/128/256/largest, ctx 2048,
#                        fp8 then bf16 KV                                                    <= 180 s
#   prefill.log          mogelm bench prefill (one 2,048-token prompt; 64 x 512), 48 layers   <= 70 s
#   bench_prefill.json
#   serve.log            benchmarks/run_serve_h200.sh: mogelm serve --random-weights + bench serve
#   bench_serve.json     (256 requests, 1,024-token prompts, 256 new tokens)                  <= 125 s
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
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

say "gpu tests"
timeout 75 $PY -m pytest -q -m gpu -p no:cacheprovider -x tests/test_infer_kernels.py \
    tests/test_bench_model.py >"$OUT/gpu_tests.log" 2>&1
say "gpu tests: status $? ($(tail -n 1 "$OUT/gpu_tests.log"))"

say "decode"
timeout 180 $PY -m mogelm bench decode --sections tune,hf,decode --out "$OUT" >"$OUT/decode.log" 2>&1
say "decode: status $?"

say "prefill"
TUNING=()
[ -f "$OUT/tuning.json" ] && TUNING=(--tuning "$OUT/tuning.json")
timeout 70 $PY -m mogelm bench prefill "${TUNING[@]}" --out "$OUT" >"$OUT/prefill.log" 2>&1
say "prefill: status $?"

say "serve"
timeout 125 bash benchmarks/run_serve_h200.sh >/dev/null 2>&1
say "serve: status $?"

echo "=== decode (table) ==="; tail -n 25 "$OUT/decode.log"
echo "=== prefill ==="; tail -n 4 "$OUT/prefill.log"
echo "=== serve ==="; tail -n 8 "$OUT/serve.log"
say "done"
