#!/usr/bin/env bash
# Served benchmark of issue 14 on one H200 (about 1.5-2 minutes; at most ~3.5): `mogelm serve` in benchmark mode
# (Pangu Pro MoE 72B layout, random weights built on the GPU, fp8-all, fp8 KV cache) driven by
# `mogelm bench serve`: 256 requests of 1,024 random token ids, 256 new tokens each, all in flight
# at once. Writes $OUT/bench_serve.json (the load generator's JSON) and $OUT/serve.log (server log,
# then the load's summary). Stops the server in every case.
#
#   OUT=/tmp/out bash benchmarks/run_serve_h200.sh
#   OUT=/tmp/out PRESET=debug MAX_LEN=128 REQUESTS=8 PROMPT_TOKENS=32 MAX_TOKENS=8 PROMPT_VOCAB=500 \
#       bash benchmarks/run_serve_h200.sh           # a dry run of the script on a CPU (seconds)
#
# Needs fastapi, uvicorn, pydantic (and httpx for the load generator) importable: wheels unpacked in
# /tmp/site are put first on PYTHONPATH when that folder exists.
set -u
OUT=${OUT:?set OUT to the folder for the results}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
export TRITON_INTERPRET=0
PY=${PYTHON:-python}
PORT=${PORT:-8321}
PRESET=${PRESET:-pangu-pro-moe-72b}
REQUESTS=${REQUESTS:-256}
PROMPT_TOKENS=${PROMPT_TOKENS:-1024}
MAX_TOKENS=${MAX_TOKENS:-256}
PROMPT_VOCAB=${PROMPT_VOCAB:-1000}
MAX_LEN=${MAX_LEN:-2048}
LOG="$OUT/serve.log"
t0=$(date +%s)

if ! $PY -c "import fastapi, uvicorn, httpx" 2>>"$LOG"; then
    echo "error: fastapi, uvicorn and httpx must be importable (wheels in /tmp/site)" | tee -a "$LOG"
    exit 2
fi

$PY -m mogelm serve --random-weights "$PRESET" --quantize fp8-all --kv-cache-dtype fp8 \
    --max-batch 256 --max-len "$MAX_LEN" --chunk-size 8192 --port "$PORT" --max-waiting 1024 \
    --shutdown-timeout 10 --log-level warning >>"$LOG" 2>&1 &
SERVER=$!
LOAD=
stop_all() {  # the load generator (if running), then the server: TERM, then KILL after 20 s
    [ -n "$LOAD" ] && kill -0 "$LOAD" 2>/dev/null && kill -TERM "$LOAD"
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM "$SERVER"
        for _ in $(seq 1 20); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
        kill -0 "$SERVER" 2>/dev/null && kill -KILL "$SERVER"
    fi
    wait 2>/dev/null
}
trap stop_all EXIT
trap 'exit 143' TERM INT  # an outer timeout still stops the server (through the EXIT trap)

ready=0
for _ in $(seq 1 100); do  # model build, KV calibration, memory profile, graph capture: ~30-60 s
    if ! kill -0 "$SERVER" 2>/dev/null; then echo "server exited during start-up" | tee -a "$LOG"; break; fi
    if $PY - "$PORT" <<'EOF' 2>/dev/null; then ready=1; break; fi
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as r:
    sys.exit(0 if b"ready" in r.read() else 1)
EOF
    sleep 1
done
echo "[serve] ready=$ready after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
[ "$ready" = 1 ] || exit 1

$PY -m mogelm bench serve --url "http://127.0.0.1:$PORT" --requests "$REQUESTS" --concurrency "$REQUESTS" \
    --prompt-tokens "$PROMPT_TOKENS" --prompt-vocab "$PROMPT_VOCAB" --max-tokens "$MAX_TOKENS" \
    --timeout 100 --deadline 100 --json \
    >"$OUT/bench_serve.json" 2>>"$LOG" &
LOAD=$!
wait "$LOAD"
status=$?
LOAD=
$PY - "$OUT/bench_serve.json" <<'EOF' | tee -a "$LOG"
import json, sys
from mogelm.inference.loadgen import format_summary
print(format_summary(json.load(open(sys.argv[1]))))
EOF
echo "[serve] load done (status $status) after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
exit $status
