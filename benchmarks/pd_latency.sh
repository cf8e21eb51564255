#!/usr/bin/env bash
# First-token and inter-token latency through prefill-decode disaggregation (a prefill and a
# decode server on one machine, behind meshserve's router) against one co-located server, at the
# same load. Each server gets the same KV pool (--max-total-tokens), so the two set-ups differ
# only in PD.
#   GPU (repo root, after `source .whl/prelude.sh` and NIXL unpacked into /tmp/site): a random
#   Llama-3.1-8B-shaped model, 60 prompts of 2,048 tokens in / 256 out at 2 requests/s:
#     bash benchmarks/pd_latency.sh OUT_DIR TOKENIZER_DIR
#   CPU: the embedded default model, a lighter load:
#     MODEL=default IN=256 OUT=32 PROMPTS=20 RATE=0.5 KV=20000 bash benchmarks/pd_latency.sh OUT_DIR
set -u
out=${1:-/tmp/pd_latency}; tok=${2:-}
mkdir -p "$out"
if [ "${MODEL:-l8b}" = default ]; then
  model=""   # launch_server's embedded default model, with its own tokenizer
  tok_arg=""
else
  [ -f /tmp/l8b/config.json ] || python -m meshserve.bench.random_model --shape llama-3.1-8b --out /tmp/l8b > /dev/null
  model="--model-path /tmp/l8b --skip-tokenizer-init"
  tok_arg="--tokenizer $tok"
fi
server="python -m meshserve.launch_server $model --max-total-tokens ${KV:-200000}"
load="--dataset-name random-ids --num-prompts ${PROMPTS:-60} --random-input-len ${IN:-2048}
  --random-output-len ${OUT:-256} --random-range-ratio 0 --request-rate ${RATE:-2} --seed 1 --disable-tqdm"
up() { for _ in $(seq 300); do curl -sf "localhost:$1/health" > /dev/null && return 0; sleep 1; done; echo "port $1 never healthy"; return 1; }
bench() {
  timeout ${BENCH_TIMEOUT:-240} python -m meshserve.bench_serving --backend meshserve --port "$1" $tok_arg $load \
    --output-file "$out/$2.jsonl" > "$out/$2.log" 2>&1
  echo "== $2"; grep -E "Successful|Output token|Median (TTFT|ITL)|P99 (TTFT|ITL)" "$out/$2.log"
}
$server --port 30000 > "$out/colocated_server.log" 2>&1 &
pid=$!
up 30000 && bench 30000 colocated
kill $pid; wait $pid
$server --port 30001 --disaggregation-mode prefill --disaggregation-bootstrap-port 8998 > "$out/prefill.log" 2>&1 &
$server --port 30002 --disaggregation-mode decode > "$out/decode.log" 2>&1 &
up 30001 && up 30002 || exit 1
# The router after its workers are up: it would take a worker that is still loading out of rotation.
python -m meshserve.launch_router --pd-disaggregation --prefill http://127.0.0.1:30001 8998 \
  --decode http://127.0.0.1:30002 --port 30010 > "$out/router.log" 2>&1 &
up 30010 && bench 30010 pd
grep -iE "error|Traceback" "$out/prefill.log" "$out/decode.log" "$out/router.log" | head -5
kill $(jobs -p); wait
