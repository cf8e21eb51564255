"""Unit tests for meshserve.executor.sampler (CPU; the CUDA test runs only where CUDA exists)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from meshserve.executor.penalty_counts import PenaltyCounts
from meshserve.executor.sampler import Sampler, SampleOutput, SamplingBatch, first_argmax
from meshserve.sampling_params import SamplingParams

CPU = torch.device("cpu")

# A crafted 7-token distribution with distinct probabilities (sorted descending).
PROBS = [0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02]
LOGITS = [math.log(p) for p in PROBS]


def build(
    params: Sequence[SamplingParams],
    outputs: Sequence[Sequence[int]] | None = None,
    *,
    vocab: int,
    eos: Sequence[int] = (),
    device: torch.device = CPU,
    top_logprobs: Sequence[int] | None = None,
    logprob: Sequence[bool] | None = None,
) -> SamplingBatch:
    """A batch whose rows have generated `outputs` (empty by default); the penalised rows' counts
    come from a PenaltyCounts fed with those outputs, as the scheduler's is."""
    n = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    penalised = [i for i, p in enumerate(params) if p.has_penalty]
    counts = None
    if penalised:
        table = PenaltyCounts(vocab, device)
        rows = table.rows(penalised)
        for r, i in enumerate(penalised):
            tokens = torch.tensor(outputs[i], dtype=torch.int64, device=device)
            table.add(rows[r].expand(len(tokens)), tokens)
        counts = table.counts(rows)
    return SamplingBatch.build(
        params,
        [len(out) for out in outputs],
        eos,
        vocab,
        device,
        top_logprobs if top_logprobs is not None else [0] * n,
        logprob if logprob is not None else [False] * n,
        penalty_counts=counts,
    )


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], **kw) -> SampleOutput:
    return Sampler().sample(logits, build(params, vocab=logits.shape[1], device=logits.device, **kw))


def reference_distribution(probs: Sequence[float], p: SamplingParams) -> list[float]:
    """Scalar, obviously-correct model of temperature -> top-k -> top-p -> min-p."""
    q = [x ** (1.0 / p.temperature) for x in probs]
    order = sorted(range(len(q)), key=lambda i: -q[i])
    keep = set(order[: p.top_k] if p.top_k > 0 else order)
    total = sum(q[i] for i in keep)
    mass, kept_p = 0.0, set()
    for i in order:
        if i in keep and mass < p.top_p:
            kept_p.add(i)
        if i in keep:
            mass += q[i] / total
    top = max(q)
    final = {i for i in kept_p if q[i] >= p.min_p * top}
    z = sum(q[i] for i in final)
    return [q[i] / z if i in final else 0.0 for i in range(len(q))]


def frequencies(tokens: torch.Tensor, vocab: int) -> list[float]:
    counts = torch.bincount(tokens, minlength=vocab).double()
    return (counts / counts.sum()).tolist()


def chi_square(tokens: torch.Tensor, expected: Sequence[float]) -> float:
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=len(expected)).tolist()
    stat = 0.0
    for c, e in zip(counts, expected):
        if e == 0.0:
            assert c == 0, "token outside the filtered support was drawn"
        else:
            stat += (c - n * e) ** 2 / (n * e)
    return stat


# ---------------------------------------------------------------------------------------------
# Greedy


def test_greedy_is_argmax_and_consumes_no_randomness() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    params = [SamplingParams(temperature=0.0)] * 8 + [SamplingParams(top_k=1, temperature=0.7)] * 8
    batch = build(params, vocab=50)
    assert batch.all_greedy and batch.fast_greedy

    state = torch.get_rng_state()
    out = Sampler().sample(logits, batch)
    assert torch.equal(torch.get_rng_state(), state), "greedy sampling must not touch the RNG"
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_logprob_ids is None and out.top_logprob_vals is None

    # The non-fast greedy path (logprobs asked) gives the same tokens and still draws no noise.
    out2 = sample(logits, params, logprob=[True] * 16)
    assert torch.equal(out2.token_ids, logits.argmax(-1))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cols", [128256, 49152, 1000, 97])
