#!/usr/bin/env bash
# meshserve's half of the side-by-side with vLLM (the performance issue's table): the same model
# directory and the same client, `vllm bench serve` from ../shared/peer's kit, run right after
# the kit's vLLM run on the same GPU machine. One meshserve server per variant, each measured on
# the 500-prompt workload and at concurrency 1 exactly as vLLM was.
#
#   GPU (repo root, after `source .whl/prelude.sh` and the kit's install, which leaves vLLM in
#   /tmp/peersite and the model in MODEL_DIR; carry .peer/run_vllm_bench.sh):
#     bash .peer/run_vllm_bench.sh MODEL_DIR serve                 # vLLM, one device call
#     bash benchmarks/side_by_side.sh MODEL_DIR                    # meshserve, the next call
#     VARIANTS="default|--schedule-policy lof" bash benchmarks/side_by_side.sh MODEL_DIR
#
#   A device call brings back at most 8 files and each variant writes 6, so the 2026-12-04 run
#   wrote elsewhere and packed them (docs/benchmarks.md):
#     R=$OUT; OUT=/tmp/sbs VARIANTS=... bash benchmarks/side_by_side.sh MODEL_DIR; tar czf $R/sbs.tgz -C /tmp sbs
#
# VARIANTS: '|'-separated extra server arguments, "default" for none (default: "default").
# A MODEL_DIR without *.safetensors is served with --load-format dummy, as the kit does for vLLM.
# Results: $OUT/<variant>/: the server log, and the kit's summary.txt and JSON files (the summary
# says "vLLM serve" for any server the kit measured: here meshserve).
set -u
model=${1:?usage: side_by_side.sh MODEL_DIR}
out=${OUT:-/tmp/side_by_side}
port=${PORT:-8011}
peer=${PEER_RUN:-.peer/run_vllm_bench.sh}
IFS='|' read -r -a variants <<< "${VARIANTS:-default}"
[ -f "$peer" ] || { echo "no $peer: carry the peer kit's run_vllm_bench.sh"; exit 2; }
load=()
ls "$model"/*.safetensors > /dev/null 2>&1 || load=(--load-format dummy)

healthy() {
  for _ in $(seq "${HEALTH_TIMEOUT:-300}"); do
    curl -sf "127.0.0.1:$port/health" > /dev/null && return 0
    kill -0 "$1" 2> /dev/null || return 1
    sleep 1
  done
  return 1
}

for variant in "${variants[@]}"; do
  name=$(echo "$variant" | tr -c 'a-zA-Z0-9_.-' '_' | sed 's/^[-_]*//; s/_*$//')
  extra=()
  # shellcheck disable=SC2206
  [ "$variant" = default ] || extra=($variant)
  dir="$out/$name"
  mkdir -p "$dir"
  echo "== meshserve $variant (results in $dir)"
  python -m meshserve.launch_server --model-path "$model" --port "$port" --context-length 8192 \
    --disable-radix-cache "${load[@]}" "${extra[@]}" > "$dir/server.log" 2>&1 &
  pid=$!
  if healthy "$pid"; then
    SERVER=external OUT="$dir" PORT="$port" bash "$peer" "$model" serve
  else
    echo "server not healthy; its log ends:"; tail -n 40 "$dir/server.log"
  fi
  kill -TERM "$pid" 2> /dev/null
  wait "$pid"
done
