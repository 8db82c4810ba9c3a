"""CUDA graphs for the decode steps of ``enable()``'s ``generate``.

At batch 1 an eager decode step of a 32-layer model is mostly host work: stock ``generate`` launches
several hundred kernels per token, and the paged path adds two Triton launches per layer. Here the
whole forward of a decode step (every row brings one token) is captured once in a CUDA graph and then
replayed: the host work per step is the cache's block bookkeeping, two small host-to-device copies
and one replay.

Every tensor the captured forward reads that changes from step to step lives in static buffers owned
by the graph: the token ids, the positions, and the step's metadata (sequence lengths, the block
table padded to a fixed width, the slot each new token writes). The cache plans the step on the host
(``PagedCache.advance_decode_step``), the buffers are refreshed in place, then the graph replays.

A graph is keyed by the batch size, the block-table width (a power of two, sized from the call's
prompt plus ``max_new_tokens``), and the shapes and constant values of the forward's arguments, and
is reused by later ``generate`` calls. Only model families whose forward does nothing on the host that
depends on the step take this path (``GRAPH_MODEL_TYPES``: their positions default to the cache length
plus the step's offset, which is passed in explicitly here, and the attention mask only reaches the
mask function, which returns nothing for paged steps). Any other step, model or failure to capture
runs the ordinary eager path, with the same tokens.

The same code runs without capture (``capture=False``: the static buffers, eagerly) so that CPU tests
check it token for token against stock ``generate``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..memory.kv_pool import KVPool
from ..memory.metadata import StepMetadata
from .attention import CACHE_KWARG, TRITON_HEAD_DIMS
from .cache import PagedCache

logger = logging.getLogger("hf_paged")

# Model types checked token for token against stock generate through the static path (tests), under
# transformers 5.17 and 5.23: their positions default to the cache length plus the step's offset. (OPT,
# for one, derives positions from the attention mask, which the graphs cannot carry.)
GRAPH_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox"})

# Keyword arguments whose tensors change every step and are copied into the graph's buffers; any other
# tensor argument makes the step ineligible (its value would be baked into the graph).
_STEP_TENSORS = ("input_ids", "position_ids", "cache_position")
# Arguments that, when set, ask for outputs a graph does not return.
_REFUSED_FLAGS = ("output_attentions", "output_hidden_states", "labels", "inputs_embeds")
_HOST_ROPE_TYPES = ("dynamic", "longrope")
MIN_WIDTH = 16  # smallest block-table width captured (256 tokens at block size 16)
MAX_GRAPHS = 8  # graphs kept per model; the least recently used goes first


def capture_cuda_graph(fn: Callable[[], Any], *, pool: Any = None, error_mode: str = "global") -> tuple[Any, Any]:
    """``(graph, output)``: ``fn`` run twice on a side stream first (Triton compiles, cuBLAS picks its
    algorithms: neither may happen during capture), then one call captured. The engine's decode graphs
    and ``enable()``'s both capture through this. ``pool``: a graph memory pool to share; ``error_mode``:
    ``torch.cuda.graph``'s ``capture_error_mode``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=error_mode):
        output = fn()
    return graph, output