def test_first_argmax_equals_torch_argmax_with_ties_and_nan(cols: int) -> None:
    """Two-stage argmax: same index as torch.argmax (the first maximum; NaN wins), in bf16, on
    a padded slice, with maxima repeated inside one chunk and across chunks."""
    gen = torch.Generator().manual_seed(cols)
    padded = torch.randn(6, cols + 64, generator=gen).to(torch.bfloat16)
    x = padded[:, :cols]  # rows contiguous, not the tensor
    x[1, cols // 3] = x[1, cols - 1] = 9.0  # across chunks
    x[2, 5] = x[2, 6] = 9.0  # inside one chunk
    x[3] = 0.0  # all equal
    x[4, cols // 2] = float("nan")
    x[5, -1] = float("inf")
    expected = x.float().argmax(dim=-1)
    assert expected.tolist()[1:4] == [cols // 3, 5, 0]
    assert torch.equal(first_argmax(x), expected)


def test_top_k_one_equals_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(32, 100) * 3
    out = sample(logits, [SamplingParams(temperature=1.3, top_k=1, top_p=0.5, min_p=0.1)] * 32)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_temperature_to_zero_limit() -> None:
    torch.manual_seed(2)
    # Logits with gaps of at least 0.05: at T=1e-3 the runner-up has weight <= exp(-50).
    logits = torch.stack([torch.randperm(200).float() * 0.05 for _ in range(64)])
    out = sample(logits, [SamplingParams(temperature=1e-3)] * 64)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    # Below the greedy epsilon the row is treated as greedy outright (no overflow to NaN).
    batch = build([SamplingParams(temperature=1e-7)], vocab=200)
    assert batch.all_greedy
    # And the other limit: very hot sampling is close to uniform.
    hot = torch.tensor([LOGITS] * 20000)
    out = sample(hot, [SamplingParams(temperature=100.0)] * 20000)
    stat = chi_square(out.token_ids, reference_distribution(PROBS, SamplingParams(temperature=100.0)))
    assert stat < 30.0
    assert max(frequencies(out.token_ids, 7)) < 0.16  # ~1/7 each, not 0.40


# ---------------------------------------------------------------------------------------------
# Truncation filters


FILTER_CASES = [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.6), {0, 1}),  # mass before token 2 is 0.65 >= 0.6
    (SamplingParams(top_p=0.7), {0, 1, 2}),  # mass before token 2 is 0.65 < 0.7, before 3 is 0.8
    (SamplingParams(min_p=0.3), {0, 1, 2}),  # keep p >= 0.12
    (SamplingParams(min_p=0.5), {0, 1}),  # keep p >= 0.20
    (SamplingParams(top_k=5, top_p=0.9, min_p=0.2), {0, 1, 2, 3}),  # top-p keeps 4; min-p (0.08) keeps 4
    (SamplingParams(top_k=5, top_p=0.99, min_p=0.2), {0, 1, 2, 3}),  # min-p drops token 4 (0.05 < 0.08)
    (SamplingParams(temperature=0.5, top_p=0.8), {0, 1}),  # sharpened: q ~ p^2 -> 0.56, 0.22, 0.08...
]


@pytest.mark.parametrize(("params", "allowed"), FILTER_CASES)
def test_filters_stay_in_allowed_set_and_match_distribution(
    params: SamplingParams, allowed: set[int]
) -> None:
    torch.manual_seed(3)
    n = 20000
    logits = torch.tensor([LOGITS] * n)
    tokens = sample(logits, [params] * n).token_ids
    seen = set(tokens.unique().tolist())
    assert seen == allowed, f"drew {seen}, allowed {allowed}"

    expected = reference_distribution(PROBS, params)
    assert {i for i, e in enumerate(expected) if e > 0} == allowed  # the reference agrees
    # Chi-square with at most 6 degrees of freedom: 30 is far past the 0.9999 quantile (~27.9).
    assert chi_square(tokens, expected) < 30.0


def test_unfiltered_sampling_matches_softmax() -> None:
    torch.manual_seed(4)
    n = 20000
    tokens = sample(torch.tensor([LOGITS] * n), [SamplingParams()] * n).token_ids
    assert chi_square(tokens, PROBS) < 30.0


def test_top_k_exact_count_under_ties() -> None:
    # Five tokens tied for the top: top_k=2 must still keep exactly two of them.
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, -5.0]] * 2000)
    tokens = sample(logits, [SamplingParams(top_k=2)] * 2000).token_ids
    assert len(set(tokens.tolist())) == 2


