"""The ``hf_paged`` attention function and mask function, registered with transformers.

transformers never hands the cache to the attention function, so the cache of the running step is
carried by a ``ContextVar`` that the model's forward hooks set for exactly one forward. A ContextVar is
per thread (and per asyncio task): a plain ``model(...)`` running in another thread while ``generate``
runs here sees no active cache and goes to the model's original attention and mask functions, so
training and ordinary forwards behave exactly as before.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..memory import kv_pool

if TYPE_CHECKING:
    from .cache import MaskedView, PagedCache

# No "flash", "sdpa", "paged|" or "/" in the name: each of those triggers special handling in transformers.
ATTENTION_NAME = "hf_paged"
# Keyword through which a compiled forward hands the attention function its PagedCache.
CACHE_KWARG = "hf_paged_cache"
# Attribute of an attention module holding its layer index as a 0-d int64 CPU tensor (set by the engine
# for its compiled layers; see write_and_attend).
LAYER_TENSOR = "_hf_paged_layer"

_ACTIVE_CACHE: ContextVar["PagedCache | None"] = ContextVar("hf_paged_active_cache", default=None)
# id(config) -> the attention implementation the model uses outside paged steps; the fallback target.
_ORIGINAL_IMPL: dict[int, str] = {}
# id(config) -> [users inside a switch, implementation to restore when the last one leaves].
_CONFIG_USERS: dict[int, list] = {}
_SWITCH_LOCK = threading.Lock()


@contextlib.contextmanager
def active_cache(cache: "PagedCache") -> Iterator[None]:
    token = _ACTIVE_CACHE.set(cache)
    try:
        yield
    finally:
        _ACTIVE_CACHE.reset(token)


class ImplementationSwitch:
    """Switches one model's attention to ``hf_paged`` while at least one user is inside.

    Shared by ``enable``'s generate wrapper and ``ContinuousGenerator``. The users are counted per
    config object, not per model: models built from one config (an assisted-decoding test builds the
    assistant from the main model's config) switch it together, and the implementation to restore is
    read when its first user enters (so one set after ``enable``, say ``"eager"``, counts) and put back
    when its last user leaves.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        # Every config an attention module reads its implementation from (text config, sub-configs).
        self.configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
        with _SWITCH_LOCK:
            for config in self.configs:
                if id(config) not in _CONFIG_USERS:  # else a running user already recorded it
                    _ORIGINAL_IMPL[id(config)] = config._attn_implementation
        self.active = 0  # users of this switch (a running generate, a generator step)

    def __enter__(self) -> None:
        with _SWITCH_LOCK:
            for config in self.configs:
                entry = _CONFIG_USERS.get(id(config))
                if entry is None:
                    name = config._attn_implementation
                    if name == ATTENTION_NAME:  # never the user's choice while enabled
                        name = _ORIGINAL_IMPL[id(config)]
                    _ORIGINAL_IMPL[id(config)] = name
                    entry = _CONFIG_USERS[id(config)] = [0, name]
                    config._attn_implementation_internal = ATTENTION_NAME
                entry[0] += 1
            self.active += 1

    def __exit__(self, *exc: Any) -> None:
        with _SWITCH_LOCK:
            self.active -= 1
            for config in self.configs:
                entry = _CONFIG_USERS[id(config)]
                entry[0] -= 1
                if entry[0] == 0:
                    del _CONFIG_USERS[id(config)]
                    config._attn_implementation_internal = entry[1]


def implementation_switch(model: torch.nn.Module) -> ImplementationSwitch:
    """The model's switch, created on first use (registering the hf_paged functions)."""
    switch = model.__dict__.get("_hf_paged_switch")
    if switch is None:
        register()
        switch = ImplementationSwitch(model)
        model.__dict__["_hf_paged_switch"] = switch
    return switch


def _original_name(config: Any) -> str:
    name = _ORIGINAL_IMPL.get(id(config))
    if name is None:
        raise RuntimeError("the hf_paged attention was called for a model that hf_paged.enable() did not set up")
    return name


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attend each row's queries ``[B, Hq, q, D]`` to that row's K/V in the pool.

    ``key``/``value`` are this step's new tokens, already written to the pool by ``PagedCache.update``.
    IMPORTANT: this runs once per layer per step. No host syncs and no per-row Python on the kernel path.
    Steps the kernels cannot express exactly (masks other than left padding, attention weights asked
    for, dropout in train mode) take ``masked_attention`` instead.
    """
    # A compiled forward passes its cache as a keyword (Dynamo cannot trace ContextVar.get); the model
    # forwards unknown keywords down to its attention function.
    cache = kwargs.pop(CACHE_KWARG, None)
    if cache is None:
        cache = _ACTIVE_CACHE.get()
    if cache is None:
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap, s_aux, kwargs)
    if not torch.compiler.is_compiling():  # (a compiled step always follows an eager one that recorded it)
        cache.layer_windows[module.layer_idx] = sliding_window
    batch, heads, q_len, head_dim = query.shape
    scale = head_dim**-0.5 if scaling is None else scaling
    want_weights = bool(kwargs.get("output_attentions")) or cache.want_attention_weights
    if want_weights or dropout or cache.needs_masked_attention(sliding_window):
        out, weights = masked_attention(
            query, cache.pool, module.layer_idx, cache.masked_view(), scale=scale, sliding_window=sliding_window,
            softcap=softcap, sinks=s_aux, dropout=dropout, want_weights=want_weights,
        )
        return out, weights
    step = cache.step
    q_tok = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
    layer = getattr(module, LAYER_TENSOR, None)
    if torch.compiler.is_compiling() and layer is not None and getattr(cache, "writes_in_attention", False):
        # The engine's compiled layers: the K/V write and the attention are one opaque op, and the layer
        # is named by a tensor, so nothing here reads the module's integer layer_idx (which would make
        # Dynamo compile one graph per layer).
        _, kv_heads, _, _ = key.shape
        k_tok = key.transpose(1, 2).reshape(batch * q_len, kv_heads, head_dim)
        v_tok = value.transpose(1, 2).reshape(batch * q_len, kv_heads, head_dim)
        out = torch.ops.hf_paged.write_and_attend(
            q_tok, k_tok, v_tok, cache.pool.kv, cache.pool.scales, layer, step.slot_mapping, step.block_tables,
            step.seq_lens, step.query_start_loc, step.max_query_len, scale, sliding_window, softcap, s_aux,
            cache.backend,
        )
        return out.view(batch, q_len, heads, head_dim), None
    k_cache, v_cache = cache.pool.layer(module.layer_idx)
    k_scale, v_scale = cache.pool.layer_scales(module.layer_idx)  # None unless the pool is FP8
    if torch.compiler.is_compiling():
        # Under torch.compile the kernel is one opaque op: Dynamo traces everything around it (norms,
        # RoPE, MLP) into fusable graphs instead of breaking the graph at the launcher's Python.
        out = torch.ops.hf_paged.paged_attention(
            q_tok, k_cache, v_cache, step.block_tables, step.seq_lens, step.query_start_loc, step.max_query_len,
            scale, sliding_window, softcap, s_aux, k_scale, v_scale, cache.backend,
        )
        return out.view(batch, q_len, heads, head_dim), None
    out = run_paged_attention(
        q_tok,
        k_cache,
        v_cache,
        step,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        sinks=s_aux,
        backend=cache.backend,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    return out.view(batch, q_len, heads, head_dim), None


# Most logits the masked path materialises at once (32 M elements).
_MASKED_MAX_ELEMENTS = 1 << 25


def masked_attention(
    query: torch.Tensor,  # [B, Hq, q, D]
    pool: Any,
    layer_idx: int,
    view: "MaskedView",
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout: float = 0.0,
    want_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with an explicit per-query key mask, in logical columns, plus the weights if asked.

    Query column ``c`` of row ``b`` sees the row's stored tokens at columns ``<= c`` (and ``> c -
    sliding_window``), which is what stock attention's causal-and-padding mask lets it see: padding
    columns are never stored, and a padding query still sees the tokens before it. A query that sees
    nothing (leading padding) gets zeros. Weights come back as ``[B, Hq, q, logical_len]``, zero on
    columns that hold no token, like stock eager attention's (a sliding-window layer's cover only the
    columns stock's sliding cache layer keeps). Computes in float64 for float64 queries, float32
    otherwise; rows are processed in pieces so the logits stay bounded.
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    slots, key_columns = view.slots, view.key_columns  # [B, K]
    width = slots.shape[1]
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q_cols = view.query_columns.view(1, q_len, 1)
    visible = key_columns.unsqueeze(1) <= q_cols  # [B, q, K]
    if sliding_window is not None:
        visible &= q_cols - key_columns.unsqueeze(1) < sliding_window
    out = torch.empty((batch, q_len, num_q_heads, head_dim), dtype=query.dtype, device=query.device)
    weights = None
    if want_weights:
        # One spare column takes the padding entries' weights (always 0) and is cut off at the end.
        weights = torch.zeros((batch, num_q_heads, q_len, view.total_len + 1), dtype=query.dtype, device=query.device)
    rows_per_piece = max(1, _MASKED_MAX_ELEMENTS // max(1, num_q_heads * q_len * width))
    for b0 in range(0, batch, rows_per_piece):
        b1 = min(batch, b0 + rows_per_piece)
        n = b1 - b0
        k, v = pool.read_dense(layer_idx, slots[b0:b1].reshape(-1))  # [n*K, Hkv, D]
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        k = k.view(n, width, num_kv_heads, head_dim).to(compute)
        v = v.view(n, width, num_kv_heads, head_dim).to(compute)
        q = query[b0:b1].to(compute).view(n, num_kv_heads, group, q_len, head_dim)
        logits = torch.einsum("bhgqd,bkhd->bhgqk", q, k) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits.masked_fill(~visible[b0:b1].view(n, 1, 1, q_len, width), float("-inf"))
        sink = None if sinks is None else sinks.to(compute).view(1, num_kv_heads, group, 1, 1)
        probs = _softmax_with_sink(logits, sink)  # queries that see nothing get 0
        if dropout:
            probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
        o = torch.einsum("bhgqk,bkhd->bqhgd", probs, v)
        out[b0:b1] = o.reshape(n, q_len, num_q_heads, head_dim).to(query.dtype)
        if weights is not None:
            target = key_columns[b0:b1].clamp(max=view.total_len)  # padding entries -> the spare column
            index = target.view(n, 1, 1, width).expand(n, num_q_heads, q_len, width)
            weights[b0:b1].scatter_(3, index, probs.reshape(n, num_q_heads, q_len, width).to(query.dtype))
    if weights is not None:
        weights = weights[..., : view.total_len]
        if sliding_window is not None:
            # Stock sliding-window layers hand their attention the last window-1 cached columns plus the
            # step's own; the weights cover those columns (earlier ones are outside every query's window).
            past = view.total_len - q_len
            weights = weights[..., past - min(past, sliding_window - 1) :]
    return out, weights


# Head dims the Triton kernel is built for; other models (rare) take the torch path on every device.
TRITON_HEAD_DIMS = (64, 80, 96, 128, 256)


def _softmax_with_sink(logits: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    from ..kernels.softmax import softmax_with_sink  # torch only (no Triton import)

    return softmax_with_sink(logits, sink)


@functools.cache
def _attention_impl(triton: bool):
    """The Triton launcher or the batched torch path (imported once: triton loads lazily, and the torch
    path does not import it at all)."""
    if triton:
        from ..kernels import paged_attention

        return paged_attention.paged_attention
    from ..kernels import paged_attention_cpu

    return paged_attention_cpu.paged_attention_cpu


def run_paged_attention(
    q_tok, k_cache, v_cache, step, *, scale, sliding_window, softcap, sinks, backend, k_scale=None, v_scale=None
):
    """Dispatch to the Triton kernel on CUDA (unless ``backend="torch"``) or the batched torch path.

    ``k_scale``/``v_scale``: the per-slot scales of an FP8 pool, dequantized inside the kernels."""
    use_triton = q_tok.shape[-1] in TRITON_HEAD_DIMS and (backend == "triton" or (backend == "auto" and q_tok.is_cuda))
    # The torch path plans its batches on the first layer of a step and reuses the plan in the others.
    extra = {} if use_triton else {"plans": step.plans}
    return _attention_impl(use_triton)(
        q_tok,
        k_cache,
        v_cache,
        step.block_tables,
        step.seq_lens,
        step.query_start_loc,
        step.max_query_len,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        **extra,
    )


# ---- custom ops: the paged attention and the K/V write as single opaque nodes for torch.compile ----------
#
# Both take only tensors and scalars (the step's metadata tensors are passed in, read from the one
# ``StepMetadata`` built per step), so Dynamo never traces the Triton launchers or the CPU path's
# host-side planning, and a compiled forward has no graph break inside a decoder layer. Outside
# ``torch.compile`` the eager code calls the launchers directly (no custom-op dispatch cost).


# Explicit schemas: the signature does not depend on how a torch version parses postponed annotations.
_ATTENTION_SCHEMA = (
    "(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, "
    "SymInt max_query_len, float scale, SymInt? sliding_window, float? softcap, Tensor? sinks, Tensor? k_scale, "
    "Tensor? v_scale, str backend) -> Tensor"
)
_WRITE_SCHEMA = "(Tensor key, Tensor value, Tensor(a!) kv, Tensor(b!)? scales, SymInt layer, Tensor slot_mapping) -> ()"


@torch.library.custom_op("hf_paged::paged_attention", mutates_args=(), schema=_ATTENTION_SCHEMA)
def paged_attention_op(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``torch.ops.hf_paged.paged_attention``: causal attention of packed queries over paged K/V.

    Args (the contract of ``kernels/paged_attention.py``, see ``memory/metadata.py`` for the lengths):
        query: ``[T, Hq, D]`` packed query tokens of the step.
        k_cache, v_cache: one layer's pool, ``[num_blocks, block_size, Hkv, D]`` (read only: the step's
            K/V must already be written, by ``hf_paged::write_kv`` or ``KVPool.write``).
        block_tables, seq_lens, query_start_loc: the step's ``StepMetadata`` tensors (int32).
        max_query_len: upper bound of the per-row query counts (1 for decode steps).
        scale, sliding_window, softcap, sinks: as the model's attention passes them.
        k_scale, v_scale: FP8 pools' per-slot scales, else None.
        backend: "auto" (Triton on CUDA for its head dims, torch elsewhere), "torch" or "triton".

    Returns a new ``[T, Hq, D]`` tensor in the query's dtype. Graph-capturable on CUDA with Triton.
    """
    step = _OpStep(block_tables, seq_lens, query_start_loc, max_query_len, _op_plans())
    return run_paged_attention(
        query, k_cache, v_cache, step, scale=scale, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
        backend=backend, k_scale=k_scale, v_scale=v_scale,
    )


@paged_attention_op.register_fake
def _(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale, sliding_window,
      softcap, sinks, k_scale, v_scale, backend):
    return torch.empty_like(query)


@torch.library.custom_op("hf_paged::write_kv", mutates_args=("kv", "scales"), schema=_WRITE_SCHEMA)
def write_kv_op(
    key: torch.Tensor,
    value: torch.Tensor,
    kv: torch.Tensor,
    scales: torch.Tensor | None,
    layer: int,
    slot_mapping: torch.Tensor,
) -> None:
    """``torch.ops.hf_paged.write_kv``: what ``KVPool.write`` does, as an op.

    Stores the step's new K/V ``[T, Hkv, D]`` of ``layer`` at ``slot_mapping`` (int64 ``[T]``, -1 =
    skip) in the whole pool tensor ``kv`` (``KVPool.kv``: ``[layers, 2, blocks, block_size, Hkv, D]``)
    and, for FP8 pools, ``scales`` (``KVPool.scales``). The op takes the whole pool, not one layer's K and
    V views, because it declares what it mutates: a mutated base tensor is what functionalization
    handles in place for sure (a mutated view is re-derived from its base, one more thing to get right).
    """
    kv_pool.write_layer(kv, scales, layer, key, value, slot_mapping)


@write_kv_op.register_fake
def _(key, value, kv, scales, layer, slot_mapping):
    return None


_WRITE_AND_ATTEND_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor(a!) kv, Tensor(b!)? scales, Tensor layer, Tensor slot_mapping, "
    "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, SymInt max_query_len, float scale, "
    "SymInt? sliding_window, float? softcap, Tensor? sinks, str backend) -> Tensor"
)


