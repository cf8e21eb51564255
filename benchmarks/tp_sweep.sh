#!/usr/bin/env bash
# GPU machine: tensor-parallel sweep on a random Llama-3.1-8B-shaped model (bf16):
#   first, greedy equality with transformers at tp = 2, 4, 8 (as many as there are GPUs; bf16
#   divergences only at the reference's near-ties: tests/gpu/test_cuda_matches_hf.py),
#   bench_one_batch at tp = 1, 2, 4, 8 (as many as there are GPUs), then "two nodes x N/2 GPUs"
#   on one N-GPU host (two launch_server processes split by CUDA_VISIBLE_DEVICES) compared with tp=N.
# Usage (from the repo root, after `source .whl/prelude.sh`): bash benchmarks/tp_sweep.sh OUT_DIR
set -u
out=${1:-/tmp/tp_sweep}; mkdir -p "$out"
timeout 300 python -m pytest -q -s tests/gpu/test_cuda_matches_hf.py -k tensor_parallel > "$out/tp_check.log" 2>&1
grep -E "divergence|passed|failed" "$out/tp_check.log"
gpus=$(nvidia-smi -L | wc -l)
model=/tmp/l8b
python -m meshserve.bench.random_model --shape llama-3.1-8b --out $model > /dev/null || exit 1
for tp in 1 2 4 8; do
  [ "$tp" -le "$gpus" ] || break
  timeout 120 python -m meshserve.bench_one_batch --model-path $model --tp $tp --batch-size 1 16 \
    --input-len 128 --output-len 16 --output-file "$out/one_batch.jsonl" > "$out/tp$tp.log" 2>&1
  tail -3 "$out/tp$tp.log"
done
if [ "$gpus" -ge 4 ]; then
  half=$((gpus / 2))
  first=$(seq -s, 0 $((half - 1))); second=$(seq -s, $half $((gpus - 1)))
  common="--model-path $model --skip-tokenizer-init --tp $gpus --nnodes 2 --dist-init-addr 127.0.0.1:29500 --port 30000"
  CUDA_VISIBLE_DEVICES=$first python -m meshserve.launch_server $common --node-rank 0 > "$out/node0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=$second python -m meshserve.launch_server $common --node-rank 1 --port 30001 > "$out/node1.log" 2>&1 &
  for _ in $(seq 240); do curl -sf localhost:30000/health > /dev/null && break; sleep 1; done
  python - "$out" "$gpus" <<'PY'
import json, sys, urllib.request, torch
out, gpus = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(f"{out}/one_batch.jsonl")]
ref = next(r for r in rows if r["tp"] == gpus and r["batch_size"] == 1)
gen = torch.Generator().manual_seed(0)
torch.randint(0, 128256, (128,), generator=gen)  # bench_one_batch's warm-up prompt
prompt = torch.randint(0, 128256, (128,), generator=gen).tolist()  # its measured batch-1 prompt
body = json.dumps({"input_ids": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}})
req = urllib.request.Request("http://127.0.0.1:30000/generate", body.encode(), {"Content-Type": "application/json"})
got = json.loads(urllib.request.urlopen(req, timeout=120).read())["output_ids"]
print(f"two nodes x {gpus // 2} GPUs vs tp={gpus} one node:", "SAME" if got == ref["first_output_ids"] else f"DIFFER\n{got}\n{ref['first_output_ids']}")
for r in rows:
    print(r["tp"], r["batch_size"], "same as tp=1" if r["first_output_ids"] == next(x for x in rows if x["tp"] == 1 and x["batch_size"] == r["batch_size"])["first_output_ids"] else "differs from tp=1")
PY
  kill %1 %2 2>/dev/null; wait
fi
