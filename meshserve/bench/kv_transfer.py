"""KV-transfer throughput: one prompt's KV cache (every layer's K and V) written from this process
into a second process's KV pool through a transfer backend, as a prefill server pushes it to a
decode server. Both pools hold twice the prompt's slots, and the prompt's pages are a random
sample of each pool (a pool in steady state), so rows merge only within a page. Prints one JSON
line: the median of `--repeats` timed writes after one untimed write that connects the peers;
afterwards the receiver's pages are checked against the sender's (SHA-256).

  python -m meshserve.bench.kv_transfer --backend nixl|mooncake --tokens 4096 --layers 32 \\
      --kv-heads 8 --head-dim 128 --page-size 1|16 --device cpu|cuda
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from meshserve.disagg.kv_ranges import paired_kv_ranges
from meshserve.disagg.transfer import BACKENDS, MemoryRegion, TransferBackend, TransferStatus, create_backend


def _pool(args: argparse.Namespace, *, fill: bool) -> list[torch.Tensor]:
    """2 x layers buffers of `2 * tokens` slots, paged: [pages, page_size, kv_heads, head_dim]."""
    pages = 2 * args.tokens // args.page_size
    shape = (pages, args.page_size, args.kv_heads, args.head_dim)
    make = torch.randn if fill else torch.zeros
    return [make(shape, dtype=torch.bfloat16, device=args.device) for _ in range(2 * args.layers)]


def _backend(args: argparse.Namespace, name: str, pool: list[torch.Tensor]) -> TransferBackend:
    backend = create_backend(args.backend, agent_name=name, host="127.0.0.1")
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    backend.register([MemoryRegion(t.data_ptr(), t.nbytes, kind, max(t.get_device(), 0)) for t in pool])
    return backend


def receiver(args: argparse.Namespace) -> None:
    """The decode side: registers a zeroed pool, prints its metadata, waits for stdin to close."""
    out = os.fdopen(os.dup(1), "w")  # our line only: the libraries' chatter goes to stderr
    os.dup2(2, 1)
    pool = _pool(args, fill=False)
    backend = _backend(args, "bench-decode", pool)
    out.write(json.dumps({"metadata": base64.b64encode(backend.local_metadata()).decode(),
                          "bases": [t.data_ptr() for t in pool]}) + "\n")
    out.flush()
    pages = json.loads(sys.stdin.readline())["pages"]  # the writer is done: check what landed
    out.write(json.dumps({"sha256": _digest(pool, pages)}) + "\n")
    out.flush()
    sys.stdin.read()
    backend.close()


def _digest(pool: list[torch.Tensor], pages: list[int]) -> str:
    """SHA-256 of the given pages of every buffer, in order (the same bytes on both sides)."""
    h = hashlib.sha256()
    index = torch.tensor(pages, device=pool[0].device)
    for t in pool:
        h.update(t[index].view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _timed_write(backend: TransferBackend, peer: str, src: np.ndarray, dst: np.ndarray) -> float:
    start = time.perf_counter()
    handle = backend.write(peer, src, dst)
    while (state := backend.status(handle)) is TransferStatus.PENDING:
        time.sleep(0.0005)  # lets a backend's own threads take the GIL; small against the write
    elapsed = time.perf_counter() - start
    backend.release(handle)
    if state is not TransferStatus.DONE:
        raise RuntimeError(f"the benchmark's write failed ({state})")
    return elapsed


def writer(args: argparse.Namespace) -> dict[str, object]:
    shape = [f"--{k.replace('_', '-')}={getattr(args, k)}"
             for k in ("backend", "tokens", "layers", "kv_heads", "head_dim", "page_size", "device")]
    child = subprocess.Popen([sys.executable, "-m", "meshserve.bench.kv_transfer", "--receiver", *shape],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(child.stdout.readline())
        pool = _pool(args, fill=True)
        backend = _backend(args, "bench-prefill", pool)
        peer = backend.add_peer(base64.b64decode(info["metadata"]))
        rng = np.random.default_rng(0)
        n_pages = args.tokens // args.page_size
        src_pages = rng.choice(pool[0].shape[0], n_pages, replace=False)
        dst_pages = rng.choice(pool[0].shape[0], n_pages, replace=False)
        page_bytes = pool[0][0].nbytes
        src, dst = paired_kv_ranges([t.data_ptr() for t in pool], info["bases"], page_bytes, src_pages, dst_pages)
        _timed_write(backend, peer, src[:1], dst[:1])  # connects
        times = [_timed_write(backend, peer, src, dst) for _ in range(args.repeats)]
        child.stdin.write(json.dumps({"pages": dst_pages.tolist()}) + "\n")
        child.stdin.flush()
        if json.loads(child.stdout.readline())["sha256"] != _digest(pool, src_pages.tolist()):
            raise RuntimeError("the receiver's pages differ from the sender's")
        backend.close()
    finally:
        child.stdin.close()
        child.wait(60)
    seconds = statistics.median(times)
    total = int(src[:, 1].sum())
    return {"backend": args.backend, "device": args.device, "tokens": args.tokens, "layers": args.layers,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "page_size": args.page_size,
            "bytes": total, "rows": len(src), "repeats": args.repeats, "seconds": round(seconds, 4),
            "gb_per_s": round(total / seconds / 1e9, 3), "ucx_tls": os.environ.get("UCX_TLS", "")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.tokens % args.page_size:
        parser.error("--tokens must be a multiple of --page-size")
    if args.receiver:
        receiver(args)
    else:
        print(json.dumps(writer(args)))


if __name__ == "__main__":
    main()
