"""deploy/: the Kubernetes manifests validate against Kubernetes' own schemas (strict: an unknown
field fails), they are what deploy/k8s/render.py renders, and every meshserve command line in
them and in the SLURM batch script parses and validates with meshserve's own parser, each node
with its own rank."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshserve.config.server_args import ServerArgs

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SBATCH = ROOT / "deploy" / "slurm" / "meshserve.sbatch"
K8S_VERSION = "1.37.0"
LAUNCH = ["python3", "-m", "meshserve.launch_server"]

sys.path.insert(0, str(K8S))
import render  # noqa: E402  (deploy/k8s/render.py is a script, not a package)


def _docs(variant: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((K8S / f"{variant}.yaml").read_text()))


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "StatefulSet":
        return [spec["template"]]
    if doc["kind"] == "LeaderWorkerSet":
        lwt = spec["leaderWorkerTemplate"]
        return [lwt["leaderTemplate"], lwt["workerTemplate"]]
    return []


def _as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


@pytest.mark.parametrize("variant", render.VARIANTS)
def test_committed_manifests_are_the_renderers_output(variant):
    assert (K8S / f"{variant}.yaml").read_text() == render.render(variant), \
        f"run: python deploy/k8s/render.py {variant} --write"


@pytest.mark.parametrize("variant", render.VARIANTS)
def test_manifests_validate_against_kubernetes_schemas(variant):
    """Core kinds against their schemas. LeaderWorkerSet is a CRD whose schema no PyPI package
    ships: its two pod templates are validated as core PodTemplates (the part meshserve fills);
    its own fields (size, restartPolicy, startupPolicy) are not schema-checked here."""
    checked = 0
    for doc in _docs(variant):
        if doc["kind"] != "LeaderWorkerSet":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
        for template in _pod_templates(doc):
            kubernetes_validate.validate(_as_pod_template(template), K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 3


def test_the_validator_rejects_a_misspelt_field():
    template = copy.deepcopy(_pod_templates(_docs("statefulset")[-1])[0])
    template["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostNetwrk"):
        kubernetes_validate.validate(_as_pod_template(template), K8S_VERSION, strict=True)


def _expand(arg: str, env: dict[str, str]) -> str:
    for name, value in env.items():
        arg = arg.replace(f"$({name})", value)
    assert "$(" not in arg, f"unexpanded variable in {arg!r}"
    return arg


def _parse(argv: list[str]) -> ServerArgs:
    return ServerArgs.parse_args(argv).validate()


@pytest.mark.parametrize("variant", render.VARIANTS)
def test_every_pod_command_parses_with_its_own_rank(variant):
    """Each pod's command, with $(VAR) expanded as Kubernetes would for pod i, is a valid
    launch_server command line whose --node-rank is i; node 0 holds the readiness probe."""
    docs = _docs(variant)
    nnodes = render.Values().nnodes
    ranks: list[int] = []
    for doc in docs:
        templates = _pod_templates(doc)
        for template in templates:
            (container,) = template["spec"]["containers"]
            rank_var = container["env"][0]["name"]
            assert container["command"][:3] == LAUNCH
            assert any(e["name"] == "MESHSERVE_CLUSTER_SECRET" for e in container["env"])
            assert container["livenessProbe"]["httpGet"]["path"] == "/health"
            pods = range(nnodes) if doc["kind"] == "StatefulSet" else (
                [0] if template is templates[0] else range(1, nnodes))
            for pod in pods:
                env = {rank_var: str(pod), "LWS_LEADER_ADDRESS": "meshserve-0.meshserve"}
                args = _parse([_expand(a, env) for a in container["command"][3:]])
                assert (args.parallel.nnodes, args.parallel.tp_size) == (nnodes, render.Values().tp)
                ranks.append(args.parallel.node_rank)
            assert ("readinessProbe" in container) == (0 in pods)
    assert sorted(ranks) == list(range(nnodes))


def _shim(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_sbatch_script_gives_each_node_its_own_rank_and_one_secret(tmp_path):
    """The batch script under stand-ins for srun/scontrol/curl: `srun` runs the step's command
    once per node with that node's SLURM_NODEID (what slurmd does); the "python" records its
    argv and the secret it got. Each recorded command line parses with meshserve's parser."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _shim(bin_dir / "scontrol", 'case "$2" in hostnames) printf "gpu07\\ngpu08\\n";; '
                                 'node) echo "NodeName=$3 NodeAddr=10.0.0.7 NodeHostName=$3";; esac\n')
    _shim(bin_dir / "curl", "exit 0\n")
    # srun [options] bash -c SCRIPT ARGV0 ARGS...: drop the options, run the step per node.
    _shim(bin_dir / "srun", 'while [[ "$1" == -* ]]; do shift; done\n'
                             'for n in 0 1; do SLURM_NODEID=$n SLURM_PROCID=$n "$@"; done\n')
    _shim(tmp_path / "python", 'printf "%s\\n" "$MESHSERVE_CLUSTER_SECRET" "$@" > "$RECORD.$SLURM_NODEID"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(tmp_path / "argv"),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1",
           "SLURM_NODEID": "0", "MESHSERVE_MODEL": "/models/M", "MESHSERVE_PYTHON": str(tmp_path / "python"),
           "MESHSERVE_EXTRA_ARGS": "--device cpu --max-total-tokens 4096"}
    env.pop("MESHSERVE_CLUSTER_SECRET", None)
    out = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "ready: http://10.0.0.7:30000/v1" in out.stdout
    secrets, ranks = set(), []
    for node in (0, 1):
        secret, *argv = (tmp_path / f"argv.{node}").read_text().splitlines()
        assert argv[:2] == ["-m", "meshserve.launch_server"]
        args = _parse(argv[2:])
        assert args.parallel.dist_init_addr == "10.0.0.7:20000" and args.parallel.tp_size == 16
        assert args.get("device") == "cpu"
        ranks.append(args.parallel.node_rank)
        secrets.add(secret)
    assert ranks == [0, 1]
    (secret,) = secrets
    assert len(secret) >= 16