def test_topk_and_sort_paths_agree() -> None:
    """Truncating rows get candidates from topk (all have top_k) or from a full sort (a row has
    top-p alone); the noise is indexed by token id, so seeded rows pick the same either way."""
    torch.manual_seed(9)
    vocab, n = 300, 200
    target = torch.randn(n, vocab) * 2
    params = [SamplingParams(top_k=40, top_p=0.8, min_p=0.05, seed=s) for s in range(n)]
    batch = build(params, vocab=vocab)
    assert batch.candidate_k == 40
    via_topk = Sampler().sample(target, batch).token_ids

    extra = SamplingParams(top_p=0.9)  # no top_k: forces the full sort for the whole batch
    mixed = build([*params, extra], vocab=vocab)
    assert mixed.candidate_k == 0
    via_sort = Sampler().sample(torch.cat([target, torch.randn(1, vocab)]), mixed).token_ids[:n]
    assert torch.equal(via_topk, via_sort)


def test_untruncated_rows_beside_topk_rows() -> None:
    # Rows without a cut share the batch with top-k rows: they must still see the whole vocabulary.
    torch.manual_seed(10)
    n = 20000
    params = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(min_p=0.3)] * (n // 2)
    batch = build(params, vocab=7)
    assert batch.candidate_k == 2 and batch.any_untruncated
    tokens = Sampler().sample(torch.tensor([LOGITS] * len(params)), batch).token_ids
    for offset in range(3):
        expected = reference_distribution(PROBS, params[offset])
        assert chi_square(tokens[offset::3], expected) < 30.0


def test_large_top_k_uses_full_sort() -> None:
    torch.manual_seed(11)
    vocab, n = 1500, 1000
    logits = torch.linspace(2.0, 0.0, vocab).unsqueeze(0).repeat(n, 1)  # token 0 most likely
    batch = build([SamplingParams(top_k=1100)] * n, vocab=vocab)  # above the topk cap (1024)
    assert batch.candidate_k == 0
    tokens = Sampler().sample(logits, batch).token_ids
    assert 1024 < int(tokens.max()) < 1100


def test_padding_columns_are_ignored() -> None:
    torch.manual_seed(5)
    vocab = 10
    logits = torch.randn(8, vocab + 6)
    logits[:, vocab:] = 1e4  # lm_head padding with junk values
    greedy = Sampler().sample(logits, build([SamplingParams(temperature=0.0)] * 8, vocab=vocab))
    assert torch.equal(greedy.token_ids, logits[:, :vocab].argmax(-1))
    batch = build([SamplingParams()] * 8, vocab=vocab, logprob=[True] * 8, top_logprobs=[3] * 8)
    sampled = Sampler().sample(logits, batch)
    assert int(sampled.token_ids.max()) < vocab
    assert int(sampled.top_logprob_ids.max()) < vocab


# ---------------------------------------------------------------------------------------------
# Penalties and min_new_tokens

PEN_LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]
PEN_OUTPUT = [0, 1, 1, 3, 3, 3]  # counts: token0 x1, token1 x2, token3 x3