def table_width(blocks_needed: int, expected_len: int, block_size: int) -> int:
    """Block-table width of a step's graph: a power of two covering this step and, when known, the
    call's expected length, so one graph serves a whole call."""
    need = max(blocks_needed, -(-expected_len // block_size), MIN_WIDTH)
    return 1 << (need - 1).bit_length()


@dataclass(slots=True)
class _Graph:
    """Static buffers of one captured decode step (and its graph, once captured)."""

    batch: int
    width: int
    pool: KVPool  # held so the captured pool addresses stay valid as long as the graph
    host32: list[torch.Tensor]  # two pinned int32 [B + B*W]: seq_lens, block table (double-buffered)
    host64: list[torch.Tensor]  # two pinned int64 [B + B]: slot each row writes, position of its token
    host_views: list[tuple[np.ndarray, np.ndarray]]  # numpy views of the staging buffers (cheap writes)
    done: list[Any]  # per staging buffer: the event after its last copy (None before the first)
    dev32: torch.Tensor
    dev64: torch.Tensor
    step: StepMetadata
    inputs: dict[str, torch.Tensor]  # static input_ids / position_ids / cache_position
    turn: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    # The captured forward's output type and fields (its logits are the graph's output buffer); the
    # cache field is left out, so a graph never keeps a call's cache (and its blocks) alive.
    output: tuple | None = None
    weights: tuple = ()  # data pointers of the parameters the graph was captured with
    checked_for: Any = None  # weak reference to the last call's cache whose weights were checked


class DecodeGraphs:
    """Runs eligible decode forwards of one enabled model from static buffers, captured in CUDA graphs.

    Args:
        model: the enabled model (its type must be in ``GRAPH_MODEL_TYPES``).
        capture: record CUDA graphs (CUDA only); False runs the static-buffer path eagerly (tests).
        compile: run the forward through ``torch.compile`` (the graphs then capture the compiled
            forward: elementwise work fused around the opaque paged-attention and K/V-write ops).
        compile_backend: ``torch.compile``'s backend ("inductor" fuses; tests also use "aot_eager").
    """

    def __init__(
        self, model: torch.nn.Module, capture: bool = True, compile: bool = False, compile_backend: str = "inductor"
    ) -> None:
        self.model = model
        self.capture = capture
        self.compile = compile
        self.compile_backend = compile_backend
        self._compiled: tuple[Any, Any] | None = None  # (forward, its torch.compile)
        self.capture_seconds = 0.0  # warm-up (and compile) plus capture, all graphs
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._failed: set[tuple] = set()
        # One step at a time: the buffers are shared. A second thread's step runs the eager path.
        self._lock = threading.Lock()
        self.replays = 0  # steps served by a graph replay (capture) or the static path (no capture)
        self.captures = 0

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        config = model.config.get_text_config()
        if getattr(config, "model_type", None) not in GRAPH_MODEL_TYPES:
            return False
        # RoPE variants that pick their frequencies on the host from the positions seen so far (a
        # device-to-host read each step, and a choice a graph would freeze) stay eager.
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        kinds = [rope] if "rope_type" in rope or "type" in rope else [v for v in rope.values() if isinstance(v, dict)]
        return not any(k.get("rope_type", k.get("type")) in _HOST_ROPE_TYPES for k in kinds)

    def clear(self) -> None:
        """Drop every graph (the pool or the weights they were captured with changed)."""
        with self._lock:
            self._graphs.clear()
            self._failed.clear()

    # ---- the step ------------------------------------------------------------------------------
    def run(self, forward: Callable[..., Any], cache: PagedCache, kwargs: dict) -> Any | None:
        """The output of ``forward(**kwargs)`` for an eligible decode step, or None (caller runs it)."""
        input_ids = kwargs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return None
        batch = input_ids.shape[0]
        if self.model.training or not cache.static_decode_ready(batch):
            return None
        key_args = self._argument_key(kwargs)
        if key_args is None:
            return None
        pool = cache.pool
        device = pool.layout.device
        if self.capture and not self._capturable(cache, device):
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            # Streams, events and graphs belong to the current device: make it the model's.
            if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
                return self._step(forward, cache, kwargs, batch, key_args)
            with torch.cuda.device(device):
                return self._step(forward, cache, kwargs, batch, key_args)
        finally:
            self._lock.release()

    def _step(self, forward: Callable[..., Any], cache: PagedCache, kwargs: dict, batch: int, key_args: tuple) -> Any:
        """Plan the step on the host, refresh the buffers, then replay (capturing first if new)."""
        pool = cache.pool
        cache.advance_decode_step()
        bs = pool.block_size
        width = table_width(max(map(len, cache._blocks)), cache.expected_len, bs)
        key = (batch, width, id(pool), key_args)
        graph = self._graphs.get(key)
        if graph is not None and graph.graph is not None and not self._same_weights(graph, cache):
            del self._graphs[key]
            graph = None
        fresh = graph is None
        if fresh:
            graph = self._new_graph(batch, width, pool, kwargs)
            self._graphs[key] = graph
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        self._load(graph, cache, kwargs)
        if graph.graph is not None:  # the common case: nothing else to prepare
            graph.graph.replay()
            cache.step = graph.step
            self.replays += 1
            return self._result(None, cache, graph)
        call = self._call_kwargs(graph, cache, kwargs)
        if self.compile:
            forward = self._compiled_forward(forward)
            call[CACHE_KWARG] = cache  # Dynamo cannot read the cache from the attention's ContextVar
        if fresh and self.capture and key not in self._failed:
            self._capture(key, graph, forward, cache, call)
        if graph.graph is not None:
            graph.graph.replay()
            cache.step = graph.step
            output = None
        else:
            graph.step.plans.clear()  # the torch path's per-step plans are stale with new values
            with cache.static_step(graph.step):
                output = forward(**call)
        self.replays += 1
        return self._result(output, cache, graph)

    def _compiled_forward(self, forward: Callable[..., Any]) -> Any:
        if self._compiled is None or self._compiled[0] is not forward:
            # The bound forward, not the module: the enable hooks around it stay eager.
            self._compiled = (forward, torch.compile(forward, backend=self.compile_backend))
        return self._compiled[1]

    def _argument_key(self, kwargs: dict) -> tuple | None:
        """Shapes of the step tensors and values of the other arguments, or None when not eligible."""
        key = []
        for name, value in sorted(kwargs.items()):
            if name in ("past_key_values", "attention_mask"):
                continue
            if name in _REFUSED_FLAGS:
                if value is None or value is False:
                    continue
                return None
            if isinstance(value, torch.Tensor):
                if name not in _STEP_TENSORS:
                    return None
                key.append((name, tuple(value.shape), value.dtype, value.device))
            else:
                try:
                    hash(value)
                except TypeError:
                    return None
                key.append((name, value))
        return tuple(key)

    def _capturable(self, cache: PagedCache, device: torch.device) -> bool:
        """CUDA, and the Triton kernels (the torch attention path plans each step on the host)."""
        layout = cache.pool.layout
        return device.type == "cuda" and cache.backend != "torch" and layout.head_dim in TRITON_HEAD_DIMS

    def _weights(self) -> tuple:
        return tuple(t.data_ptr() for t in self.model.parameters()) + tuple(
            t.data_ptr() for t in self.model.buffers()
        )

    def _same_weights(self, graph: _Graph, cache: PagedCache) -> bool:
        """Whether the model still has the parameters the graph replays (``model.to``, an assigned
        state dict or merged adapters replace them). Checked once per generate call and graph."""
        if graph.checked_for is not None and graph.checked_for() is cache:
            return True
        graph.checked_for = weakref.ref(cache)
        return graph.weights == self._weights()

    # ---- buffers -------------------------------------------------------------------------------
    def _new_graph(self, batch: int, width: int, pool: KVPool, kwargs: dict) -> _Graph:
        device = pool.layout.device
        pin = device.type == "cuda"
        dev32 = torch.zeros(batch + batch * width, dtype=torch.int32, device=device)
        dev64 = torch.zeros(2 * batch, dtype=torch.int64, device=device)
        step = StepMetadata(
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
            seq_lens=dev32[:batch],
            block_tables=dev32[batch:].view(batch, width),
            slot_mapping=dev64[:batch],
            max_query_len=1,
            max_seq_len=width * pool.block_size,
        )
        inputs = {
            name: torch.zeros_like(kwargs[name])
            for name in _STEP_TENSORS
            if isinstance(kwargs.get(name), torch.Tensor)
        }
        if "position_ids" not in inputs:
            # The model's default, the cache length plus the step's offset (the same for every row),
            # made a buffer so that it is not computed on the host once and frozen into the graph.
            inputs["position_ids"] = dev64[batch : batch + 1].view(1, 1)
        host32 = [torch.zeros(dev32.shape, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        host64 = [torch.zeros(dev64.shape, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        return _Graph(
            batch=batch,
            width=width,
            pool=pool,
            host32=host32,
            host64=host64,
            host_views=[(a.numpy(), b.numpy()) for a, b in zip(host32, host64)],
            done=[None, None],
            dev32=dev32,
            dev64=dev64,
            step=step,
            inputs=inputs,
        )

    def _load(self, graph: _Graph, cache: PagedCache, kwargs: dict) -> None:
        """The step's lengths, table, slots and position into pinned buffers, one copy each to the
        device, and the step's input tensors into their buffers (device to device)."""
        turn = graph.turn
        graph.turn ^= 1
        if graph.done[turn] is not None:
            graph.done[turn].synchronize()  # its previous copy finished long ago in practice
        h32, h64 = graph.host_views[turn]
        lens = cache._lens
        batch, width, bs = graph.batch, graph.width, cache.pool.block_size
        h32[:batch] = lens
        table = h32[batch:].reshape(batch, width)
        for row, blocks in enumerate(cache._blocks):
            table[row, : len(blocks)] = blocks
            last = lens[row] - 1
            h64[row] = blocks[last // bs] * bs + last % bs
        h64[batch] = cache.get_seq_length() - 1  # this step's column: the position models default to
        graph.dev32.copy_(graph.host32[turn], non_blocking=True)
        graph.dev64.copy_(graph.host64[turn], non_blocking=True)
        if graph.dev32.is_cuda:
            event = graph.done[turn] or torch.cuda.Event()
            event.record()
            graph.done[turn] = event
        for name, buffer in graph.inputs.items():
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor):
                buffer.copy_(value)

    def _call_kwargs(self, graph: _Graph, cache: PagedCache, kwargs: dict) -> dict:
        call = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        call.update(graph.inputs)
        call["past_key_values"] = cache
        # The mask's width grows every step, so it cannot live in a buffer; for the families here it
        # only reaches the mask function, which gives paged steps no mask either way.
        call["attention_mask"] = None
        return call

    def _capture(self, key: tuple, graph: _Graph, forward: Callable[..., Any], cache: PagedCache, call: dict) -> None:
        """Warm up (Triton compiles, cuBLAS picks algorithms), then capture. The warm-up forwards write
        this step's K/V, as the replay that follows does again: the same values to the same slots."""
        start = time.perf_counter()
        try:
            with cache.static_step(graph.step), torch.no_grad():
                # thread_local: another thread's CUDA work (a concurrent generate) does not break the capture.
                cuda_graph, output = capture_cuda_graph(lambda: forward(**call), error_mode="thread_local")
            if not hasattr(output, "items") or not isinstance(output.get("logits"), torch.Tensor):
                raise TypeError(f"the forward returned {type(output).__name__} without logits")
        except Exception as error:  # an op that cannot be captured: this key runs the static path eagerly
            self._failed.add(key)
            logger.warning("hf_paged: decode step not captured in a CUDA graph, running it eagerly: %s", error)
            return
        fields = {name: (None if isinstance(value, PagedCache) else value) for name, value in output.items()}
        graph.output = (type(output), fields)
        graph.graph = cuda_graph
        graph.weights = self._weights()
        self.captures += 1
        self.capture_seconds += time.perf_counter() - start
        logger.info("hf_paged: captured a decode CUDA graph (batch %d, block table width %d)", graph.batch, graph.width)

    def _result(self, output: Any, cache: PagedCache, graph: _Graph) -> Any:
        """The step's output: tensors copied out of the graph's buffers, this call's cache."""
        if graph.graph is None:
            return output
        cls, fields = graph.output
        out = {}
        for name, value in fields.items():
            if value is None:
                value = cache
            elif isinstance(value, torch.Tensor):
                value = value.clone()
            out[name] = value
        return cls(**out)
