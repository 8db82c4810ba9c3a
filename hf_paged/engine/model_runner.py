"""Turns a ``ScheduledBatch`` into one packed forward of the model and returns the sampling rows' logits.

The packed batch is one row of ``T = sum(query_len)`` tokens: request b's tokens ``[context_len,
seq_len)`` in order, each at its own position. The attention never sees a mask: the ``hf_paged``
attention function reads the step's block tables and lengths from the cache (``set_step``), and a
tiny dummy 4D ``attention_mask`` makes transformers return it as-is instead of building one
(``masking_utils._preprocess_mask_arguments``: "If the mask is already 4D, simply return as-is").

Compiled steps (``compile="decode"`` or ``"all"``) run the same forward with the decoder layers through
``torch.compile`` (``fusion.CompiledLayers``). Under compilation the K/V write and the attention are one
custom op, ``hf_paged::write_and_attend`` (``integration/attention.py``), so Dynamo traces each decoder
layer whole and Inductor fuses the elementwise work around them (norms,
residual adds, RoPE, SiLU-mul, casts); decode graphs capture the compiled forward. The eager forward
stays the reference.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..integration.attention import CACHE_KWARG, active_cache, implementation_switch
from ..integration.cache import PagedCache
from ..integration.tensor_parallel import kv_heads_per_rank, tensor_parallel_size
from .cuda_graphs import DEFAULT_BUCKETS, DecodeGraphs
from .fusion import AUTO_COMPILE_MODEL_TYPES, CompiledLayers, ElementwiseFusion, compile_config, decoder_layers
from ..memory.kv_pool import KVLayout, KVPool
from ..memory.metadata import StepMetadata, build_step_metadata
from .scheduler import ScheduledBatch
from ..options import COMPILE_MODES


class _StepCache(PagedCache):
    """The runner's cache. Under ``torch.compile`` its ``update`` writes nothing: the attention function
    stores the step's K/V and attends in one op (``hf_paged::write_and_attend``), and ``layer_idx`` goes
    unread, so every layer traces to the same graph. Eagerly it is ``PagedCache.update`` itself."""

    writes_in_attention = True  # read by the attention function under torch.compile

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if not torch.compiler.is_compiling():
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return key_states, value_states


def kv_layout_from_config(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str) -> KVLayout:
    """The K/V shape of one token in one layer, from the config, so the pool is sized before any forward."""
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    # A tensor-parallel model computes only its rank's share of the KV heads (refused if uneven).
    num_kv_heads = kv_heads_per_rank(model)
    return KVLayout(config.num_hidden_layers, num_kv_heads, head_dim, dtype, torch.device(device))


def max_model_len(model: torch.nn.Module) -> int | None:
    """Longest sequence the model's positions cover (None when the config names no limit)."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True, slots=True)
class StepInputs:
    """One step as plain integers: what the runner computes, and what tensor parallelism sends from rank 0
    to the other ranks (``distributed.py``).

    Row ``b`` computes ``query_lens[b]`` tokens (its slice of ``input_ids``) ending at ``seq_lens[b]``,
    through ``block_tables[b]``; ``samples[b]``: its last token's logits are returned.
    """

    input_ids: Sequence[int]  # [T] packed, row after row
    query_lens: Sequence[int]  # [B]
    seq_lens: Sequence[int]  # [B]
    samples: Sequence[bool]  # [B]
    block_tables: Sequence[Sequence[int]]  # [B][blocks of row b]
    block_copies: Sequence[tuple[int, int]] = ()  # copy-on-write (src, dst), run before the forward
    swap_out: Sequence[tuple[int, int]] = ()  # preemption by swapping: (block, swap slot), first of all
    swap_in: Sequence[tuple[int, int]] = ()  # (swap slot, block), after swap_out
    # Packed token indices whose logits are returned too, after the sampling rows (prompt logprobs).
    extra_logit_rows: Sequence[int] = ()

    @classmethod
    def of(cls, batch: ScheduledBatch, extra_logit_rows: Sequence[int] = (), ids_on_device: bool = False) -> "StepInputs":
        """``ids_on_device``: a decode step whose token ids are not on the host yet (zeros stand in for
        them; the runner gets them as a device tensor)."""
        requests = batch.requests
        if ids_on_device:
            assert all(s.num_scheduled_tokens == 1 for s in requests), "only a decode step takes its ids from the device"
            input_ids: Sequence[int] = [0] * len(requests)
            query_lens: Sequence[int] = [1] * len(requests)
        elif all(s.num_scheduled_tokens == 1 for s in requests):  # decode steps: the common case, kept cheap
            input_ids = [s.request.token_ids[s.context_len] for s in requests]
            query_lens: Sequence[int] = [1] * len(requests)
        else:
            input_ids = []
            for s in requests:
                input_ids.extend(s.request.token_ids[s.context_len : s.context_len + s.num_scheduled_tokens])
            query_lens = [s.num_scheduled_tokens for s in requests]
        return cls(
            input_ids=input_ids,
            query_lens=query_lens,
            seq_lens=[s.context_len + s.num_scheduled_tokens for s in requests],
            samples=[s.samples for s in requests],
            block_tables=[s.request.block_ids for s in requests],
            block_copies=batch.block_copies,
            swap_out=batch.swap_out,
            swap_in=batch.swap_in,
            extra_logit_rows=extra_logit_rows,
        )


