"""NVIDIA Dynamo 1.6.1 for the tests that run meshserve under Dynamo's real runtime and frontend.

`pip install ai-dynamo` cannot work offline of pypi.nvidia.com: on Python 3.11-3.13 it requires
`aisimulate`, a PyPI placeholder that downloads its real wheel from NVIDIA's index at install
time, and only Dynamo's planner imports it. So the wheels are installed without dependencies
into a directory of their own (put on the PYTHONPATH of the Dynamo processes only), together
with the few runtime dependencies the project's environment lacks. Installed once per machine;
a failure raises (the Dynamo tests then fail, they do not skip).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DYNAMO_VERSION = "1.6.1"
# ai-dynamo's requirements that the project's environment does not already provide and that
# the frontend and runtime import (aisimulate: planner only; kubernetes: k8s discovery only).
EXTRA_REQUIREMENTS = ("uvloop",)
TARGET = Path.home() / ".cache" / "meshserve-tests" / f"ai-dynamo-{DYNAMO_VERSION}"


def ensure_dynamo() -> Path:
    """The directory to put on PYTHONPATH for `dynamo.frontend` and meshserve.dynamo.worker."""
    done = TARGET / ".installed"
    if done.exists():
        return TARGET
    packages = [f"ai-dynamo-runtime=={DYNAMO_VERSION}", f"ai-dynamo=={DYNAMO_VERSION}", *EXTRA_REQUIREMENTS]
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                             "--target", str(TARGET), *packages], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"installing NVIDIA Dynamo {DYNAMO_VERSION} failed:\n{result.stdout}\n{result.stderr}")
    check = subprocess.run([sys.executable, "-c", "import dynamo.llm, dynamo.runtime, dynamo.frontend.main"],
                           env={"PYTHONPATH": str(TARGET), "PATH": "/usr/bin:/bin"}, capture_output=True,
                           text=True, timeout=120)
    if check.returncode != 0:
        raise RuntimeError(f"NVIDIA Dynamo {DYNAMO_VERSION} installed but does not import:\n{check.stderr}")
    done.write_text(DYNAMO_VERSION)
    return TARGET
