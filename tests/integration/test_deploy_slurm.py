"""deploy/slurm/meshserve.sbatch, submitted unchanged with `sbatch` to a real slurmctld with two
slurmd "hosts" (tests/slurm_cluster.py): a two-node `--tp 2 --nnodes 2` CPU deployment of a
tiny model comes up, the script reports ready only once /health is 200, the `openai` client gets
greedy output equal to transformers, and each node ran with its own rank on its own host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.hf_reference import hf_greedy
from tests.slurm_cluster import slurm_cluster

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "deploy" / "slurm" / "meshserve.sbatch"
PORT = 30000
NEW_TOKENS = 8
PROMPT = [5, 871, 4031, 17, 299, 12, 77]


def _wait_ready(cluster, job: str, workdir: Path, timeout: float = 240) -> str:
    out = workdir / f"meshserve_{job}.out"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text() if out.exists() else ""
        if "[meshserve] ready:" in text:
            return text
        if cluster.job_state(job) not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(1)
    node_logs = "".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(workdir.glob("*node*.out")))
    raise AssertionError(f"job {job} not ready:\n{out.read_text() if out.exists() else ''}\n"
                         f"{node_logs}\n{cluster.logs()}")


def test_sbatch_script_serves_two_nodes_each_with_its_own_rank(tmp_path, tiny_qwen3_dir):
    reference = hf_greedy(tiny_qwen3_dir, [PROMPT], NEW_TOKENS)[0]
    workdir = tmp_path / "job"
    workdir.mkdir()
    slurm_root = tmp_path / "slurm"
    slurm_root.mkdir()
    with slurm_cluster(slurm_root) as cluster:
        env = {**cluster.env(), "MESHSERVE_MODEL": str(tiny_qwen3_dir), "MESHSERVE_TP": "2",
               "MESHSERVE_PORT": str(PORT), "MESHSERVE_PYTHON": sys.executable,
               "MESHSERVE_EXTRA_ARGS": "--device cpu --max-total-tokens 2048",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("MESHSERVE_CLUSTER_SECRET", None)  # the script makes one for the job
        job = cluster.run("sbatch", "--parsable", "-D", str(workdir), str(SBATCH), env=env).strip()
        try:
            head = cluster.addrs[0]
            batch_log = _wait_ready(cluster, job, workdir)
            assert f"ready: http://{head}:{PORT}/v1" in batch_log
            client = f"""
import json, urllib.request, openai
c = openai.OpenAI(base_url="http://{head}:{PORT}/v1", api_key="none", max_retries=0)
r = c.completions.create(model=c.models.list().data[0].id, prompt={PROMPT}, max_tokens={NEW_TOKENS},
                         temperature=0, extra_body={{"ignore_eos": True}})
info = json.load(urllib.request.urlopen("http://{head}:{PORT}/get_server_info"))
health1 = urllib.request.urlopen("http://{cluster.addrs[1]}:{PORT}/health").status
print(json.dumps({{"text": r.choices[0].text, "tokens": r.usage.completion_tokens, "node_rank": info["node_rank"],
                  "nnodes": info["nnodes"], "tp": info["tp_size"], "health1": health1}}))
"""
            out = cluster.run(sys.executable, "-c", client, env=env, timeout=120)
            got = json.loads(out)
            assert (got["tokens"], got["node_rank"], got["nnodes"], got["tp"], got["health1"]) == (
                NEW_TOKENS, 0, 2, 2, 200)
            from transformers import AutoTokenizer

            assert got["text"] == AutoTokenizer.from_pretrained(tiny_qwen3_dir).decode(reference)
            # Each task ran with its own rank, on its own host (namespace, address).
            node0 = (workdir / f"meshserve_{job}_node0.out").read_text()
            node1 = (workdir / f"meshserve_{job}_node1.out").read_text()
            assert "node 1: ranks started" in node1 and f"{cluster.addrs[1]}" in node1, node1[-2000:]
            assert "node 1: ranks started" not in node0 and "port plan" in node0, node0[-2000:]
        finally:
            subprocess.run(["ip", "netns", "exec", cluster.ns_a, "scancel", job], env=cluster.env(),
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while cluster.job_state(job) and time.monotonic() < deadline:
                time.sleep(0.5)
