"""Router near-ties in a bf16 comparison with transformers: followed, named, and kept from
compounding.

In bf16 two implementations round a MoE block's input differently (~1 % apart), so a router
decision whose margin is smaller than that can go either way; in the tiny random DeepSeek-V3
another expert then moves the logits by up to ~80 %, far beyond the logits' own near-tie rule
(tests/greedy_compare.py). So the comparison follows the reference's routing. transformers'
router calls are recorded (`ReferenceRouting`: each call's input and choice), and each of
meshserve's router calls, the same call of the same generation (the prefill, then one decode
step per token), is checked against it (`FollowReference`):

* the router itself: transformers' router module run on meshserve's input must choose the same
  experts with the same weights (only float32 ties may differ) -- the scoring, correction bias,
  group limit, renormalisation and scaling, exactly;
* the hidden state at each router's input and at the final norm's output: as close to the
  reference's as HIDDEN_FACTOR times the reference's own bf16 error (against transformers in
  float32 over the same tokens, routed alike: `Float32Reference`), relative per token, as a root
  mean square and at the worst token, in the prefill and in the decode steps apart -- so an
  attention or expert fault shows layer by layer (the last layer's at the final norm), and the
  bound is bf16's on any device;
* the choice: where meshserve's differs from the reference's (its input differs, within those
  bounds, at a decision within that of a tie: margin below ROUTER_TIE), the token takes the
  reference's experts (weights from meshserve's own router) and the tie is named with its margin.

The test then compares the token streams with the logits' near-tie rule, as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshserve.layers.moe.router import Routing, TopKRouter

# A normed hidden state (a router's input, the final norm's output) of meshserve against
# transformers', both bf16, with routing followed, relative per token: its root mean square over
# the prefill's tokens (or the decode steps') and its largest value, each at most this times the
# same statistic of transformers' bf16 against its float32. Measured on CPU over the tiny
# DeepSeek-V3 (5 prompt sets, docs/moe.md): 0.58-0.71 (RMS; the two bf16 runs share much of their
# rounding) and 0.20-0.64 (largest).
HIDDEN_FACTOR = 1.5

# A routing difference (meshserve's input within bounds, its router exact) is a near-tie of
# the reference's decision: its margin (decision_margin, in biased sigmoid scores) is below this.
# Measured on CPU over 8 prompt sets: 145 differences, at margins up to 0.032 (median ~0.005).
ROUTER_TIE = 0.05

# Two float32 computations of the same router on the same input (torch here, a Triton kernel on
# CUDA) may order a decision this close differently and round its weights this far apart
# (relative); anything wider is a routing fault.
FLOAT32_TIE = 1e-5
WEIGHT_TOLERANCE = 1e-5

# The logits' near-tie of the tiny DeepSeek-V3 in bf16, with routing followed: its top-2 gap
# moves by up to 3.5 % between meshserve and transformers (99th percentile 2 %), and by up to
# 12.8 % between transformers' bf16 and its float32 where both route alike (99th percentile
# 4.1 %): greedy_compare's 1 % is below this model's bf16 noise (docs/moe.md).
DEEPSEEK_V3_NEAR_TIE = 0.04

# Added to the reference's experts' scores (in [0, 1]) to steer a router to them (_steered).
_STEER = 10.0


@dataclass(frozen=True)
class RouterCall:
    """One call of a router: which prompt, forward step (0: the prefill; n: the decode step that
    produces token n) and MoE layer (in call order)."""
    prompt: int
    step: int
    layer: int


@dataclass(frozen=True)
class RouterTie:
    call: RouterCall
    row: int  # the token within the call (its position, in the prefill)
    margin: float  # the reference's decision margin (decision_margin)
    own: tuple[int, ...]
    reference: tuple[int, ...]


@dataclass(frozen=True)
class RouterFault:
    """meshserve's router and transformers' disagree on the same input."""
    call: RouterCall
    row: int
    margin: float  # transformers' decision margin on meshserve's input
    own: tuple[int, ...]
    reference: tuple[int, ...]
    weight_error: float


def decision_margin(routing: Routing, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """logits [T, E] -> [T]: how far each top-k choice is from another one, the smaller of the
    group margin (the last kept group's score minus the best dropped group's) and the expert
    margin (the last chosen expert's choice score minus the best left-out one's, within the kept
    groups)."""
    scores = logits.float().softmax(-1) if routing.scoring == "softmax" else logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.float()
    margin = torch.full(choice.shape[:1], float("inf"), device=choice.device)
    if routing.num_groups > 1:
        grouped = choice.view(choice.shape[0], routing.num_groups, routing.num_experts // routing.num_groups)
        group_scores = grouped.max(-1).values if routing.group_score == "max" else grouped.topk(2, -1).values.sum(-1)
        ranked = group_scores.sort(-1, descending=True)
        margin = ranked.values[:, routing.topk_groups - 1] - ranked.values[:, routing.topk_groups]
        dropped = ranked.indices[:, routing.topk_groups:]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, dropped, True)
        choice = choice.masked_fill(mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    ranked = choice.sort(-1, descending=True).values
    return torch.minimum(margin, ranked[:, routing.top_k - 1] - ranked[:, routing.top_k])


def _steered(routing: Routing, logits: torch.Tensor, bias: torch.Tensor | None,
             ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`routing` (meshserve's reference path, on the CPU) steered to the experts `ids` [T, top_k]
    by a bias: their weights are the router's own unbiased scores of them."""
    steer = torch.zeros(logits.shape, dtype=torch.float32).scatter_(1, ids.cpu(), _STEER)
    if bias is not None:
        steer += bias.float().cpu()
    weights, chosen = routing.select(logits.float().cpu(), steer)
    return weights.to(logits.device), chosen.to(logits.device)


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-k choice in expert order (implementations list the chosen experts differently)."""
    ids, order = ids.sort(-1)
    return weights.gather(-1, order), ids


@dataclass(frozen=True)
class _Recorded:
    router: torch.nn.Module  # transformers' router module of the call's layer
    x: torch.Tensor  # its input [T, H]
    ids: torch.Tensor  # its choice [T, top_k], in expert order
    logits: torch.Tensor  # [T, E] float32


class ReferenceRouting:
    """Records every call of a transformers model's routers (DeepSeek-V3's `TopkRouter`, which
    returns router logits, weights and expert ids): per prompt, the calls in order. Pass
    `before_prompt` to greedy_compare.hf_greedy."""

    def __init__(self) -> None:
        self.prompts: list[list[_Recorded]] = []
        self.final: list[list[torch.Tensor]] = []  # per prompt, the final norm's output [T, H] per forward
        self.recording = True  # off once the reference has run (its routers then check meshserve's)

    def before_prompt(self, model: torch.nn.Module, prompt: int) -> None:
        if not self.prompts:
            routers = [m for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
            assert routers, f"{type(model).__name__} has no TopkRouter"
            for router in routers:
                router.register_forward_hook(self._record)
            model.get_submodule("model.norm").register_forward_hook(self._record_final)
        assert prompt == len(self.prompts)
        self.prompts.append([])
        self.final.append([])

    def _record_final(self, norm: torch.nn.Module, inputs, output) -> None:
        if self.recording:
            self.final[-1].append(output.detach().view(-1, output.shape[-1]))

    def _record(self, router: torch.nn.Module, inputs, output) -> None:
        if not self.recording:
            return
        logits, _, ids = output
        x = inputs[0].detach()
        self.prompts[-1].append(_Recorded(router, x.view(-1, x.shape[-1]), ids.detach().sort(-1).values,
                                          logits.detach().float()))


class FollowReference:
    """Hooks meshserve's routers: each call is checked against, and takes the experts of, the
    reference's same call; and its final norm (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, reference: ReferenceRouting) -> None:
        self.reference = reference
        reference.recording = False
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        assert self.routers, f"{type(model).__name__} has no MoE router"
        self.ties: list[RouterTie] = []
        self.faults: list[RouterFault] = []
        # (prompt, step, where, relative error per token of the step)
        self.hidden_errors: list[tuple[int, int, str, torch.Tensor]] = []
        self.prompt, self.calls, self.forwards = -1, 0, 0
        for router in self.routers:
            router.register_forward_hook(self._follow)
        model.get_submodule("norm").register_forward_hook(self._check_final)

    def start_prompt(self, prompt: int) -> None:
        self.prompt, self.calls, self.forwards = prompt, 0, 0

    def _compare_hidden(self, step: int, where: str, hidden: torch.Tensor, reference: torch.Tensor) -> None:
        reference = reference.to(hidden.device).float()
        error = (hidden.float() - reference).norm(dim=-1) / reference.norm(dim=-1)
        self.hidden_errors.append((self.prompt, step, where, error.cpu()))

    def _check_final(self, norm: torch.nn.Module, inputs, output) -> None:
        step, self.forwards = self.forwards, self.forwards + 1
        recorded = self.reference.final[self.prompt]
        if step < len(recorded):
            self._compare_hidden(step, "final norm", output[0] if isinstance(output, tuple) else output,
                                 recorded[step])

    def _follow(self, router: TopKRouter, inputs, output):
        index, self.calls = self.calls, self.calls + 1
        recorded = self.reference.prompts[self.prompt]
        if index >= len(recorded):  # past the reference's last forward (none is compared there)
            return None
        ref = recorded[index]
        call = RouterCall(self.prompt, *divmod(index, len(self.routers)))
        x, (weights, ids) = inputs[0], output
        self._check_router(call, router, x, weights, ids, ref)
        self._compare_hidden(call.step, f"MoE layer {call.layer}'s router", x, ref.x)
        differ = (ids.sort(-1).values != ref.ids.to(ids.device)).any(-1).nonzero().flatten()
        if differ.numel() == 0:
            return None
        bias = ref.router.e_score_correction_bias
        margins = decision_margin(router.routing, ref.logits[differ.to(ref.logits.device)], bias)
        for row, margin in zip(differ.tolist(), margins.tolist()):
            self.ties.append(RouterTie(call, row, margin, tuple(sorted(ids[row].tolist())),
                                       tuple(ref.ids[row].tolist())))
        # meshserve's own router on the differing tokens, steered to the reference's experts
        new_weights, new_ids = _steered(router.routing, F.linear(x[differ].float(), router.weight),
                                        router.e_score_correction_bias, ref.ids[differ.to(ref.ids.device)])
        weights, ids = weights.clone(), ids.clone()
        weights[differ], ids[differ] = new_weights, new_ids
        return weights, ids

    def _check_router(self, call: RouterCall, router: TopKRouter, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, ref: _Recorded) -> None:
        """transformers' router on meshserve's input: the same experts with the same weights."""
        with torch.no_grad():
            logits, ref_weights, ref_ids = ref.router(x.to(ref.x.device, ref.x.dtype))
        ref_weights, ref_ids = _by_expert(ref_weights.float(), ref_ids)
        weights, ids = _by_expert(weights.float(), ids)
        ref_weights, ref_ids = ref_weights.to(ids.device), ref_ids.to(ids.device)
        weight_error = ((weights - ref_weights).abs().max(-1).values / ref_weights.abs().max(-1).values)
        bad = ((ids != ref_ids).any(-1) | (weight_error > WEIGHT_TOLERANCE)).nonzero().flatten()
        if bad.numel() == 0:
            return
        margins = decision_margin(router.routing, logits[bad.to(logits.device)],
                                  ref.router.e_score_correction_bias).tolist()
        for row, margin in zip(bad.tolist(), margins):
            if (ids[row] != ref_ids[row]).any() and margin < FLOAT32_TIE:
                continue
            self.faults.append(RouterFault(call, row, margin, tuple(ids[row].tolist()), tuple(ref_ids[row].tolist()),
                                           float(weight_error[row])))

    def assert_followed(self, until_step: list[int], floor: list[tuple[int, int, str, torch.Tensor]]) -> None:
        """No router fault; and up to each prompt's `until_step` (the step of its first divergent
        token, or its last step; later the inputs differ), hidden states within HIDDEN_FACTOR of
        the reference's own bf16 error `floor` (Float32Reference.errors) and every routing
        difference a named near-tie."""
        assert not self.faults, f"{len(self.faults)} router choices differ from transformers' on the same input: " \
                                f"{self.faults[:3]}"

        def stats(errors, path: str, where: str) -> tuple[float, float, int]:
            at = torch.cat([e for prompt, step, w, e in errors if w == where and step <= until_step[prompt]
                            and (step == 0) == (path == "prefill")] or [torch.zeros(1)])
            return float(at.square().mean().sqrt()), float(at.max()), at.numel()

        for where in dict.fromkeys(w for _, _, w, _ in self.hidden_errors):
            for path in ("prefill", "decode"):
                (rms, worst, tokens), (ref_rms, ref_worst, _) = (stats(self.hidden_errors, path, where),
                                                                   stats(floor, path, where))
                if rms == 0.0:  # no decode step compared (a prompt diverging at once) or none differs
                    continue
                print(f"hidden state error, {path}, {where}: RMS {rms:.4f}, largest {worst:.4f} over {tokens} "
                      f"tokens; transformers' bf16 against its float32: {ref_rms:.4f}, {ref_worst:.4f}")
                assert rms <= HIDDEN_FACTOR * ref_rms and worst <= HIDDEN_FACTOR * ref_worst, \
                    f"{path}, {where}: off transformers' bf16 by {rms:.4f} RMS, {worst:.4f} at most, more than " \
                    f"{HIDDEN_FACTOR} x its own error ({ref_rms:.4f}, {ref_worst:.4f})"
        ties = [tie for tie in self.ties if tie.call.step <= until_step[tie.call.prompt]]
        for tie in ties:
            print(f"router near-tie followed: prompt {tie.call.prompt}, step {tie.call.step}, MoE layer "
                  f"{tie.call.layer}, token {tie.row}: margin {tie.margin:.4f}, experts {tie.own} "
                  f"(reference {tie.reference})")
        wide = [tie for tie in ties if tie.margin >= ROUTER_TIE]
        assert not wide, f"{len(wide)} routing differences without a near-tie: {wide[:3]}"