class ModelRunner:
    """Runs the model on packed steps against the pool, through a ``PagedCache`` planned by the scheduler.

    Args:
        model: a transformers causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
        pool: the KV pool (its layout must match what the model's layers produce).
        backend: attention backend ("auto", "torch" or "triton").
        cuda_graphs: replay captured CUDA graphs for decode steps (CUDA only).
        max_num_seqs: largest decode batch a graph is captured for.
        fuse_elementwise: run the model's RMSNorm / MLP modules compiled (``fusion.py``; CUDA only).
        compile: "off", "decode" (decode steps and their CUDA graphs run ``torch.compile`` of the model),
            "all" (every step does) or "auto" (``resolve_compile``). If compiling fails, the runner warns
            and runs eagerly from then on.
        compile_backend: ``torch.compile``'s backend ("inductor" fuses; "aot_eager" traces without generating code).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        backend: str,
        *,
        cuda_graphs: bool = False,
        max_num_seqs: int = 512,
        fuse_elementwise: bool = False,
        compile: str = "off",
        compile_backend: str = "inductor",
    ) -> None:
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.model = model
        self.pool = pool
        self.device = pool.layout.device
        self.cache = _StepCache.for_external_steps(pool, pool.layout.num_layers, backend=backend)
        self.switch = implementation_switch(model)
        # Returned as-is by the mask code; the paged attention ignores it.
        self.dummy_mask = torch.zeros((1, 1, 1, 1), dtype=pool.layout.dtype, device=self.device)
        self._layout_checked = False
        self._use_graphs = cuda_graphs and self.device.type == "cuda" and backend != "torch"
        self.max_num_seqs = max_num_seqs
        self.graphs: DecodeGraphs | None = None
        compile = resolve_compile(compile, model, self.device, backend, fuse_elementwise)
        use_fusion = fuse_elementwise and self.device.type == "cuda" and compile == "off"
        self.fusion = ElementwiseFusion(model) if use_fusion else contextlib.nullcontext()
        self.compile_mode = compile
        # Checked here, before any step: a model without a list of decoder layers is refused.
        self._compiled_layers = CompiledLayers(model, compile_backend) if compile != "off" else None
        if compile != "off":
            # The pool's shape never changes: static sizes keep its views' offsets simple in the graph.
            for t in (pool.kv, pool.scales):
                if t is not None:
                    torch._dynamo.mark_static(t)
        # Wall time of the steps that compiled (Dynamo traced a new shape class): startup cost, reported.
        self.compile_seconds = 0.0

    def prepare(self, max_seq_len: int) -> None:
        """Size the decode graphs' block tables for sequences of up to ``max_seq_len`` tokens.

        Graphs are captured lazily per batch bucket and recaptured only when a run needs wider tables.
        """
        if not self._use_graphs:
            return
        blocks = -(-max_seq_len // self.pool.block_size)
        width = 1 << max(0, blocks - 1).bit_length()  # a power of two: few distinct widths, few recaptures
        if self.graphs is None or self.graphs.width < width:
            if self.graphs is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a step scheduled ahead may still replay the old graphs
            if self.compile_mode == "off":
                self.graphs = DecodeGraphs(self.forward, self.pool, width, self.max_num_seqs)
            else:
                # Batches and tables of >= 2 (a batch of one replays the bucket of two): one compiled graph.
                forward = functools.partial(self.forward, compiled=True)
                buckets = tuple(b for b in DEFAULT_BUCKETS if b >= 2)
                self.graphs = DecodeGraphs(forward, self.pool, max(2, width), max(2, self.max_num_seqs), buckets)
            if self._layout_checked:  # capture needs a forward that already checked the layout
                self.graphs.capture_all()

    # The engine may schedule a decode step ahead and feed it the previous step's sampled ids on the
    # device (``execute(..., device_ids=...)``); the tensor-parallel driver cannot (its workers get
    # their ids from the host).
    takes_device_ids = True

    def execute(
        self, batch: ScheduledBatch, extra_logit_rows: Sequence[int] = (), device_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward the step; returns ``[R, V]`` logits of the requests that sample, in batch order, then
        those of the packed tokens ``extra_logit_rows``. ``device_ids``: a decode step's ``[R]`` token ids
        on the device (sampled by the previous step, not read back yet)."""
        return self.run(StepInputs.of(batch, extra_logit_rows, ids_on_device=device_ids is not None), device_ids)

    def run(self, step: StepInputs, device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``execute`` from the step's plain data (what tensor-parallel ranks receive from rank 0)."""
        if step.swap_out:  # preemption by swapping: first, the forward may reuse the blocks
            self.pool.swap_out(*map(list, zip(*step.swap_out)))
        if step.swap_in:
            self.pool.swap_in(*map(list, zip(*step.swap_in)))
        if step.block_copies:  # copy-on-write, before anything writes the copies
            src, dst = zip(*step.block_copies)
            self.pool.copy_blocks(list(src), list(dst))
        if (
            self.graphs is not None
            and self._layout_checked
            and len(step.input_ids) == len(step.seq_lens)
            and all(step.samples)
            and not step.extra_logit_rows
        ):
            # A decode step: one token per request, every request samples.
            logits = self.graphs.run(step.input_ids, step.seq_lens, step.block_tables, device_ids)
            if logits is not None:
                return logits
        query_lens, seq_lens = step.query_lens, step.seq_lens
        input_ids, block_tables, samples = step.input_ids, step.block_tables, step.samples
        if not self._layout_checked:
            compiled = False  # the layout check wraps cache.update for one eager forward
        else:
            decode = max(query_lens, default=0) == 1
            compiled = self.compile_mode == "all" or (self.compile_mode == "decode" and decode)
        if compiled:
            # One padding row (a token at position -1: no K/V slot, attends to nothing) with a two-block
            # table: rows, tokens and table width are then all >= 2, so the dynamic-shape graph compiled
            # for the first step serves every later one (a size of 1 would specialize into a new graph).
            query_lens, seq_lens = [*query_lens, 1], [*seq_lens, 0]
            input_ids, block_tables, samples = [*input_ids, 0], [*block_tables, [0, 0]], [*samples, False]
        # position of packed token t of row b = context_len[b] + (t - query_start[b])
        q = torch.tensor(query_lens, dtype=torch.int64)
        ends = torch.cumsum(q, 0)
        starts = ends - q
        context = torch.tensor(seq_lens, dtype=torch.int64) - q
        row = torch.repeat_interleave(torch.arange(len(query_lens)), q)
        positions = (context[row] + torch.arange(len(input_ids)) - starts[row]).clamp(min=0)  # padding: -1 -> 0

        host = torch.stack([torch.tensor(input_ids, dtype=torch.int64), positions])  # [2, T] int64: one copy
        keep_host = (ends - 1)[torch.tensor(samples, dtype=torch.bool)]  # each sampling row's last token
        if step.extra_logit_rows:
            keep_host = torch.cat([keep_host, torch.tensor(step.extra_logit_rows, dtype=torch.int64)])
        num_kept = len(keep_host)
        if compiled and num_kept < 2:  # at least two kept rows (the padding token's), cut off below
            keep_host = torch.cat([keep_host, torch.full((2 - num_kept,), len(input_ids) - 1, dtype=torch.int64)])
        if self.device.type == "cuda":
            host, keep_host = host.pin_memory(), keep_host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        if device_ids is not None:
            dev[0, : len(device_ids)].copy_(device_ids)
        logits_to_keep = keep_host.to(self.device, non_blocking=True)

        step_metadata = build_step_metadata(query_lens, seq_lens, block_tables, self.pool.block_size, self.device)
        if not self._layout_checked:
            self._check_layout_on_first_update()
        logits = self.forward(dev[0:1], dev[1:2], step_metadata, logits_to_keep, compiled=compiled)
        return logits[:num_kept] if compiled else logits

    def capture_graphs(self) -> None:
        """Capture every decode-graph bucket now (a startup cost) instead of each on its first use."""
        if self.graphs is not None and self._layout_checked:
            self.graphs.capture_all()

    def close(self) -> None:
        """Drop the captured graphs (and their memory pool)."""
        self.graphs = None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        step: StepMetadata,
        logits_to_keep: torch.Tensor,
        *,
        compiled: bool = False,
    ) -> torch.Tensor:
        """One packed forward (``[1, T]`` ids and positions) over the pool; ``[R, V]`` logits of the kept rows.

        The eager path and the captured decode graphs both run exactly this; ``compiled`` runs the model
        through ``torch.compile`` (same computation, fused elementwise kernels).
        """
        compiled = compiled and self.compile_mode != "off"  # off after a failed compile (see below)
        self.cache.set_step(step)
        extra = {}
        layers: Any = contextlib.nullcontext()
        settings: Any = contextlib.nullcontext()
        if compiled:
            layers, settings = self._compiled_layers, compile_config()
            extra = {CACHE_KWARG: self.cache}  # the ContextVar below is invisible to Dynamo
            frames = _compile_frames()
            start = time.perf_counter()
        try:
            with torch.inference_mode(), self.switch, self.fusion, active_cache(self.cache), layers, settings:
                out = self.model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    attention_mask=self.dummy_mask,
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=logits_to_keep,
                    **extra,
                )
        except torch._dynamo.exc.TorchDynamoException as error:
            if not compiled:
                raise
            # Dynamo or Inductor could not compile a layer (an unsupported construct, a compiler missing
            # on the machine): a slower engine beats a dead one. Safe to rerun: a layer that ran compiled
            # before the failure wrote the same K/V the eager rerun writes again.
            warnings.warn(
                f"torch.compile of the decoder layers failed ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); running eagerly from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            self.compile_mode, self._compiled_layers = "off", None
            return self.forward(input_ids, position_ids, step, logits_to_keep)
        if compiled and _compile_frames() != frames:  # this call compiled: count it as startup time
            self.compile_seconds += time.perf_counter() - start
        return out.logits[0]

    def _check_layout_on_first_update(self) -> None:
        """Wrap the cache's ``update`` for one forward to assert the real K/V match the pool's layout."""
        cache, layout = self.cache, self.pool.layout

        def checked_update(key_states, value_states, layer_idx, *args, **kwargs):
            _, heads, _, head_dim = key_states.shape
            got = (heads, head_dim, key_states.dtype, key_states.device)
            want = (layout.num_kv_heads, layout.head_dim, layout.dtype, layout.device)
            assert got == want and layer_idx < layout.num_layers, (
                f"the model's K/V of layer {layer_idx} are (heads, head_dim, dtype, device) = {got}, but the pool "
                f"was sized from the config as {want} with {layout.num_layers} layers"
            )
            del cache.update  # back to the class method: one check per generator is enough
            self._layout_checked = True
            return cache.update(key_states, value_states, layer_idx, *args, **kwargs)

        cache.update = checked_update


def resolve_compile(requested: str, model: torch.nn.Module, device: torch.device, backend: str, fuse_elementwise: bool) -> str:
    """The compile mode a runner uses: ``requested``, except that "auto" means "all" where compiled layers
    are measured and tested (CUDA, the Triton kernels, one GPU: compile under tensor parallelism is not
    tested, a model type in ``AUTO_COMPILE_MODEL_TYPES``, ``fuse_elementwise`` off) and "off" elsewhere."""
    if requested != "auto":
        return requested
    model_type = getattr(model.config.get_text_config(), "model_type", None)
    usable = (
        device.type == "cuda"
        and backend != "torch"
        and not fuse_elementwise
        and tensor_parallel_size(model) == 1
        and model_type in AUTO_COMPILE_MODEL_TYPES
        and bool(decoder_layers(model))
    )
    return "all" if usable else "off"


def _compile_frames() -> int:
    """How many frames Dynamo has compiled in this process (a counter that moves only when one does)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]
