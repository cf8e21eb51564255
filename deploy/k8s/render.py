"""Render meshserve's Kubernetes manifests from one set of values.

    python deploy/k8s/render.py statefulset --model-path /models/M --tp 16 --nnodes 2 > ms.yaml
    python deploy/k8s/render.py leaderworkerset --model-path /models/M --tp 16 --nnodes 2

Both variants share one pod (`_pod`): the same meshserve command line, probes, secret and
volumes; they differ only in where a pod learns its node rank and node 0's address:
- StatefulSet: rank = the `apps.kubernetes.io/pod-index` label (not the hostname: with
  hostNetwork the hostname is the machine's), node 0 = `NAME-0.NAME` through a headless Service;
- LeaderWorkerSet: rank = LWS_WORKER_INDEX, node 0 = LWS_LEADER_ADDRESS (both injected by LWS).
Kubernetes expands `$(VAR)` in a container's command from its env, so the rank reaches
`--node-rank` without a shell. The files next to this script are its output for the default
values (tests/unit/test_deploy_manifests.py keeps them equal)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
VARIANTS = ("statefulset", "leaderworkerset")
SECRET_ENV = "MESHSERVE_CLUSTER_SECRET"


@dataclass(frozen=True)
class Values:
    name: str = "meshserve"
    namespace: str = "default"
    image: str = "meshserve:latest"
    model_path: str = "/models/Meta-Llama-3.1-405B-Instruct"
    host_model_dir: str = "/models"  # mounted at the same path in the pod (hostPath)
    tp: int = 16
    nnodes: int = 2
    gpus_per_node: int = 8
    port: int = 30000  # HTTP: the API on node 0, /health and /metrics on the others
    dist_port: int = 20000  # --dist-init-addr's port P; P..P+2 are the cluster's ports
    startup_timeout: int = 600  # how long node 0 waits for the others (and they retry DNS)
    secret_name: str = "meshserve-cluster-secret"  # a Secret with key `secret`


def launch_command(v: Values, dist_host: str, rank: str) -> list[str]:
    """The meshserve command line of every node; `rank` is a `$(VAR)` Kubernetes expands."""
    return ["python3", "-m", "meshserve.launch_server",
            "--model-path", v.model_path,
            "--tp", str(v.tp),
            "--nnodes", str(v.nnodes),
            "--node-rank", rank,
            "--dist-init-addr", f"{dist_host}:{v.dist_port}",
            "--startup-timeout", str(v.startup_timeout),
            "--host", "0.0.0.0", "--port", str(v.port)]


def _health_probe(v: Values, **timing: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": v.port}, **timing}


def _pod(v: Values, labels: dict[str, str], dist_host: str, rank_env: dict[str, Any],
         *, ready_probe: bool) -> dict[str, Any]:
    """One node's pod template. /health is 200 on node 0 only once every node joined, the model
    is loaded and the scheduler runs, and 503 as soon as any rank or node is lost; nodes r > 0
    serve /health (same meaning, no API) from the moment their ranks started. Hence:
    - startupProbe on /health: no liveness verdict while the cluster forms and loads weights
      (up to startup_timeout plus loading);
    - livenessProbe on /health: a node whose cluster broke exits by itself (fail fast), so a
      503 that lasts is a hung node, restarted;
    - readinessProbe only where the API is (node 0): ready means "answers requests"."""
    container: dict[str, Any] = {
        "name": "meshserve",
        "image": v.image,
        "command": launch_command(v, dist_host, f"$({rank_env['name']})"),
        "env": [rank_env, {"name": SECRET_ENV, "valueFrom": {"secretKeyRef": {
            "name": v.secret_name, "key": "secret"}}}],
        "ports": [{"name": "http", "containerPort": v.port},
                  {"name": "cluster", "containerPort": v.dist_port},
                  {"name": "coordinator", "containerPort": v.dist_port + 1}],
        "resources": {"limits": {"nvidia.com/gpu": str(v.gpus_per_node)}},
        "startupProbe": _health_probe(v, periodSeconds=10, failureThreshold=max(6, v.startup_timeout // 5)),
        "livenessProbe": _health_probe(v, periodSeconds=10, timeoutSeconds=5, failureThreshold=6),
        "volumeMounts": [{"name": "models", "mountPath": v.host_model_dir, "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }
    if ready_probe:
        container["readinessProbe"] = _health_probe(v, periodSeconds=5, timeoutSeconds=5, failureThreshold=3)
    return {
        "metadata": {"labels": labels},
        "spec": {
            "hostNetwork": True,
            # hostNetwork pods get the machine's resolver unless asked: the leader's name is
            # a cluster DNS name.
            "dnsPolicy": "ClusterFirstWithHostNet",
            "containers": [container],
            "volumes": [{"name": "models", "hostPath": {"path": v.host_model_dir, "type": "Directory"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}}],
        },
    }


def _service(v: Values, name: str, selector: dict[str, str], *, headless: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": selector, "ports": [{"name": "http", "port": v.port, "targetPort": v.port}]}
    if headless:
        # Node 0 is ready only after the others joined, and they find it by this name: its
        # DNS record must exist before it is ready.
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": True}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": v.namespace}, "spec": spec}


def statefulset(v: Values) -> list[dict[str, Any]]:
    labels = {"app": v.name}
    rank_env = {"name": "POD_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}}
    dist_host = f"{v.name}-0.{v.name}.{v.namespace}.svc.cluster.local"
    return [
        _service(v, v.name, labels, headless=True),
        # The API: node 0 only (the others answer 404 outside /health and /metrics).
        _service(v, f"{v.name}-api", {**labels, "apps.kubernetes.io/pod-index": "0"}, headless=False),
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": {"name": v.name, "namespace": v.namespace},
         "spec": {
             "replicas": v.nnodes,
             "serviceName": v.name,
             # OrderedReady would wait for pod 0 to be ready before creating pod 1, and pod 0 is
             # ready only once pod 1 joined: start all nodes at once.
             "podManagementPolicy": "Parallel",
             "selector": {"matchLabels": labels},
             "template": _pod(v, labels, dist_host, rank_env, ready_probe=True),
         }},
    ]


def leaderworkerset(v: Values) -> list[dict[str, Any]]:
    rank_env = {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"}}}
    dist_host = "$(LWS_LEADER_ADDRESS)"
    leader = _pod(v, {"app": v.name, "role": "leader"}, dist_host, rank_env, ready_probe=True)
    worker = _pod(v, {"app": v.name, "role": "worker"}, dist_host, rank_env, ready_probe=False)
    return [
        {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
         "metadata": {"name": v.name, "namespace": v.namespace},
         "spec": {
             "replicas": 1,  # one meshserve cluster; more replicas = more independent clusters
             "startupPolicy": "LeaderCreated",
             "leaderWorkerTemplate": {
                 "size": v.nnodes,
                 # One node lost breaks the whole cluster (it exits): recreate the group.
                 "restartPolicy": "RecreateGroupOnPodRestart",
                 "leaderTemplate": leader,
                 "workerTemplate": worker,
             },
         }},
        _service(v, f"{v.name}-api", {"app": v.name, "role": "leader"}, headless=False),
    ]


class _PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors: a reader sees every label where it applies."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


RENDERERS = {"statefulset": statefulset, "leaderworkerset": leaderworkerset}


def render(variant: str, v: Values = Values()) -> str:
    header = f"# Rendered by deploy/k8s/render.py {variant}; edit the values there, not this file.\n"
    return header + yaml.dump_all(RENDERERS[variant](v), Dumper=_PlainDumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    for f in fields(Values):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--write", action="store_true", help="write deploy/k8s/VARIANT.yaml")
    ns = parser.parse_args(argv)
    text = render(ns.variant, Values(**{f.name: getattr(ns, f.name) for f in fields(Values)}))
    if ns.write:
        (HERE / f"{ns.variant}.yaml").write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
