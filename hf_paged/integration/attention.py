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

if TYPE_CHECKING:
    from .cache import PagedCache

# No "flash", "sdpa", "paged|" or "/" in the name: each of those triggers special handling in transformers.
ATTENTION_NAME = "hf_paged"

_ACTIVE_CACHE: ContextVar["PagedCache | None"] = ContextVar("hf_paged_active_cache", default=None)
# id(config) -> the attention implementation the model had before enable(); the fallback target.
_ORIGINAL_IMPL: dict[int, str] = {}


@contextlib.contextmanager
def active_cache(cache: "PagedCache") -> Iterator[None]:
    token = _ACTIVE_CACHE.set(cache)
    try:
        yield
    finally:
        _ACTIVE_CACHE.reset(token)


class ImplementationSwitch:
    """Switches one model's attention to ``hf_paged`` while at least one user is inside (ref counted).

    Shared by ``enable``'s generate wrapper and ``ContinuousGenerator``, so concurrent users of one
    model never restore the original implementation under each other's feet.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        # Every config an attention module reads its implementation from (text config, sub-configs).
        self.configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
        self.original = [c._attn_implementation for c in self.configs]
        for config, name in zip(self.configs, self.original):
            _ORIGINAL_IMPL[id(config)] = name
        self.active = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            if self.active == 0:
                for config in self.configs:
                    config._attn_implementation_internal = ATTENTION_NAME
            self.active += 1

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self.active -= 1
            if self.active == 0:
                for config, name in zip(self.configs, self.original):
                    config._attn_implementation_internal = name


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
) -> tuple[torch.Tensor, None]:
    """Attend each row's queries ``[B, Hq, q, D]`` to that row's K/V in the pool.

    ``key``/``value`` are this step's new tokens, already written to the pool by ``PagedCache.update``.
    IMPORTANT: this runs once per layer per step. No host syncs and no per-row Python here.
    """
    cache = _ACTIVE_CACHE.get()
    if cache is None:
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap, s_aux, kwargs)
    if dropout:
        raise ValueError(f"hf_paged attention does not apply dropout (got dropout={dropout}); call model.eval() first")
    step = cache.step
    cache.layer_windows[module.layer_idx] = sliding_window
    batch, heads, q_len, head_dim = query.shape
    q_tok = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
    k_cache, v_cache = cache.pool.layer(module.layer_idx)
    k_scale, v_scale = cache.pool.layer_scales(module.layer_idx)  # None unless the pool is FP8
    out = run_paged_attention(
        q_tok,
        k_cache,
        v_cache,
        step,
        scale=head_dim**-0.5 if scaling is None else scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        sinks=s_aux,
        backend=cache.backend,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    return out.view(batch, q_len, heads, head_dim), None


# Head dims the Triton kernel is built for; other models (rare) take the torch path on every device.
TRITON_HEAD_DIMS = (64, 80, 96, 128, 256)


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
    )


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
