"""Mutation check: apply realistic bugs one at a time and see whether the tests named for each
catch them (docs/mutation.md has the latest report and how to read it).

Each mutant is a textual patch (file, old snippet, new snippet) applied to a fresh copy of the
committed tree (`git archive HEAD`, in a temporary directory), never to the live checkout; the
copy is imported instead of the editable install through PYTHONPATH. For each mutant only the
tests that should catch it run (`pytest -x`), so a full run takes ~10-15 min on 2 cores.

    .venv/bin/python benchmarks/mutants.py                 # all mutants, markdown table on stdout
    .venv/bin/python benchmarks/mutants.py radix-match-one-too-far flush-does-nothing   # some
    .venv/bin/python benchmarks/mutants.py --baseline      # the same tests on the unmutated copy
    .venv/bin/python benchmarks/mutants.py --list

Exit status: 0 when every selected mutant was caught (baseline: every selection passed), else 1.
A mutant whose old snippet no longer occurs exactly once is reported "stale": update the list
when the code it targets changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
TIMEOUT_S = 900

ENGINE = "tests/integration/test_engine_matches_hf.py"
HTTP = "tests/integration/test_http_api.py"
FAKE = "tests/unit/test_scheduler_fake_runner.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: the narrow selection that should catch it
    fresh_cache: bool = False  # the mutant changes the default model's conversion: convert anew


MUTANTS = [
    # --- the five that passed the suite at 61ba2b3 (issue 18) ---
    Mutant(
        "gguf-qk-left-permuted",
        "meshserve/config/default_model.py",
        '    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]\n',
        '    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]\n'
        "    for name, t in list(tensors.items()):  # back to llama.cpp's interleaved rotary row order\n"
        '        if name.endswith(("q_proj.weight", "k_proj.weight")):\n'
        '            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads\n'
        "            tensors[name] = t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).transpose(1, 2)"
        ".reshape(t.shape)\n",
        ("tests/unit/test_default_model.py::test_converted_weights_are_the_gguf_weights",),
        fresh_cache=True,
    ),
    Mutant(
        "api-key-skips-completions",
        "meshserve/server/http_server.py",
        'scope["path"] not in OPEN_PATHS:',
        'scope["path"] not in OPEN_PATHS | {"/v1/completions"}:',
        ("tests/unit/test_api_key.py",),
    ),
    Mutant(
        "completions-stream-without-usage",
        "meshserve/server/http_server.py",
        'epilogue=lambda results: [oai.sse(oai.usage_chunk(rctx, "text_completion", results))]\n',
        'epilogue=lambda results: []\n',
        (f"{HTTP}::test_stream_event_sequence",),
    ),
    Mutant(
        "chunked-prefill-leaks-a-slot-per-chunk",
        "meshserve/scheduler/scheduler.py",
        "        slots = self.pool.alloc(take)\n        assert slots is not None  # _ensure_free guaranteed it\n",
        "        slots = self.pool.alloc(take + 1 if take < remaining else take)\n"
        "        assert slots is not None\n        slots = slots[:take]\n",
        (FAKE, "-k", "chunked"),
    ),
    Mutant(
        "flush-does-nothing",
        "meshserve/scheduler/scheduler.py",
        '        self.cache.reset()\n        return True, ""\n',
        '        return True, ""\n',
        (FAKE,),
    ),
    # The same two bugs against the tests that missed them before: the engine tests (now under the
    # KV accounting fixture) and /flush_cache over HTTP.
    Mutant(
        "chunked-prefill-leak-via-engine-tests",
        "meshserve/scheduler/scheduler.py",
        "        slots = self.pool.alloc(take)\n        assert slots is not None  # _ensure_free guaranteed it\n",
        "        slots = self.pool.alloc(take + 1 if take < remaining else take)\n"
        "        assert slots is not None\n        slots = slots[:take]\n",
        (ENGINE, "-k", "tiny_models_match_transformers and chunked-5 and qwen3"),
    ),
    Mutant(
        "flush-does-nothing-via-http",
        "meshserve/scheduler/scheduler.py",
        '        self.cache.reset()\n        return True, ""\n',
        '        return True, ""\n',
        (f"{HTTP}::test_flush_cache_empties_the_prefix_cache",),
    ),
    # --- further realistic bugs ---
    Mutant(
        "radix-match-one-too-far",
        "meshserve/cache/radix_cache.py",
        "            if n < len(child.key):\n                child = self._split(child, n)\n            child.touch()\n"
        "            parts.append(child.slots)",
        "            if n + 1 < len(child.key):\n                child = self._split(child, n + 1)\n"
        "            child.touch()\n            parts.append(child.slots)",
        ("tests/unit/test_radix_cache.py",),
    ),
    Mutant(
        "prefix-match-includes-last-token",
        "meshserve/scheduler/scheduler.py",
        "            match = self.cache.match_prefix(req.fill_ids[:-1])\n",
        "            match = self.cache.match_prefix(req.fill_ids)\n",
        (FAKE,),
    ),
    Mutant(
        "evict-ignores-locks",
        "meshserve/cache/radix_cache.py",
        "for leaf in self._leaves() if leaf.lock_ref == 0]",
        "for leaf in self._leaves()]",
        ("tests/unit/test_radix_cache.py",),
    ),
    Mutant(
        "retraction-leaks-duplicates",
        "meshserve/scheduler/scheduler.py",
        "        already = self.cache.insert(req.fill_ids[: req.kv_len], slots)\n"
        "        if already > req.prefix_len:\n            self.pool.free(slots[req.prefix_len : already])\n",
        "        already = self.cache.insert(req.fill_ids[: req.kv_len], slots)\n",
        (FAKE,),
    ),
    Mutant(
        "policy-orders-smallest-rank-first",
        "meshserve/scheduler/policy.py",
        "key=lambda r: (not r.output_ids, -rank[id(r)])",
        "key=lambda r: (not r.output_ids, rank[id(r)])",
        ("tests/unit/test_scheduler_policy.py",),
    ),
    Mutant(
        "max-new-tokens-off-by-one",
        "meshserve/scheduler/finish.py",
        "        if len(req.output_ids) >= sampling.max_new_tokens:\n",
        "        if len(req.output_ids) > sampling.max_new_tokens:\n",
        ("tests/unit/test_scheduler_policy.py",),
    ),
    Mutant(
        "top-p-keeps-boundary-token-out",
        "meshserve/executor/sampler.py",
        "            remove |= (mass_before >= top_p) & (top_p < 1.0)\n",
        "            remove |= (torch.cumsum(probs, dim=-1) >= top_p) & (top_p < 1.0)\n",
        ("tests/unit/test_sampler.py",),
    ),
    Mutant(
        "frequency-penalty-sign",
        "meshserve/executor/sampler.py",
        "        sub = sub - batch.frequency_penalties.unsqueeze(1) * counts\n",
        "        sub = sub + batch.frequency_penalties.unsqueeze(1) * counts\n",
        ("tests/unit/test_sampler.py",),
    ),
    Mutant(
        "stop-string-not-trimmed",
        "meshserve/server/detokenizer.py",
        "            return text[:position]\n",
        "            return text[: position + len(self.matched)]\n",
        ("tests/unit/test_detokenizer.py",),
    ),
    Mutant(
        "merged-deltas-lose-the-earlier-ids",
        "meshserve/server/tokenizer_manager.py",
        "delta, new_ids=earlier.new_ids + delta.new_ids,",
        "delta, new_ids=delta.new_ids,",
        ("tests/unit/test_tokenizer_manager.py",),
    ),
    Mutant(
        "error-waits-behind-later-deltas",
        "meshserve/server/tokenizer_manager.py",
        "        if self._error is not None:  # the request is ending: what came after its error is not shown\n"
        "            return\n",
        "",
        ("tests/unit/test_tokenizer_manager.py",),
    ),
]


def copy_tree(dest: Path) -> None:
    """The committed tree (HEAD) into dest: other engineers' uncommitted edits stay out."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def apply(mutant: Mutant, root: Path) -> bool:
    path = root / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        return False
    path.write_text(text.replace(mutant.old, mutant.new))
    return True


