"""ModelRunner: the model, its KV cache and one forward step, on one rank."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from meshserve.cache.kv_pool import KVPool, ReqToTokenPool
from meshserve.cluster.groups import ParallelGroups
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.cuda_graph import DECODE_INPUT_ROWS, CudaGraphRunner
from meshserve.executor.extend_graph import ExtendGraphRunner
from meshserve.executor.forward_batch import ForwardBatch, ForwardMode, HostLens
from meshserve.executor.host_copy import to_device_async
from meshserve.executor.loader import DTYPES, load_model
from meshserve.layers.attention import create_attention_backend, default_attention_backend
from meshserve.layers.attention.base import AttentionBackend
from meshserve.layers.moe.dispatch import announce as announce_moe_dispatch
from meshserve.layers.moe.eplb import ExpertBalancer, ExpertLoad

logger = logging.getLogger("meshserve")

# On CPU there is no "free memory" to take a fraction of; without --max-total-tokens the KV
# cache gets this many bytes (enough for tens of thousands of tokens of a small model).
CPU_DEFAULT_KV_BYTES = 1 << 30
DEFAULT_MEM_FRACTION_STATIC = 0.85
DEFAULT_CUDA_GRAPH_MAX_BS = 512  # large GPUs run a few hundred sequences at once


def max_running_requests(args: ServerArgs, max_total_tokens: int) -> int:
    """--max-running-requests, or as many request rows as 8 tokens of KV each allows (at most 1,024)."""
    return args.scheduler.max_running_requests or min(1024, max(1, max_total_tokens // 8))


@dataclass(frozen=True)
class StepInput:
    """The host-side description of one step, built by the scheduler."""

    mode: ForwardMode
    # EXTEND only. A DECODE step's input is each sequence's newest token, which the runner keeps
    # on the device (`record_tokens`), so a decode step can be launched before the host has
    # read the previous step's tokens.
    input_ids: list[int]
    positions: list[int]
    out_cache_loc: torch.Tensor  # int64 CPU
    req_rows: list[int]
    seq_lens: list[int]
    extend_lens: list[int]


class ModelRunner:
    def __init__(self, args: ServerArgs, model_config: ModelConfig, *, device: torch.device,
                 groups: ParallelGroups) -> None:
        self.model_config = model_config
        self.device = device
        groups = dataclasses.replace(groups, moe_a2a_backend=args.parallel.moe_a2a_backend,
                                     ep_num_redundant_experts=args.parallel.ep_num_redundant_experts)
        self.groups = groups
        announce_moe_dispatch(groups.moe_a2a_backend, groups.moe_ep)
        if args.scheduler.random_seed is not None:
            torch.manual_seed(args.scheduler.random_seed)
        self.model = load_model(model_config, device=device, groups=groups, dummy=args.model.load_format == "dummy")
        # Expert loads of MoE models (/metrics) and EPLB's rebalancing (layers/moe/eplb.py).
        self.expert_balancer = ExpertBalancer.of_model(
            self.model, groups.moe_ep,
            args.parallel.eplb_rebalance_num_iterations if args.parallel.enable_eplb else None)
        if self.expert_balancer is None:
            for flag, value in (("--ep-num-redundant-experts", groups.ep_num_redundant_experts),
                                ("--enable-eplb", args.parallel.enable_eplb)):
                if value:
                    raise ValueError(f"{flag}: {model_config.architecture} has no MoE layers")
        # Every rank of a DP group holds its share of every token's KV, so the pool is as large as
        # the smallest rank allows.
        self.max_total_tokens = groups.attn_tp.min_over_ranks(self._kv_capacity(args))
        self.max_running_requests = max_running_requests(args, self.max_total_tokens)
        self.kv_pool = KVPool(size=self.max_total_tokens, num_layers=model_config.num_layers,
                              num_kv_heads=self._local_kv_heads, head_dim=model_config.kv_head_dim,
                              dtype=self._kv_dtype(args), device=device, page_size=args.cache.page_size,
                              latent_v_dim=model_config.kv_latent_v_dim, scales=self._kv_scales(args))
        # +1 column: a request may hold KV for every position below the context length.
        self.req_to_token = ReqToTokenPool(max_requests=self.max_running_requests,
                                           max_context=model_config.context_length + 1, device=device)
        self.attn_backend = self._attention_backend(args.scheduler.attention_backend, device)
        # Each request row's newest sampled token: the input of its next decode step.
        self.last_tokens = torch.zeros(self.max_running_requests, dtype=torch.int64, device=device)
        self._step_rows: torch.Tensor | None = None  # request rows of the last forward step (device)
        logger.info("KV cache: %d tokens, %d request rows", self.max_total_tokens, self.max_running_requests)
        self.graphs: CudaGraphRunner | None = None
        self.extend_graphs: ExtendGraphRunner | None = None
        # DP attention's step contract (DPStep in docs/architecture.md): one token-count exchange
        # per step on every rank, then the forward (an idle one on a DP group without work).
        self.dp_attention = groups.layout.dp_attention and groups.dp.size > 1
        self.dp_peers_busy = False  # another DP group had work in the last step
        self.idle_forwards = 0  # forwards run with no tokens of this group's own (idle_step)
        # meshserve's all-to-all dispatcher reads its split sizes on the host: not capturable; nor
        # are DP attention's gathers, sized by each step's token counts.
        a2a = (groups.moe_a2a_backend != "none" and groups.moe_ep.size > 1) or self.dp_attention
        if device.type == "cuda" and not args.scheduler.disable_cuda_graph and a2a:
            logger.info("CUDA graphs off: the MoE all-to-all dispatcher or DP attention sizes its exchanges "
                        "on the host")
        if device.type == "cuda" and not args.scheduler.disable_cuda_graph and self.attn_backend.supports_cuda_graph \
                and not a2a:
            max_bs = min(args.scheduler.cuda_graph_max_bs or DEFAULT_CUDA_GRAPH_MAX_BS, self.max_running_requests)
            self.graphs = CudaGraphRunner(forward=self._forward_inference, make_batch=self._make_batch,
                                          max_bs=max_bs, device=device)
            logger.info("capturing CUDA graphs for decode batches up to %d", max_bs)
            self.graphs.capture()
            self.extend_graphs = ExtendGraphRunner(forward=self._forward_inference, make_batch=self._make_batch,
                                                   device=device)
            self.extend_graphs.capture(self.graphs.pool)
            if self.expert_balancer is not None:
                self.expert_balancer.reset()  # the capture's forwards routed dummy tokens

    def _attention_backend(self, requested: str | None, device: torch.device) -> AttentionBackend:
        """--attention-backend, or the device's default. Multi-head latent attention needs a
        backend that reads the latent KV layout: both do (the Triton kernels, the default on
        CUDA, at DeepSeek's 576-wide keys too, and with CUDA graphs)."""
        backend = create_attention_backend(requested or default_attention_backend(device.type))
        if self.model_config.is_mla and not backend.supports_latent_kv:
            raise ValueError(f"--attention-backend {requested} cannot run multi-head latent attention "
                             f"({self.model_config.architecture}); use torch_native or triton")
        return backend

    def _kv_dtype(self, args: ServerArgs) -> torch.dtype:
        return torch.float8_e4m3fn if args.cache.kv_cache_dtype == "fp8_e4m3" else DTYPES[self.model_config.dtype]

    def _kv_scales(self, args: ServerArgs) -> list[tuple[float, float]] | None:
        """Per-layer (K, V) scales of an FP8 KV cache: the checkpoint's, else 1.0."""
        found: dict[int, dict[str, float]] = self.model.kv_scales
        if args.cache.kv_cache_dtype != "fp8_e4m3":
            if found:
                logger.info("the checkpoint's k_scale/v_scale are unused: the KV cache is not FP8")
            return None
        scales = [(found.get(i, {}).get("k", 1.0), found.get(i, {}).get("v", 1.0))
                  for i in range(self.model_config.num_layers)]
        logger.info("KV cache in fp8_e4m3 with %s", f"the checkpoint's scales for {len(found)} layers (1.0 elsewhere)"
                    if found else "scale 1.0 (the checkpoint has no k_scale/v_scale)")
        return scales

    @property
    def _local_kv_heads(self) -> int:
        return self.model_config.kv_heads_per_rank(self.groups.attn_tp.size)

    def _kv_capacity(self, args: ServerArgs) -> int:
        per_token = KVPool.bytes_per_token(num_layers=self.model_config.num_layers, num_kv_heads=self._local_kv_heads,
                                           head_dim=self.model_config.kv_head_dim, dtype=self._kv_dtype(args),
                                           latent=self.model_config.is_mla)
        if args.cache.max_total_tokens is not None:
            return args.cache.max_total_tokens
        if self.device.type == "cpu":
            return max(1, CPU_DEFAULT_KV_BYTES // per_token)
        fraction = args.cache.mem_fraction_static or DEFAULT_MEM_FRACTION_STATIC
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * fraction) - (total - free)
        if budget < per_token * 16:
            raise RuntimeError(f"--mem-fraction-static {fraction} leaves no room for the KV cache after the weights "
                               f"({(total - free) / 2**30:.1f} GiB used of {total / 2**30:.1f} GiB)")
        return budget // per_token

    def forward(self, step: StepInput) -> torch.Tensor:
        """Logits [batch, vocab] float32 for each sequence's last new token. The new tokens' KV
        slots are written into the device's request-to-token table here (the scheduler keeps
        the host copy)."""
        seqs, tokens = len(step.req_rows), len(step.positions)
        dp_counts = self._exchange_dp_counts(tokens) if self.dp_attention else None
        decode = step.mode is ForwardMode.DECODE
        # Every per-step integer in one host-to-device copy:
        # [positions | KV slots | rows | lens], then for EXTEND [new tokens per sequence | ids].
        host = [torch.tensor(step.positions, dtype=torch.int64), step.out_cache_loc,
                torch.tensor(step.req_rows + step.seq_lens, dtype=torch.int64)]
        if not decode:
            host.append(torch.tensor(step.extend_lens + step.input_ids, dtype=torch.int64))
        on_device = to_device_async(torch.cat(host), torch.int64, self.device)
        positions, out_cache_loc, req_rows, seq_lens, *extend = on_device.split(
            [tokens, tokens, seqs, seqs] + ([] if decode else [seqs, tokens]))
        self._step_rows = req_rows
        extend_lens = None
        if decode:
            token_rows = req_rows
        else:
            extend_lens, input_ids = extend
            token_rows = torch.repeat_interleave(req_rows, extend_lens, output_size=tokens)
        self.req_to_token.table[token_rows, positions] = out_cache_loc
        if not decode and self.extend_graphs is not None and self.extend_graphs.can_run(seqs, tokens):
            logits = self.extend_graphs.replay(input_ids, positions, out_cache_loc, req_rows, seq_lens, extend_lens)
            self._forward_done()
            return logits
        if decode:
            input_ids = self.last_tokens.index_select(0, req_rows)
            if self.graphs is not None and self.graphs.can_run(seqs):
                # One token per sequence: the packed integers are the graph's other input rows.
                logits = self.graphs.replay(input_ids, on_device.view(DECODE_INPUT_ROWS - 1, seqs))
                self._forward_done()
                return logits
        logits = self._forward_inference(self._make_batch(
            mode=step.mode, input_ids=input_ids, positions=positions, out_cache_loc=out_cache_loc,
            req_rows=req_rows, seq_lens=seq_lens, extend_lens=extend_lens, dp_counts=dp_counts,
            host=HostLens(req_rows=step.req_rows, seq_lens=step.seq_lens, extend_lens=step.extend_lens)))
        self._forward_done()
        return logits

    def _forward_done(self) -> None:
        """After every forward step, real or idle (the same count on every rank of the group):
        gather expert loads, and rebalance the experts when EPLB's interval is up."""
        if self.expert_balancer is not None:
            self.expert_balancer.after_forward()

    def expert_load(self) -> ExpertLoad | None:
        """The expert loads for the leader's stats: None without MoE layers, and under DP
        attention outside DP group 0 (every group's MoE layers see every group's tokens, and the
        TokenizerManager sums the groups' reports)."""
        if self.expert_balancer is None or (self.dp_attention and self.groups.dp_rank != 0):
            return None
        return self.expert_balancer.report()

    def _exchange_dp_counts(self, tokens: int) -> list[int]:
        """DP attention: every DP group's token count for this step (over the dp group: its
        members hold one rank of each DP group). Called exactly once per step on every rank."""
        counts = self.groups.dp.gather_ints(tokens)
        self.dp_peers_busy = any(n for d, n in enumerate(counts) if d != self.groups.dp.rank)
        return counts

    def idle_step(self) -> None:
        """A step in which this group runs no forward of its own. Under DP attention: exchange
        counts, and join the other DP groups' MLP collectives if any of them has tokens. A step
        without any forward on any rank (the same on every rank of the group: no DP attention,
        or every DP group idle) gathers the expert loads still counted locally."""
        if self.dp_attention:
            counts = self._exchange_dp_counts(0)
            if any(counts):
                with torch.inference_mode():
                    self.model.idle_forward(counts)
                self.idle_forwards += 1
                self._forward_done()
                return
        if self.expert_balancer is not None:
            self.expert_balancer.flush()

    def record_tokens(self, token_ids: torch.Tensor, among: torch.Tensor | None = None) -> None:
        """Remember sampled tokens as their sequences' newest, on the device: token_ids[i]
        belongs to the i-th sequence of the last forward step, or to its among[i]-th."""
        assert self._step_rows is not None
        rows = self._step_rows if among is None else self._step_rows.index_select(0, among)
        self.last_tokens.index_copy_(0, rows, token_ids)

    def set_last_token(self, row: int, token: int) -> None:
        """Row `row`'s newest token, sampled elsewhere (a PD decode server gets the first token
        with the prompt's KV): the next decode step's input."""
        self.last_tokens[row] = token

    @torch.inference_mode()
    def _forward_inference(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def _make_batch(self, **fields) -> ForwardBatch:
        return ForwardBatch(kv_pool=self.kv_pool, req_to_token=self.req_to_token, attn_backend=self.attn_backend,
                            **fields)
