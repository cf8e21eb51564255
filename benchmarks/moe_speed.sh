#!/usr/bin/env bash
# GPU machine, one GPU: decode speed of MoE shapes (issue 12) beside the floor of their active
# weights. Whole shapes, no checkpoint: config.json only and --load-format dummy. Usage (repo
# root, after `source .whl/prelude.sh`):
#   bash benchmarks/moe_speed.sh OUT_DIR [SHAPE ...]      SHAPE: qwen3-30b-a3b deepseek-v2-lite (default both)
# EXTRA (environment): more launch_server flags for every run, e.g. EXTRA="--attention-backend triton".
set -u
out=${1:-/tmp/moe_speed}; shift || true
shapes=${*:-qwen3-30b-a3b deepseek-v2-lite}
mkdir -p "$out"
for shape in $shapes; do
  dir=/tmp/cfg-$shape
  python -m meshserve.bench.random_model --shape "$shape" --out "$dir" --config-only > /dev/null
  python -m meshserve.bench.linear_floor --shape "$shape" --batch-size 1 64 256 | tee "$out/floor-$shape.log"
  timeout 280 python -m meshserve.bench_one_batch --model-path "$dir" --load-format dummy --batch-size 1 64 256 \
    --input-len 256 --output-len 32 --output-file "$out/one_batch.jsonl" ${EXTRA:-} > "$out/$shape.log" 2>&1
  grep -E "CUDA graphs|attention backend|latent" "$out/$shape.log" | head -3; tail -4 "$out/$shape.log"
done
