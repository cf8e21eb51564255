"""Turn one step's logits into next tokens for a batch of sequences with mixed sampling params.

Pipeline, per row (all rows at once, as [B, V] tensor ops):

    raw logits ──► repetition / frequency / presence penalties (over OUTPUT tokens only, counted
                   on the device by the scheduler's PenaltyCounts)
               ──► grammar mask (structured output: tokens the row's grammar forbids set to -inf)
               ──► min_new_tokens ban (EOS and stop_token_ids set to -inf)
               ──► greedy rows: argmax, done
               ──► / temperature ──► top-k ──► top-p ──► min-p ──► draw (exponential race)

Logprobs (chosen token and top-k alternatives) are always taken from log_softmax of the RAW
logits: before penalties, bans and temperature. This is what OpenAI reports and vLLM does by
default: the user sees how likely the model found the token, not how likely our filtered
sampling distribution made it.

Two rules make the module safe to run on a GPU every step:

* `SamplingBatch.build` does all the host-side thinking (which rows are greedy, which need
  penalties, which stages can be skipped) and ships the per-row values to the device with
  non-blocking copies from pinned memory. The decisions are plain Python bools, so `sample`
  never has to read a device tensor to decide what to do: no host sync until the scheduler's
  final `.tolist()`.
* `Sampler.sample` has no Python loop over the batch except over rows that carry a `seed`
  (one RNG kernel each; see "Randomness" below). Tensor shapes depend only on host-side batch
  facts ([B, V], or [B, K] candidates), never on device values, so the work is data-independent.

Truncation (top-k/top-p) works on candidates sorted by descending logit: torch.topk(K) when
every truncating row has top_k <= K <= 1024, otherwise a full vocabulary sort (a row with top-p
and no top-k needs the whole tail). Both keep a prefix, so masks are position-based.

Randomness (the exponential race, i.e. the Gumbel-max trick):
    If E_v ~ Exponential(1) i.i.d., then argmax_v p_v / E_v is distributed exactly as p.
    In log space that is argmax_v (log p_v - log E_v); log p_v differs from the
    temperature-scaled, filtered logit only by a per-row constant, so the draw is
    `argmax(scaled_logits - log(E))`: one vectorised argmax, no softmax, no multinomial, and
    each row's randomness is nothing but its own row of E.
    * Unseeded rows: E comes from the device's default generator (torch.manual_seed governs it).
    * Seeded rows: E[row] is regenerated from a private torch.Generator seeded with
      `_row_seed(seed, len(output_ids))`. The noise therefore depends only on the request's
      seed and on how many tokens it has produced, never on its batch neighbours or its
      position in the batch: same seed + same prompt + same params => same tokens (given the
      same logits, i.e. the same model, device type and batch-invariant kernels; CPU and CUDA
      generators differ, so a seed reproduces per device type).
    * Greedy rows' tokens never depend on noise, and an all-greedy batch draws none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xgrammar

from meshserve.executor.host_copy import to_device_async
from meshserve.sampling_params import SamplingParams

__all__ = ["SampleOutput", "Sampler", "SamplingBatch"]

# Temperatures below this are treated as greedy: dividing logits by ~1e-6 overflows float32 to
# inf and the softmax to NaN, and the distribution is a point mass long before that anyway.
_GREEDY_TEMPERATURE_EPS = 1e-5

_U64 = (1 << 64) - 1

# When every sampled row that truncates (top-k and/or top-p) has top_k <= this, candidates come
# from torch.topk(max top_k) instead of a full vocabulary sort. On an H100 at [256, 152k],
# topk(1024) takes ~0.7 ms against ~3.3 ms for the sort, and topk's cost is flat up to here.
_MAX_TOPK_CANDIDATES = 1024


def _splitmix64(x: int) -> int:
    """The SplitMix64 finaliser: a cheap bijective 64-bit mixer (every input bit moves every output bit)."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _row_seed(seed: int, step: int) -> int:
    """Generator seed for a seeded row's noise at output position `step`.

    Hashing the seed first and adding the step afterwards makes the per-step seeds of one
    request a run of consecutive integers starting at a random point, so two requests' runs only
    meet with probability ~ steps / 2**64; the outer mix then spreads them into unrelated seeds.
    All output bits depend on all input bits, which matters on CPU where mt19937 keeps only the
    low 32 bits of the seed.
    """
    return _splitmix64((_splitmix64(seed & _U64) + step) & _U64)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` for a [B, V] tensor whose rows are contiguous: the first index of each
    row's maximum (NaN counts as the maximum), computed in two stages. torch reduces one row per
    thread block, so a few rows of a 128k vocabulary keep a few SMs busy for ~28 us on an H200;
    splitting each row into equal chunks spreads it over the whole GPU.
    The chunk holding a row's first maximum is the first chunk whose maximum equals it, and
    torch.max returns the first index within a chunk, so the tie rule is argmax's."""
    rows, cols = x.shape
    chunks = next((c for c in (256, 128, 64, 32, 16) if cols % c == 0 and cols // c >= 64), None)
    if chunks is None or x.stride(1) != 1:
        return x.argmax(dim=-1)
    width = cols // chunks
    chunk_max, chunk_idx = x.as_strided((rows, chunks, width), (x.stride(0), width, 1)).max(dim=-1)
    best = chunk_max.argmax(dim=-1, keepdim=True)
    return (best * width + chunk_idx.gather(1, best)).squeeze(1)


@dataclass
class SamplingBatch:
    """Everything `Sampler.sample` needs for one step, built by the scheduler from its requests.

    Invariants:
    * Per-row tensors are [B] on `device`; penalty tensors cover only the P rows that have a
      penalty (`penalty_rows` lists them, ascending).
    * The `need_*` / `all_greedy` flags are host bools consistent with the tensors; they let
      `sample` skip whole stages without looking at device data.
    * For greedy rows `temperatures` holds 1.0 (never divided by zero); `top_ks` holds
      `vocab_size` for rows without a top-k cut (so "keep position < top_k" is always right).
    """

    batch_size: int
    vocab_size: int
    device: torch.device

    # Host-side decisions (no device reads needed in `sample`).
    all_greedy: bool  # every row is greedy
    need_top_k: bool  # some sampled row has 1 < top_k < vocab_size
    need_top_p: bool  # some sampled row has top_p < 1
    need_min_p: bool  # some sampled row has min_p > 0
    # Candidates for the truncating rows: > 0 means "the top `candidate_k` logits suffice" (every
    # truncating row has top_k <= candidate_k); 0 means a full sort (some row has top-p alone).
    candidate_k: int
    any_untruncated: bool  # some sampled row has neither a top-k nor a top-p cut
    top_logprobs_k: int  # K of the [B, K] top-logprob outputs (0: none)
    any_logprob: bool  # some row asked for logprobs

    # Per-row [B] tensors. None on a fast-greedy batch: its plain argmax reads none of them, and
    # skipping them saves five host-to-device copies on every greedy decode step.
    is_greedy: torch.Tensor | None  # bool
    temperatures: torch.Tensor | None  # float32, 1.0 on greedy rows
    top_ks: torch.Tensor | None  # int64 in [1, vocab_size]
    top_ps: torch.Tensor | None  # float32 in (0, 1]
    min_ps: torch.Tensor | None  # float32 in [0, 1]

    # Penalties: None when no row needs them. [P] rows, [P, vocab_size] output-token counts.
    penalty_rows: torch.Tensor | None = None
    penalty_counts: torch.Tensor | None = None
    repetition_penalties: torch.Tensor | None = None
    frequency_penalties: torch.Tensor | None = None
    presence_penalties: torch.Tensor | None = None

    # min_new_tokens: (row, token) pairs to set to -inf this step; None when there are none.
    ban_rows: torch.Tensor | None = None
    ban_token_ids: torch.Tensor | None = None

    # Seeded, non-greedy rows and the generator seed of their noise for this step (host ints).
    seeded_rows: tuple[int, ...] = ()
    seeded_keys: tuple[int, ...] = ()

    # Structured output: [B, ceil(vocab_size / 32)] int32 bitmask of the allowed next tokens
    # (bit t % 32 of word t // 32; all ones for free rows), on `device`; None when no row has a
    # grammar. Built on the host from the rows' matchers (grammar/backend.py).
    token_bitmask: torch.Tensor | None = None

    @property
    def fast_greedy(self) -> bool:
        """True when `sample` may return a plain argmax of the logits (all rows greedy, no
        penalty, ban or logprob): exactly the batches `build` gives no per-row tensors."""
        return self.is_greedy is None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generated: Sequence[int],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
        top_logprobs_nums: Sequence[int],
        return_logprob: Sequence[bool],
        penalty_counts: torch.Tensor | None = None,
        token_bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        """Collect the per-row values on the host and ship them to `device` in a few async copies.

        `generated[i]`: how many tokens row i has generated so far, counting one still in flight
        (sampled, not yet read by the host): it decides the min_new_tokens ban and the seed.
        `penalty_counts`: [P, vocab_size] counts of the output tokens (in flight included) of
        the P rows with a penalty, in row order (PenaltyCounts keeps them); required when P > 0.
        `vocab_size` is the real vocabulary: logits columns beyond it (lm_head padding) are
        ignored by the sampler. `top_logprobs_nums[i]` only counts when `return_logprob[i]` is set.
        `token_bitmask`: the host bitmask of the rows' grammars (see the field), or None.
        """
        batch = len(params)
        if not (len(generated) == len(top_logprobs_nums) == len(return_logprob) == batch):
            raise ValueError("params, generated, top_logprobs_nums, return_logprob: lengths differ")
        device = torch.device(device)

        greedy: list[bool] = []
        temps: list[float] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        min_ps: list[float] = []
        need_top_k = need_top_p = need_min_p = any_untruncated = False
        max_cut_top_k = 0  # largest top_k among truncating rows (vocab_size if one has no top-k)
        seeded_rows: list[int] = []
        seeded_keys: list[int] = []
        pen_rows: list[int] = []
        reps: list[float] = []
        freqs: list[float] = []
        pres: list[float] = []
        ban_rows: list[int] = []
        ban_ids: list[int] = []

        for i, (p, n_generated) in enumerate(zip(params, generated)):
            is_greedy = p.is_greedy or p.temperature < _GREEDY_TEMPERATURE_EPS
            greedy.append(is_greedy)
            top_k = p.top_k if 0 < p.top_k < vocab_size else vocab_size
            temps.append(1.0 if is_greedy else p.temperature)
            top_ks.append(top_k)
            top_ps.append(p.top_p)
            min_ps.append(p.min_p)
            if not is_greedy:
                need_top_k |= top_k < vocab_size
                need_top_p |= p.top_p < 1.0
                need_min_p |= p.min_p > 0.0
                if top_k < vocab_size or p.top_p < 1.0:
                    max_cut_top_k = max(max_cut_top_k, top_k)
                else:
                    any_untruncated = True
                if p.seed is not None:
                    seeded_rows.append(i)
                    seeded_keys.append(_row_seed(p.seed, n_generated))

            if p.has_penalty:
                pen_rows.append(i)
                reps.append(p.repetition_penalty)
                freqs.append(p.frequency_penalty)
                pres.append(p.presence_penalty)

            if n_generated < p.min_new_tokens:
                banned = {t for t in (*eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab_size}
                ban_rows.extend([i] * len(banned))
                ban_ids.extend(sorted(banned))

        k = max((n for n, want in zip(top_logprobs_nums, return_logprob) if want), default=0)
        # topk(vocab_size) would just be a sort: 0 says "sort" explicitly.
        candidate_k = max_cut_top_k if max_cut_top_k <= min(vocab_size - 1, _MAX_TOPK_CANDIDATES) else 0
        fast_greedy = all(greedy) and not pen_rows and not ban_rows and not any(return_logprob)

        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor | None:
            return None if fast_greedy else to_device_async(values, dtype, device)

        out = cls(
            batch_size=batch,
            vocab_size=vocab_size,
            device=device,
            all_greedy=all(greedy),
            need_top_k=need_top_k,
            need_top_p=need_top_p,
            need_min_p=need_min_p,
            candidate_k=candidate_k,
            any_untruncated=any_untruncated,
            top_logprobs_k=min(max(k, 0), vocab_size),
            any_logprob=any(return_logprob),
            is_greedy=per_row(greedy, torch.bool),
            temperatures=per_row(temps, torch.float32),
            top_ks=per_row(top_ks, torch.int64),
            top_ps=per_row(top_ps, torch.float32),
            min_ps=per_row(min_ps, torch.float32),
            seeded_rows=tuple(seeded_rows),
            seeded_keys=tuple(seeded_keys),
        )
        if token_bitmask is not None:
            out.token_bitmask = to_device_async(token_bitmask, torch.int32, device)
        if pen_rows:
            if penalty_counts is None or penalty_counts.shape != (len(pen_rows), vocab_size):
                raise ValueError(f"{len(pen_rows)} penalised rows need [{len(pen_rows)}, {vocab_size}] penalty_counts")
            out.penalty_rows = to_device_async(pen_rows, torch.int64, device)
            out.penalty_counts = penalty_counts
            out.repetition_penalties = to_device_async(reps, torch.float32, device)
            out.frequency_penalties = to_device_async(freqs, torch.float32, device)
            out.presence_penalties = to_device_async(pres, torch.float32, device)
        if ban_rows:
            out.ban_rows = to_device_async(ban_rows, torch.int64, device)
            out.ban_token_ids = to_device_async(ban_ids, torch.int64, device)
        return out


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    # [B] float32: log-prob of the chosen token under log_softmax(raw logits); None if no row asked.
    logprobs: torch.Tensor | None = None
    # [B, K] K = max top_logprobs_num among rows asking for logprobs; sorted descending per row.
    top_logprob_ids: torch.Tensor | None = None  # int64
    top_logprob_vals: torch.Tensor | None = None  # float32


class Sampler:
    """Stateless apart from a cached torch.Generator per device for seeded rows."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
        """Pick one token per row. `logits` ([B, V'] with V' >= vocab_size) is never modified."""
        if logits.dim() != 2 or logits.shape[0] != batch.batch_size:
            raise ValueError(f"logits must be [{batch.batch_size}, V], got {tuple(logits.shape)}")
        if logits.shape[1] < batch.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns < vocab_size={batch.vocab_size}")
        # Columns past the real vocabulary are lm_head padding: never sampled, never in logprobs.
        raw = logits[:, : batch.vocab_size].float()
        allowed = raw
        if batch.token_bitmask is not None:
            # Out of place (`raw` stays the model's distribution for logprobs); on the device, with
            # xgrammar's kernel, so the host never waits for the logits.
            allowed = raw.clone()
            xgrammar.apply_token_bitmask_inplace(allowed, batch.token_bitmask, vocab_size=batch.vocab_size)

        if batch.fast_greedy:
            return SampleOutput(token_ids=first_argmax(allowed))
        assert batch.is_greedy is not None  # built for every batch that is not fast-greedy

        adjusted = self._apply_penalties(allowed, batch)
        if batch.ban_rows is not None:
            # Out of place: `raw` must stay untouched for logprobs.
            # The value is made on the device (new_full), not copied from the host.
            banned = (batch.ban_rows, batch.ban_token_ids)
            adjusted = adjusted.index_put(banned, adjusted.new_full((), float("-inf")))

        greedy_ids = adjusted.argmax(dim=-1)
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            sampled_ids = self._draw(adjusted, batch)
            # Full-batch where(): greedy rows ignore their (unused) noise; shapes stay static.
            token_ids = torch.where(batch.is_greedy, greedy_ids, sampled_ids)

        result = SampleOutput(token_ids=token_ids)
        if batch.any_logprob:
            # OpenAI/vLLM semantics: log-probs of the RAW model distribution (before penalties,
            # bans, temperature and truncation), not of the distribution we sampled from.
            logprobs = torch.log_softmax(raw, dim=-1)
            result.logprobs = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            if batch.top_logprobs_k > 0:
                vals, ids = torch.topk(logprobs, batch.top_logprobs_k, dim=-1, largest=True, sorted=True)
                result.top_logprob_vals = vals
                result.top_logprob_ids = ids
        return result

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Return penalised logits (a new tensor when any row is penalised; `logits` otherwise).

        Penalties count OUTPUT tokens only (SGLang's choice; vLLM's repetition penalty also
        counts the prompt). For a token seen c > 0 times in the row's output:
          repetition (HF/CTRL): logit > 0 -> logit / r, else logit * r   (pushes it down for r > 1)
          frequency:            logit -= f * c
          presence:             logit -= p
        applied in that order. They act on greedy rows too.
        """
        if batch.penalty_rows is None:
            return logits
        assert batch.penalty_counts is not None
        assert batch.repetition_penalties is not None
        assert batch.frequency_penalties is not None and batch.presence_penalties is not None
        rows = batch.penalty_rows
        sub = logits.index_select(0, rows)  # [P, V], a copy
        counts = batch.penalty_counts
        seen = counts > 0

        rep = batch.repetition_penalties.unsqueeze(1)
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
        sub = sub - batch.frequency_penalties.unsqueeze(1) * counts
        sub = sub - batch.presence_penalties.unsqueeze(1) * seen.to(sub.dtype)
        return logits.index_copy(0, rows, sub)

    def _draw(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race. Returns [B] int64.

        Computed for every row (greedy rows included, with temperature 1); the caller discards
        greedy rows' results. Every filter keeps at least the most likely token, so each row
        always has a finite candidate.

        The noise is indexed by vocabulary id whatever the path, so a row's token is the same
        whether its candidates came from topk or from a full sort (up to float rounding of the
        top-p cumsum at the boundary, which the two paths reduce in a different order).
        """
        scaled = logits / batch.temperatures.unsqueeze(1)
        gumbel = -self._exponential_noise(scaled, batch).log()  # argmax(p / E) == argmax(log p - log E)

        if not (batch.need_top_k or batch.need_top_p):
            return self._draw_untruncated(scaled, gumbel, batch)

        # Truncating rows work on candidates sorted by descending logit: all V (full sort) or
        # the top `candidate_k`. Both top-k and top-p keep a prefix of that order.
        if batch.candidate_k > 0:
            cand, cand_idx = torch.topk(scaled, batch.candidate_k, dim=-1, largest=True, sorted=True)
        else:
            cand, cand_idx = scaled.sort(dim=-1, descending=True)
        positions = torch.arange(cand.shape[1], device=cand.device).unsqueeze(0)
        # Position-based, so exactly top_k tokens survive even when logits tie at the boundary.
        remove = positions >= batch.top_ks.unsqueeze(1)
        if batch.need_top_p:
            # Smallest prefix whose mass reaches top_p, measured on the top-k-truncated and
            # renormalised distribution: a token stays iff the mass strictly before it is
            # < top_p, so the first token always stays. Rows with top_p == 1 cut nothing, even
            # where float rounding brings the cumsum to 1 before the tail.
            probs = torch.softmax(cand.masked_fill(remove, float("-inf")), dim=-1)
            mass_before = torch.cumsum(probs, dim=-1) - probs
            top_p = batch.top_ps.unsqueeze(1)
            remove |= (mass_before >= top_p) & (top_p < 1.0)
        if batch.need_min_p:
            # p < min_p * p_max in log space (see _draw_untruncated); the row maximum is candidate 0.
            remove |= cand < cand[:, :1] + torch.log(batch.min_ps).unsqueeze(1)
        scores = cand.masked_fill(remove, float("-inf")) + gumbel.gather(1, cand_idx)
        pick = scores.argmax(dim=-1, keepdim=True)
        token_ids = cand_idx.gather(1, pick).squeeze(1)

        if batch.candidate_k > 0 and batch.any_untruncated:
            # Rows with no top-k/top-p cut need the whole vocabulary, which topk did not give them.
            untruncated = self._draw_untruncated(scaled, gumbel, batch)
            has_cut = (batch.top_ks < batch.vocab_size) | (batch.top_ps < 1.0)
            token_ids = torch.where(has_cut, token_ids, untruncated)
        return token_ids

    @staticmethod
    def _draw_untruncated(scaled: torch.Tensor, gumbel: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The race over the whole vocabulary, with min-p as the only filter."""
        if batch.need_min_p:
            # p_v < min_p * p_max  <=>  logit_v < logit_max + log(min_p): no softmax needed, and
            # the ratio ignores renormalisation. min_p = 0 gives log(0) = -inf: nothing removed.
            top = scaled.max(dim=-1, keepdim=True).values
            scaled = scaled.masked_fill(scaled < top + torch.log(batch.min_ps).unsqueeze(1), float("-inf"))
        return (scaled + gumbel).argmax(dim=-1)

    def _exponential_noise(self, like: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[B, V] Exponential(1) noise: default generator for all rows, then seeded rows overwritten."""
        noise = torch.empty_like(like).exponential_()
        if batch.seeded_rows:
            gen = self._generator(like.device)
            for row, key in zip(batch.seeded_rows, batch.seeded_keys):
                # Re-seeding one generator per row is safe: each launch captures seed and offset.
                gen.manual_seed(key)
                noise[row].exponential_(generator=gen)
        # exponential_ may return exactly 0 in rare cases; -log(0) = +inf would turn a masked
        # (-inf) token into NaN, and argmax treats NaN as the maximum. Clamp to keep noise finite.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        return gen
