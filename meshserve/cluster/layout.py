"""Which global ranks form each named process group, from --tp, --dp-size, --ep and
--enable-dp-attention — SGLang's layout, as pure arithmetic (no torch), so the argument checks
and the model-directory preflight use the same rules as the ranks.

With tp T, dp D and ep E:

* plain data parallelism (no --enable-dp-attention): D independent replicas of T ranks each,
  world = D × T; replica d is ranks [d·T, (d+1)·T). Inside a replica everything is as with D = 1.
* DP attention: world = T; attention runs tensor-parallel within D groups of T/D consecutive
  ranks (each a DP group that schedules its own batch); the MLP/MoE layers span all T ranks.

Within one replica (T ranks starting at b): the attention-TP groups are consecutive blocks of
T/D (of T without DP attention); the MoE-TP groups are consecutive blocks of T/E, and the MoE-EP
groups take one rank of each MoE-TP block (b + j, b + j + T/E, ...). The DP groups join the
ranks that hold the same attention-TP position in every DP group (j, j + T/D, ...), so every
rank reaches every DP group through its DP group.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP_KINDS: tuple[str, ...] = ("world", "tp", "attn_tp", "moe_ep", "moe_tp", "dp")


def layout_problems(tp: int, dp: int, ep: int, dp_attention: bool) -> list[str]:
    """Why these sizes (each >= 1) form no layout (empty when they do), naming the flags."""
    out = []
    if dp_attention and tp % dp:
        out.append(f"--tp {tp} must be divisible by --dp-size {dp} with --enable-dp-attention "
                   "(each DP group runs attention over tp / dp ranks)")
    if tp % ep:
        out.append(f"--tp {tp} must be divisible by --ep {ep} (MoE tensor-parallel size = tp / ep)")
    return out


@dataclass(frozen=True)
class GroupLayout:
    tp: int = 1
    dp: int = 1
    ep: int = 1
    dp_attention: bool = False

    def __post_init__(self) -> None:
        if min(self.tp, self.dp, self.ep) < 1:
            raise ValueError(f"parallel sizes must be >= 1: {self}")
        problems = layout_problems(self.tp, self.dp, self.ep, self.dp_attention)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def world_size(self) -> int:
        return self.tp if self.dp_attention else self.tp * self.dp

    @property
    def replicas(self) -> int:
        """Independent model replicas (each with all weights over its T ranks)."""
        return 1 if self.dp_attention else self.dp

    @property
    def attn_tp_size(self) -> int:
        return self.tp // self.dp if self.dp_attention else self.tp

    @property
    def moe_tp_size(self) -> int:
        return self.tp // self.ep

    def dp_rank(self, rank: int) -> int:
        """The DP group (scheduler) a global rank belongs to."""
        return rank // self.attn_tp_size

    @property
    def dp_leaders(self) -> list[int]:
        """The global rank that leads each DP group: the one that talks to the main process."""
        return [d * self.attn_tp_size for d in range(self.dp)]

    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every group of `kind` (one of GROUP_KINDS), each a tuple of global ranks in group order;
        together they partition the world."""
        T, A, M, E = self.tp, self.attn_tp_size, self.moe_tp_size, self.ep
        bases = [r * T for r in range(self.replicas)]
        if kind == "world":
            return [tuple(range(self.world_size))]
        if kind == "tp":
            return [tuple(range(b, b + T)) for b in bases]
        if kind == "attn_tp":
            return [tuple(range(s, s + A)) for s in range(0, self.world_size, A)]
        if kind == "moe_tp":
            return [tuple(range(b + k * M, b + (k + 1) * M)) for b in bases for k in range(E)]
        if kind == "moe_ep":
            return [tuple(b + j + k * M for k in range(E)) for b in bases for j in range(M)]
        if kind == "dp":
            return [tuple(j + d * A for d in range(self.dp)) for j in range(A)]
        raise ValueError(f"unknown group kind {kind!r}; one of {', '.join(GROUP_KINDS)}")

    def group_of(self, kind: str, rank: int) -> tuple[int, ...]:
        return next(g for g in self.groups(kind) if rank in g)


@dataclass(frozen=True)
class KVHeadShare:
    """The one rule for KV heads over an attention-TP group of `size` ranks: split evenly when
    there are at least `size` of them, otherwise each head is replicated on size / total
    consecutive ranks (rank r holds head r · total // size)."""

    total: int
    size: int

    def problem(self, over: str | None = None) -> str | None:
        """Why the heads cannot spread over the group (None when they can); `over` names the
        group's size for the user (default: "attention tensor-parallel size N")."""
        over = over or f"attention tensor-parallel size {self.size}"
        if self.total >= self.size and self.total % self.size:
            return f"{self.total} KV heads do not divide over {over}"
        if self.total < self.size and self.size % self.total:
            return f"{over} is not a multiple of the {self.total} KV heads (needed to replicate them evenly)"
        return None

    @property
    def per_rank(self) -> int:
        return max(1, self.total // self.size)

    def first_head(self, rank: int) -> int:
        if self.total < self.size:
            return rank * self.total // self.size
        return rank * self.per_rank
