"""GrammarQueue: structured requests waiting for their grammar, apart from the scheduler's
waiting queue, so that compiling never holds a step up.

A request enters when it arrives (its compilation starts then) and leaves for the waiting queue
once its grammar is compiled, with a fresh matcher. With tensor parallelism each rank compiles
on its own thread, so "compiled" is a rank-local fact: a request leaves only when every rank has
its grammar (one all-reduce per step while the queue is not empty, nothing with tp 1), and so
leaves in the same step everywhere (DESIGN §2). A compilation error is the same on every rank.
"""

from __future__ import annotations

from concurrent.futures import Future

import xgrammar

from meshserve.disagg.agreement import Agreement
from meshserve.grammar.backend import GrammarBackend
from meshserve.grammar.spec import GrammarSpec
from meshserve.scheduler.request import Req

OFF_MESSAGE = "structured output is off on this server (--grammar-backend none)"
NO_TOKENIZER_MESSAGE = "structured output needs the tokenizer (this server runs with --skip-tokenizer-init)"


class GrammarQueue:
    def __init__(self, backend: GrammarBackend | None, agreement: Agreement, off_reason: str | None) -> None:
        """`off_reason`: why `backend` is None (the message structured requests are refused with)."""
        self.backend = backend
        self.off_reason = off_reason
        self.agreement = agreement
        self.pending: list[tuple[Req, Future[xgrammar.CompiledGrammar]]] = []

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def compile(self, req: Req) -> Future[xgrammar.CompiledGrammar]:
        assert self.backend is not None and req.sampling.grammar is not None
        return self.backend.compile(GrammarSpec(*req.sampling.grammar))

    def add(self, req: Req) -> None:
        self.pending.append((req, self.compile(req)))

    def remove(self, req: Req) -> bool:
        for i, (queued, _) in enumerate(self.pending):
            if queued is req:
                del self.pending[i]
                return True
        return False

    def find(self, rid: str) -> Req | None:
        return next((req for req, _ in self.pending if req.rid == rid), None)

    def poll(self) -> list[tuple[Req, str | None]]:
        """The requests whose grammar every rank has, in arrival order, each with None (its
        `grammar` matcher is set) or the compilation error."""
        if not self.pending:
            return []
        facts = self.agreement.facts([future.done() for _, future in self.pending], [])
        done, still = [], []
        for i, (req, future) in enumerate(self.pending):
            if not facts.every(i):
                still.append((req, future))
                continue
            error = future.exception()
            if error is None:
                req.grammar = GrammarBackend.matcher(future.result())
            done.append((req, None if error is None else f"cannot compile the grammar: {error}"))
        self.pending = still
        return done

    def matcher_now(self, req: Req) -> str | None:
        """Give `req` its matcher at once, waiting for the compilation if need be (a PD decode
        server, whose request skipped the queue: its grammar has normally long been compiled by
        the time its KV arrived). The wait changes no decision, so ranks cannot diverge."""
        try:
            req.grammar = GrammarBackend.matcher(self.compile(req).result())
        except Exception as err:  # the compilation's own error, as in poll
            return f"cannot compile the grammar: {err}"
        return None
