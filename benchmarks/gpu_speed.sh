#!/usr/bin/env bash
# GPU machine, one GPU: issue 4's figures on a random Llama-3.1-8B-shaped model (bf16) and the
# SmolLM2-135M shape. Usage (repo root, after `source .whl/prelude.sh`):
#   bash benchmarks/gpu_speed.sh OUT_DIR TOKENIZER_DIR
# TOKENIZER_DIR: any HF tokenizer whose ids fit the vocabulary (bench_serving draws prompts with it).
set -u
out=${1:-/tmp/gpu_speed}; tok=${2:-.tok}; mkdir -p "$out"
python -m meshserve.bench.linear_floor --batch-size 1 64 256 | tee "$out/floor.log"
python -m meshserve.bench.random_model --shape llama-3.1-8b --out /tmp/l8b > /dev/null || exit 1
timeout 150 python -m meshserve.bench_one_batch --model-path /tmp/l8b --batch-size 1 64 256 --input-len 256 \
  --output-len 32 --output-file "$out/one_batch.jsonl" > "$out/l8b.log" 2>&1; tail -4 "$out/l8b.log"
# SGLang's CI workload: 500 prompts, input U[1,4096], output U[1,2048], all at once.
timeout 240 python -m meshserve.bench_offline_throughput --model-path /tmp/l8b --num-prompts 500 \
  --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0 --output-file "$out/offline.jsonl" \
  > "$out/offline.log" 2>&1; tail -2 "$out/offline.log"
# Online: 100 prompts of the same shape at 1 request/s.
python -m meshserve.launch_server --model-path /tmp/l8b --skip-tokenizer-init --port 30000 > "$out/server.log" 2>&1 &
for _ in $(seq 180); do curl -sf localhost:30000/health > /dev/null && break; sleep 1; done
timeout 200 python -m meshserve.bench_serving --backend meshserve --port 30000 --tokenizer "$tok" \
  --dataset-name random-ids --num-prompts 100 --random-input-len 4096 --random-output-len 2048 \
  --random-range-ratio 0 --request-rate 1 --seed 1 --disable-tqdm --output-file "$out/online.jsonl" \
  > "$out/online.log" 2>&1; grep -E "Successful|Output token|Median (TTFT|ITL|TPOT)" "$out/online.log"
kill %1; wait
python -m meshserve.bench.random_model --shape smollm2-135m --out /tmp/s135 > /dev/null
timeout 90 python -m meshserve.bench_one_batch --model-path /tmp/s135 --batch-size 1 64 256 --input-len 256 \
  --output-len 32 --output-file "$out/one_batch.jsonl" > "$out/s135.log" 2>&1; tail -4 "$out/s135.log"