class Float32Reference:
    """transformers in float32 over each prompt and the bf16 reference's tokens (one forward),
    routed as the bf16 reference was: the bf16 reference's own error at each hidden state that
    FollowReference compares, per forward step of the bf16 run."""

    def __init__(self, model_dir, device: str, routing: list[Routing]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        routers = [m for m in self.model.modules() if type(m).__name__.endswith("TopkRouter")]
        assert len(routers) == len(routing)
        self.device, self.force, self.hidden = device, [], {}
        for layer, (router, layer_routing) in enumerate(zip(routers, routing)):
            router.register_forward_hook(lambda m, i, o, layer=layer, r=layer_routing: self._route(m, i, o, layer, r))
        self.model.get_submodule("model.norm").register_forward_hook(
            lambda m, i, o: self.hidden.__setitem__("final norm", o.detach().view(-1, o.shape[-1])))

    def _route(self, router: torch.nn.Module, inputs, output, layer: int, routing: Routing):
        self.hidden[f"MoE layer {layer}'s router"] = inputs[0].detach().view(-1, inputs[0].shape[-1])
        weights, ids = _steered(routing, output[0], router.e_score_correction_bias, self.force[layer])
        return output[0], weights, ids

    def errors(self, reference: ReferenceRouting, prompts: list[list[int]],
               tokens: list[list[int]]) -> list[tuple[int, int, str, torch.Tensor]]:
        out = []
        for i, (prompt, new) in enumerate(zip(prompts, tokens)):
            calls = reference.prompts[i]
            layers = len(calls) // len(reference.final[i])
            self.force = [torch.cat([c.ids for c in calls[layer::layers]]).to(self.device) for layer in range(layers)]
            with torch.no_grad():
                self.model(torch.tensor([prompt + new[:-1]], device=self.device))
            recorded = {f"MoE layer {layer}'s router": [c.x for c in calls[layer::layers]] for layer in range(layers)}
            recorded["final norm"] = reference.final[i]
            for where, steps in recorded.items():
                exact = self.hidden[where].float()
                start = 0
                for step, bf16 in enumerate(steps):
                    at = exact[start: start + bf16.shape[0]].to(bf16.device)
                    start += bf16.shape[0]
                    out.append((i, step, where, ((bf16.float() - at).norm(dim=-1) / at.norm(dim=-1)).cpu()))
        return out


def assert_bf16_greedy_follows_transformers(model_dir, device: str, *engine_args: str, near_tie: float) -> None:
    """greedy_compare's prompts in bf16 on `device`, meshserve against transformers with the
    reference's routing followed (module docstring), then the tokens equal but at a named
    near-tie of the logits. One prompt at a time, so that meshserve's router calls pair with the
    reference's (and no CUDA graphs: their replays run no hooks)."""
    from tests.greedy_compare import NEW_TOKENS, assert_matches, first_divergence, hf_greedy, random_prompts
    from tests.models import VOCAB_SIZE
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    prompts = random_prompts(VOCAB_SIZE)
    routing = ReferenceRouting()
    reference, ref_logits = hf_greedy(model_dir, torch.bfloat16, prompts, device, routing.before_prompt)
    scheduler = build_scheduler(model_dir, "--dtype", "bfloat16", *engine_args, device=device)
    follower = FollowReference(scheduler.runner.model, routing)
    outputs = []
    for i, prompt in enumerate(prompts):
        follower.start_prompt(i)
        outputs.append(output_ids(run_to_completion(scheduler, {"r": (prompt, greedy(NEW_TOKENS))})["r"]))
    floor = Float32Reference(model_dir, device, [r.routing for r in follower.routers]).errors(routing, prompts, reference)
    follower.assert_followed([first_divergence(got, ref) for got, ref in zip(outputs, reference)], floor)
    assert_matches(outputs, reference, ref_logits, "bfloat16", near_tie)
