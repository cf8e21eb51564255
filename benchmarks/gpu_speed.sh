#!/usr/bin/env bash
# GPU machine, one GPU: issue 4's checks and figures on a random Llama-3.1-8B-shaped model (bf16)
# and the SmolLM2-135M shape. Usage (repo root, after `source .whl/prelude.sh`):
#   bash benchmarks/gpu_speed.sh OUT_DIR TOKENIZER_DIR [PHASE ...]
# PHASE: check floor attn mixed_attn profile decode_profile one_batch smol structured offline online (default: all; the whole set takes longer
# than one 10-minute device call, so split it: "check floor attn one_batch smol", then "offline online").
# TOKENIZER_DIR: any HF tokenizer whose ids fit the vocabulary (bench_serving counts tokens with it).
# SERVER_FLAGS (environment): extra launch_server flags for the engine runs, e.g.
#   SERVER_FLAGS="--enable-overlap-schedule --enable-mixed-chunk" bash benchmarks/gpu_speed.sh ...
set -u
flags=${SERVER_FLAGS:-}
out=${1:-/tmp/gpu_speed}; tok=${2:-.tok}; shift 2 || true
phases=${*:-check floor attn mixed_attn profile decode_profile one_batch smol structured offline online}
mkdir -p "$out"
want() { [[ " $phases " == *" $1 "* ]]; }
l8b() { [ -f /tmp/l8b/config.json ] || python -m meshserve.bench.random_model --shape llama-3.1-8b --out /tmp/l8b > /dev/null; }
if want check; then
  MESHSERVE_TEST_TOKENIZER_DIR="$(realpath "$tok")" timeout 300 python -m pytest -q tests/gpu tests/unit/test_triton_kernels.py \
    > "$out/check.log" 2>&1; tail -3 "$out/check.log"
fi
want floor && python -m meshserve.bench.linear_floor --batch-size 1 64 256 | tee "$out/floor.log"
want attn && python -m meshserve.bench.decode_attention --batch-size 1 2 4 8 16 32 64 256 --context-len 300 3000 | tee "$out/attn.log"
# A mixed extend step's attention (--enable-mixed-chunk): a 2048-token chunk + B decodes, all rows
# through the extend kernel vs the decode rows through the decode kernel.
want mixed_attn && python -m meshserve.bench.mixed_attention --decodes 16 64 256 --context-len 300 3000 \
  --chunk 2048 | tee "$out/mixed_attn.log"
if want profile; then  # prefill time by prompt length, and the operators of a 4096-token prefill
  l8b
  timeout 150 python -m meshserve.bench.profile_step --model-path /tmp/l8b --input-len 256 2048 4096 --top 12 \
    > "$out/profile.log" 2>&1; grep -E "^prefill|Self CUDA time total|Self CPU time total" "$out/profile.log"
fi
if want decode_profile; then  # per-kernel time of batch-1 decode steps (kernels inside the CUDA graph)
  l8b
  timeout 120 python -m meshserve.bench.profile_step --model-path /tmp/l8b --input-len 256 --decode-batch-size 1 \
    --top 16 $flags > "$out/decode_profile.log" 2>&1; grep -E "^ +_|nvjet|aten::|Self CUDA time total" "$out/decode_profile.log" | cut -c1-62,150-200
fi
if want one_batch; then
  l8b
  timeout 200 python -m meshserve.bench_one_batch --model-path /tmp/l8b --batch-size 1 64 256 --input-len 256 \
    --output-len 32 --output-file "$out/one_batch.jsonl" $flags > "$out/l8b.log" 2>&1; tail -4 "$out/l8b.log"
fi
if want smol; then
  python -m meshserve.bench.random_model --shape smollm2-135m --out /tmp/s135 > /dev/null
  timeout 120 python -m meshserve.bench_one_batch --model-path /tmp/s135 --batch-size 1 64 256 --input-len 256 \
    --output-len 32 --output-file "$out/one_batch.jsonl" $flags > "$out/s135.log" 2>&1; tail -4 "$out/s135.log"
fi
# Structured output's cost per decode step (regex, JSON schema vs plain) at batch 1 and 64: the 8B
# shape with the tokenizer's vocabulary, random weights (--load-format dummy).
if want structured; then
  python -m meshserve.bench.random_model --shape llama-3.1-8b --vocab-size 49152 --config-only --out /tmp/l8v > /dev/null
  cp "$tok"/tokenizer*.json /tmp/l8v/
  timeout 240 python -m meshserve.bench.structured_overhead --model-path /tmp/l8v --load-format dummy \
    --batch-size 1 64 --output-len 128 --output-file "$out/structured.jsonl" $flags > "$out/structured.log" 2>&1
  grep -E "^batch" "$out/structured.log" || tail -5 "$out/structured.log"
fi
# SGLang's CI workload: 500 prompts, input U[1,4096], output U[1,2048], all at once.
if want offline; then
  l8b
  timeout 330 python -m meshserve.bench_offline_throughput --model-path /tmp/l8b --num-prompts 500 \
    --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0 --output-file "$out/offline.jsonl" \
    $flags > "$out/offline.log" 2>&1; tail -2 "$out/offline.log"
fi
# Online: 100 prompts of the same shape at 1 request/s.
if want online; then
  l8b
  python -m meshserve.launch_server --model-path /tmp/l8b --skip-tokenizer-init --port 30000 $flags \
    > "$out/server.log" 2>&1 &
  for _ in $(seq 180); do curl -sf localhost:30000/health > /dev/null && break; sleep 1; done
  timeout 200 python -m meshserve.bench_serving --backend meshserve --port 30000 --tokenizer "$tok" \
    --dataset-name random-ids --num-prompts 100 --random-input-len 4096 --random-output-len 2048 \
    --random-range-ratio 0 --request-rate 1 --seed 1 --disable-tqdm --output-file "$out/online.jsonl" \
    > "$out/online.log" 2>&1; grep -E "Successful|Output token|Median (TTFT|ITL|TPOT)|P99 (TTFT|ITL)" "$out/online.log"
  kill %1; wait
fi