def penalised(params: SamplingParams, output: Sequence[int] = PEN_OUTPUT) -> list[float]:
    logits = torch.tensor([PEN_LOGITS, PEN_LOGITS])
    before = logits.clone()
    # Row 1 has the same output but no penalty: it must come back untouched.
    batch = build([params, SamplingParams()], [output, output], vocab=6)
    adjusted = Sampler._apply_penalties(logits, batch)
    assert torch.equal(logits, before), "input logits must not be modified"
    assert adjusted[1].tolist() == PEN_LOGITS
    return adjusted[0].tolist()


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    got = penalised(SamplingParams(repetition_penalty=2.0))
    assert got == pytest.approx([1.0, -2.0, 0.5, 1.5, -2.0, 0.0])
    # r < 1 rewards repetition the same way round.
    got = penalised(SamplingParams(repetition_penalty=0.5))
    assert got == pytest.approx([4.0, -0.5, 0.5, 6.0, -2.0, 0.0])


def test_frequency_penalty_scales_with_count() -> None:
    got = penalised(SamplingParams(frequency_penalty=0.5))
    assert got == pytest.approx([1.5, -2.0, 0.5, 1.5, -2.0, 0.0])


def test_presence_penalty_is_flat() -> None:
    got = penalised(SamplingParams(presence_penalty=0.75))
    assert got == pytest.approx([1.25, -1.75, 0.5, 2.25, -2.0, 0.0])


def test_penalties_combine_in_order() -> None:
    got = penalised(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25))
    # repetition first, then - f*count - p.
    assert got == pytest.approx([1.0 - 0.5 - 0.25, -2.0 - 1.0 - 0.25, 0.5, 1.5 - 1.5 - 0.25, -2.0, 0.0])


def test_penalties_apply_to_greedy_rows_and_not_to_empty_outputs() -> None:
    logits = torch.tensor([PEN_LOGITS] * 2)
    params = [SamplingParams(temperature=0.0, repetition_penalty=4.0)] * 2
    out = sample(logits, params, outputs=[[3], []])
    # Row 0: token 3 (3.0) is penalised to 0.75 < 2.0 so token 0 wins; row 1 has no output yet.
    assert out.token_ids.tolist() == [0, 3]
    assert torch.equal(Sampler._apply_penalties(logits, build(params, [[], []], vocab=6)), logits)


def test_penalised_rows_need_their_counts() -> None:
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams()]
    with pytest.raises(ValueError, match=r"\[1, 6\] penalty_counts"):
        SamplingBatch.build(params, [2, 0], [], 6, CPU, [0, 0], [False, False])
    with pytest.raises(ValueError, match="penalty_counts"):
        SamplingBatch.build(params, [2, 0], [], 6, CPU, [0, 0], [False, False], penalty_counts=torch.zeros(2, 6))


def test_penalty_counts_rows_per_key_zeroed_on_reuse_kept_on_growth() -> None:
    table = PenaltyCounts(5, CPU)
    a, b = table.rows(["a", "b"]).tolist()
    assert a != b and table.rows(["b", "a"]).tolist() == [b, a]  # a key keeps its row
    table.add(torch.tensor([a, a, b]), torch.tensor([4, 4, 0]))  # a row may repeat
    assert table.counts(torch.tensor([a, b])).tolist() == [[0, 0, 0, 0, 2], [1, 0, 0, 0, 0]]
    table.release("a")
    table.release("never seen")
    assert table.num_rows_held == 1
    (c,) = table.rows(["c"]).tolist()
    assert c == a and table.counts(torch.tensor([c])).tolist() == [[0] * 5]  # recycled, zeroed
    many = table.rows([f"k{i}" for i in range(40)])  # grows past its first capacity
    assert len(set(many.tolist()) | {b, c}) == 42
    assert table.counts(torch.tensor([b])).tolist() == [[1, 0, 0, 0, 0]]  # survived the growth