def run_tests(mutant: Mutant, root: Path, log: Path) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if mutant.fresh_cache:
        env["MESHSERVE_CACHE_DIR"] = str(root / ".mutant-cache")
    command = [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
    start = time.monotonic()
    with log.open("wb") as out:
        try:
            rc = subprocess.run(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    return rc, time.monotonic() - start


def check_imports_the_copy(root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(root)}
    where = subprocess.run([str(PYTHON), "-c", "import meshserve; print(meshserve.__file__)"], cwd=root, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root)):
        raise SystemExit(f"the copy is not what gets imported ({where}); mutants would test the live tree")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--baseline", action="store_true", help="run each selection on the unmutated copy")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--keep-logs", type=Path, help="copy each pytest log into this folder")
    args = parser.parse_args()
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:42} {m.file}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {sorted(unknown)}")
    selected = [m for m in MUTANTS if not args.names or m.name in args.names]

    print("| mutant | file | tests | result | time |\n|---|---|---|---|---|", flush=True)
    bad = 0
    for mutant in selected:
        with tempfile.TemporaryDirectory(prefix="meshserve-mutant-") as tmp:
            root = Path(tmp)
            copy_tree(root)
            check_imports_the_copy(root)
            if not args.baseline and not apply(mutant, root):
                result, seconds = "stale (snippet not found once)", 0.0
                bad += 1
            else:
                log = root / "pytest.log"
                rc, seconds = run_tests(mutant, root, log)
                if args.keep_logs:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, args.keep_logs / f"{mutant.name}.log")
                if args.baseline:
                    result = "passes" if rc == 0 else f"FAILS unmutated (rc {rc})"
                    bad += rc != 0
                else:
                    result = {0: "MISSED", 1: "caught", -1: "timeout"}.get(rc, f"error (rc {rc})")
                    bad += rc != 1
        tests = " ".join(mutant.tests).replace("|", "\\|")
        print(f"| {mutant.name} | {mutant.file} | `{tests}` | {result} | {seconds:.0f} s |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
