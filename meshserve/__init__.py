"""meshserve: an LLM serving engine for many GPUs and many nodes, with an OpenAI-compatible API."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from meshserve.engine import AsyncEngine, Engine
    from meshserve.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "Engine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import meshserve` stays cheap (no torch import) for the CLI and router.
    if name in ("Engine", "AsyncEngine"):
        from meshserve import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from meshserve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