def test_min_new_tokens_blocks_eos_and_stop_tokens() -> None:
    vocab, eos, stop = 8, 5, 3
    logits = torch.zeros(4, vocab)
    logits[:, eos] = 10.0
    logits[:, stop] = 9.0
    params = [
        SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[stop]),
        SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[stop]),
        SamplingParams(min_new_tokens=2, stop_token_ids=[stop]),
        SamplingParams(temperature=0.0, min_new_tokens=2),
    ]
    outputs = [[1, 1], [1, 1, 1], [], [1, 1]]
    out = sample(logits, params, outputs=outputs, eos=[eos], logprob=[True] * 4)
    tokens = out.token_ids.tolist()
    assert tokens[0] not in (eos, stop)  # 2 < 3 tokens so far: both blocked
    assert tokens[1] == eos  # 3 tokens: free again
    assert tokens[3] == eos  # reached its min_new_tokens
    # The sampled row: EOS and the stop id carry nearly all the mass, yet are never drawn.
    many = sample(torch.cat([logits[2:3]] * 2000), [params[2]] * 2000, outputs=[[]] * 2000, eos=[eos])
    assert not {eos, stop} & set(many.token_ids.tolist())
    # Logprobs stay those of the raw model: EOS keeps its (finite, large) log-prob.
    assert torch.isfinite(out.logprobs).all()


def test_generated_counts_decide_the_ban_and_the_seed() -> None:
    """`generated` includes a token still in flight: the ban and the seed depend on the count
    alone, not on which tokens the host has read."""
    params = [SamplingParams(temperature=0.0, min_new_tokens=3), SamplingParams(temperature=0.7, seed=9)]

    def built(generated: list[int]) -> SamplingBatch:
        return SamplingBatch.build(params, generated, [5], 8, CPU, [0, 0], [False, False])

    assert built([3, 3]).ban_rows is None  # 3 tokens: free
    assert built([2, 2]).ban_rows is not None  # 2 tokens: EOS still banned
    assert built([3, 3]).seeded_keys != built([2, 2]).seeded_keys


# ---------------------------------------------------------------------------------------------
# Seeds


def test_seeded_rows_reproducible_regardless_of_batch() -> None:
    torch.manual_seed(6)
    vocab = 500
    target = torch.randn(vocab)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    history = [7, 8, 9]

    torch.manual_seed(100)
    alone = sample(target.unsqueeze(0), [seeded], outputs=[history]).token_ids.item()

    # Different neighbours, different position, different default-RNG state.
    torch.manual_seed(200)
    others = torch.randn(5, vocab)
    logits = torch.cat([others[:3], target.unsqueeze(0), others[3:]])
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=99),
        SamplingParams(temperature=1.0),
        seeded,
        SamplingParams(top_k=5),
        SamplingParams(temperature=1.0, seed=1234),  # same seed, other logits: no interference
    ]
    outputs = [[1], [2, 3], [], history, [4], []]
    together = sample(logits, params, outputs=outputs).token_ids[3].item()
    assert together == alone

    # The noise advances with the output length: a run of steps is not one token repeated.
    flat = torch.zeros(1, vocab)
    steps = [sample(flat, [seeded], outputs=[[0] * n]).token_ids.item() for n in range(20)]
    assert len(set(steps)) > 10
    assert steps == [sample(flat, [seeded], outputs=[[0] * n]).token_ids.item() for n in range(20)]


def test_seeded_rows_follow_the_distribution() -> None:
    n = 5000
    params = [SamplingParams(top_k=5, seed=s) for s in range(n)]
    tokens = sample(torch.tensor([LOGITS] * n), params).token_ids
    assert chi_square(tokens, reference_distribution(PROBS, params[0])) < 30.0