@torch.library.custom_op("hf_paged::write_and_attend", mutates_args=("kv", "scales"), schema=_WRITE_AND_ATTEND_SCHEMA)
def write_and_attend_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv: torch.Tensor,
    scales: torch.Tensor | None,
    layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``torch.ops.hf_paged.write_and_attend``: ``write_kv`` then ``paged_attention`` of one layer, one op.

    What the engine's compiled decoder layers call. ``layer`` is a 0-d int64 CPU tensor, not an int: a
    tensor is an input of the compiled graph, so every layer runs the same graph (an integer would be
    a constant of it, one graph per layer), and reading it on the host costs no device sync. The
    other arguments are ``write_kv``'s (whole pool) and ``paged_attention``'s.
    """
    index = int(layer)
    kv_pool.write_layer(kv, scales, index, key, value, slot_mapping)
    k_scale, v_scale = kv_pool.layer_scales(scales, index)
    step = _OpStep(block_tables, seq_lens, query_start_loc, max_query_len, _op_plans())
    return run_paged_attention(
        query, kv[index, 0], kv[index, 1], step, scale=scale, sliding_window=sliding_window, softcap=softcap,
        sinks=sinks, backend=backend, k_scale=k_scale, v_scale=v_scale,
    )


@write_and_attend_op.register_fake
def _(query, key, value, kv, scales, layer, slot_mapping, block_tables, seq_lens, query_start_loc, max_query_len,
      scale, sliding_window, softcap, sinks, backend):
    return torch.empty_like(query)


class _OpStep:
    """The metadata fields ``run_paged_attention`` reads, rebuilt from the op's arguments."""

    __slots__ = ("block_tables", "seq_lens", "query_start_loc", "max_query_len", "plans")

    def __init__(self, block_tables, seq_lens, query_start_loc, max_query_len, plans):
        self.block_tables, self.seq_lens, self.query_start_loc = block_tables, seq_lens, query_start_loc
        self.max_query_len, self.plans = max_query_len, plans


def _op_plans() -> dict:
    """The running step's plan scratch (CPU path: one plan per step, reused by every layer), or a
    throwaway dict when the op runs outside a paged step. A plan is reused only for the very tensors
    it was made from, so a stale or foreign dict costs a re-plan, never a wrong result."""
    cache = _ACTIVE_CACHE.get()
    step = None if cache is None else cache.step
    return step.plans if step is not None else {}


def _fallback(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap, s_aux, kwargs):
    """A forward outside a paged step: call exactly what the model would have called without hf_paged."""
    name = _original_name(module.config)
    # The model's own eager function lives in its modeling module, like the default in its call site.
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    impl = ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)
    extra = {k: v for k, v in (("sliding_window", sliding_window), ("softcap", softcap), ("s_aux", s_aux)) if v is not None}
    return impl(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **extra, **kwargs)


def paged_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """No mask for paged steps (the kernels apply causality and padding); else the original mask."""
    if _ACTIVE_CACHE.get() is not None:
        return None
    name = _original_name(config)
    if name not in AttentionMaskInterface._global_mapping:
        return None
    return AttentionMaskInterface._global_mapping[name](*args, config=config, **kwargs)


def register() -> None:
    """Register the attention and mask functions (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, paged_mask)
