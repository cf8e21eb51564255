"""Peak memory of the test run: the pytest process and everything it started (servers, ranks).

Opt in with ``MESHSERVE_TEST_MEMORY=1``: a daemon thread samples, every ``INTERVAL_S``, the
resident memory of the pytest process and the sum over its whole process tree (the servers and
scheduler ranks the tests start), remembering the test that ran at each peak. The summary is
printed at the end of the run (docs/testing.md, "Memory"). ``/usr/bin/time -v`` alone reports
only the largest single process, not the sum over the tree.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import psutil

INTERVAL_S = 0.25
ENV = "MESHSERVE_TEST_MEMORY"


@dataclass
class Peak:
    rss: int = 0
    test: str = "(collection)"


@dataclass
class MemoryWatch:
    current_test: str = "(collection)"
    own: Peak = field(default_factory=Peak)
    tree: Peak = field(default_factory=Peak)
    # Largest own-process growth over one test: points at what a test (or its fixtures) keeps.
    per_test_growth: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, name="memory-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> int:
        me = psutil.Process(os.getpid())
        own = me.memory_info().rss
        tree = own
        for child in me.children(recursive=True):
            try:
                tree += child.memory_info().rss
            except psutil.Error:  # exited meanwhile
                pass
        test = self.current_test
        if own > self.own.rss:
            self.own = Peak(own, test)
        if tree > self.tree.rss:
            self.tree = Peak(tree, test)
        return own

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.sample()

    def summary(self) -> list[str]:
        gib = 2**30
        lines = [f"peak RSS of the pytest process: {self.own.rss / gib:.2f} GiB (during {self.own.test})",
                 f"peak RSS of pytest + its servers and ranks: {self.tree.rss / gib:.2f} GiB (during {self.tree.test})",
                 "largest growth of the pytest process over one test:"]
        top = sorted(self.per_test_growth.items(), key=lambda item: -item[1])[:8]
        lines += [f"  {growth / 2**20:8.0f} MiB  {test}" for test, growth in top]
        return lines


WATCH: MemoryWatch | None = MemoryWatch() if os.environ.get(ENV) else None