# ---------------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(7)
    vocab = 40
    logits = torch.randn(4, vocab) * 2
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.7),
        SamplingParams(temperature=1.2, top_p=0.5, frequency_penalty=1.0),
        SamplingParams(),
    ]
    out = sample(
        logits,
        params,
        outputs=[[1, 2], [3], [4, 4], []],
        logprob=[True, True, False, True],
        top_logprobs=[2, 5, 9, 0],  # row 2's 9 does not count: it did not ask for logprobs
    )
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprob_ids is not None and out.top_logprob_vals is not None
    assert out.top_logprob_ids.shape == (4, 5) and out.top_logprob_ids.dtype == torch.int64
    assert torch.all(out.top_logprob_vals[:, :-1] >= out.top_logprob_vals[:, 1:])  # sorted descending
    assert torch.allclose(out.top_logprob_vals, ref.gather(1, out.top_logprob_ids))
    assert torch.equal(out.top_logprob_ids, ref.topk(5, dim=-1).indices)

    no_top = sample(logits, params, logprob=[True, False, False, False])
    assert no_top.logprobs is not None and no_top.top_logprob_ids is None


# ---------------------------------------------------------------------------------------------
# Mixed batches


def mixed_case(device: torch.device) -> tuple[torch.Tensor, list[SamplingParams], list[list[int]]]:
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(6, 64, generator=gen) * 2).to(device)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.9),
        SamplingParams(temperature=0.7, seed=42, top_k=10),
        SamplingParams(temperature=0.0, repetition_penalty=1e3, presence_penalty=2.0),
        SamplingParams(min_p=0.2, frequency_penalty=0.5, min_new_tokens=5),
        SamplingParams(temperature=1.0, seed=7),
    ]
    outputs = [[1], [], [5, 6], [int(logits[3].argmax())], [2, 2], [9] * 4]
    return logits, params, outputs


def check_mixed(device: torch.device) -> None:
    logits, params, outputs = mixed_case(device)
    before = logits.clone()
    out = sample(logits, params, outputs=outputs, eos=[0], logprob=[True] * 6, top_logprobs=[3] * 6)
    assert torch.equal(logits, before)
    tokens = out.token_ids.tolist()
    assert out.token_ids.device.type == device.type
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[3] != outputs[3][0]  # a huge repetition penalty on greedy row 3 moves it off
    assert tokens[4] != 0  # min_new_tokens blocks EOS id 0
    assert all(0 <= t < 64 for t in tokens)
    # The seeded rows give what they give alone.
    for row in (2, 5):
        solo = sample(logits[row : row + 1], [params[row]], outputs=[outputs[row]]).token_ids.item()
        assert tokens[row] == solo
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-5)


def test_mixed_batch_cpu() -> None:
    check_mixed(CPU)


def test_empty_batch() -> None:
    out = Sampler().sample(torch.empty(0, 10), build([], vocab=10))
    assert out.token_ids.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_without_host_syncs() -> None:
    device = torch.device("cuda")
    check_mixed(device)
    logits, params, outputs = mixed_case(device)
    sampler = Sampler()
    torch.cuda.synchronize()
    # Any synchronising CUDA call inside build() or sample() raises.
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = build(
            params, outputs, vocab=64, eos=[0], device=device, logprob=[True] * 6, top_logprobs=[3] * 6
        )
        out = sampler.sample(logits, batch)
        greedy_batch = build([SamplingParams(temperature=0.0)] * 6, vocab=64, device=device)
        greedy = sampler.sample(logits, greedy_batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.shape == (6,)
    assert greedy.token_ids.tolist() == logits.argmax(-1).tolist()
    # Frequencies on the GPU too.
    n = 20000
    many = torch.tensor([LOGITS] * n, device=device)
    p = SamplingParams(top_k=5, top_p=0.9)
    tokens = sampler.sample(many, build([p] * n, vocab=7, device=device)).token_ids.cpu()
    assert chi_square(tokens, reference_distribution(PROBS, p)) < 30.0
