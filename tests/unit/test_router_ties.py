"""decision_margin (tests/router_ties.py), which names router near-ties and bounds them: the
margin of a hand-computed DeepSeek-V3 choice, and on random routers a perturbation of the choice
scores below it never changes Routing.select's experts."""

from __future__ import annotations

import torch

from meshserve.layers.moe.router import Routing
from tests.router_ties import decision_margin

V3 = Routing(num_experts=8, top_k=2, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2,
             group_score="top2_sum", correction_bias=True)


def test_margin_of_a_grouped_choice():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.6, 0.5, 0.2, 0.1]])
    logits = torch.logit(scores)
    # groups score 1.7, 0.8, 1.1, 0.3: groups 0 and 2 kept, 0.3 ahead of group 1; experts 0.9 and
    # 0.8 chosen, 0.2 ahead of 0.6 (group 1's 0.7 is out with its group)
    assert torch.allclose(decision_margin(V3, logits, torch.zeros(8)), torch.tensor([0.2]), atol=1e-6)
    # a bias that brings group 1 within 0.05 of group 2 (expert margins unchanged)
    bias = torch.tensor([0.0, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(decision_margin(V3, logits, bias), torch.tensor([0.05]), atol=1e-6)


def test_a_perturbation_below_the_margin_keeps_the_choice():
    gen = torch.Generator().manual_seed(0)
    for routing in (V3, Routing(num_experts=8, top_k=2), Routing(num_experts=8, top_k=2, num_groups=4, topk_groups=2)):
        logits = torch.randn(2000, 8, generator=gen) * 2
        bias = torch.randn(8, generator=gen) * 0.1 if routing.correction_bias else None
        margin = decision_margin(routing, logits, bias)
        assert (margin > 0).all() and (margin < 0.01).any()  # tight somewhere: not a vacuous bound
        # a group scores as the sum of two experts (top2_sum): each score moves below margin / 4
        noise = (torch.rand(2000, 8, generator=gen) * 2 - 1) * margin[:, None] / 4.01
        base = torch.zeros(8) if bias is None else bias  # select adds it to the scores, softmax or sigmoid
        _, ids = routing.select(logits, base)
        _, moved = routing.select(logits, base + noise)
        assert torch.equal(ids.sort(-1).values, moved.sort(-1).values)
