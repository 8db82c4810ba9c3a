"""``enable(model)`` / ``disable(model)``: paged KV for stock ``model.generate``.

What ``enable`` changes, all on the one model instance and all undone by ``disable``:

- ``model.generate`` becomes a wrapper that passes a fresh ``PagedCache`` as ``past_key_values`` and,
  for the duration of the call only, switches the model's attention implementation to ``hf_paged``;
- two forward hooks activate the paged attention for forwards that carry a ``PagedCache`` (and hand
  the step's 2D mask to it);
- a ``cache_implementation`` in the checkpoint's generation config is cleared (it would conflict
  with a user-supplied cache).

Nothing else changes: a plain ``model(...)`` (training included) never sees a ``PagedCache``, so it
runs the original attention even while a ``generate`` on the same model runs in another thread.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import attention, tensor_parallel
from .cache import PagedCache
from ..memory.kv_pool import KVLayout, KVPool
from ..options import EnableOptions, from_kwargs

logger = logging.getLogger("hf_paged")

_STATE_ATTR = "_hf_paged_state"


def uses_attention_interface(model: torch.nn.Module) -> bool:
    """Whether the model's attention goes through ``ALL_ATTENTION_FUNCTIONS`` (the same source heuristic
    transformers itself applies in ``set_attn_implementation``). Falcon, GPT-J, Bloom, ... do not."""
    classes = {type(m) for m in model.modules() if "Attention" in type(m).__name__}
    sources = []
    for cls in classes or {type(model)}:
        module = sys.modules.get(cls.__module__)
        try:
            sources.append(inspect.getsource(module) if module is not None else "")
        except (OSError, TypeError):
            sources.append("")
    return all("ALL_ATTENTION_FUNCTIONS.get_interface(" in src for src in sources)


@dataclass
class _EnableState:
    options: EnableOptions
    uses_interface: bool
    num_layers: int
    switch: attention.ImplementationSwitch
    original_cache_implementation: str | None
    hooks: list[Any] = field(default_factory=list)
    pool: KVPool | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    tp_group: Any = None  # tensor-parallel model: its ranks agree on one pool size

    def get_pool(self, layout: KVLayout) -> KVPool:
        with self.lock:
            if self.pool is not None and self.pool.layout != layout:
                if self.pool.allocator.num_used:
                    raise RuntimeError(
                        f"the model's KV layout changed from {self.pool.layout} to {layout} while a generate is running"
                    )
                self.pool = None
            if self.pool is None:
                options = tensor_parallel.agreed_pool_options(self.options.pool(), layout, self.tp_group)
                self.pool = KVPool.create(options, layout)
                logger.info(
                    "hf_paged: KV pool of %d blocks x %d tokens (%.1f MiB) on %s",
                    self.pool.num_blocks,
                    self.pool.block_size,
                    self.pool.nbytes / 2**20,
                    layout.device,
                )
            return self.pool

    @contextlib.contextmanager
    def paged_implementation(self) -> Iterator[None]:
        """Attention switched to hf_paged for the duration (a no-op for hard-coded attention)."""
        if not self.uses_interface:
            yield
            return
        with self.switch:
            yield


def is_enabled(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def enable(model: torch.nn.Module, **options: Any) -> torch.nn.Module:
    """Make ``model.generate`` keep its KV cache in a paged block pool. Returns the model.

    Options (unknown names raise ``TypeError``): ``block_size`` (16), ``num_blocks`` (None: from
    memory), ``memory_fraction`` (0.5 of free CUDA memory), ``cpu_memory_bytes`` (1 GiB elsewhere),
    ``backend`` ("auto" | "torch" | "triton"), ``kv_cache_dtype`` ("auto": the model's dtype | "fp8":
    float8 e4m3 with a float32 scale per token and KV head, about half the bytes per token).
    """
    opts = from_kwargs(EnableOptions, options, where="hf_paged.enable()")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate"):
        raise TypeError(f"hf_paged.enable() needs a transformers model with .generate, got {type(model).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"hf_paged.enable() supports decoder-only models; {type(model).__name__} is an encoder-decoder model"
        )
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        if state.options == opts:
            return model
        disable(model)

    tensor_parallel.check_kv_heads(model)  # refuses a TP size that splits a KV head
    uses_interface = uses_attention_interface(model)
    gen_config = getattr(model, "generation_config", None)
    original_cache_impl = getattr(gen_config, "cache_implementation", None)
    state = _EnableState(
        options=opts,
        uses_interface=uses_interface,
        num_layers=config.get_text_config().num_hidden_layers,
        switch=attention.implementation_switch(model),
        original_cache_implementation=original_cache_impl,
        tp_group=tensor_parallel.process_group(model),
    )
    if original_cache_impl is not None:
        logger.warning(
            "hf_paged: ignoring cache_implementation=%r from the generation config; the KV cache is paged now",
            original_cache_impl,
        )
        gen_config.cache_implementation = None
    if not uses_interface:
        logger.warning(
            "hf_paged: %s hard-codes its attention; it gets paged KV memory but not the paged attention kernels",
            type(model).__name__,
        )

    state.hooks = [
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True),
    ]
    original_generate = model.generate
    model.generate = functools.wraps(original_generate)(functools.partial(_paged_generate, model, original_generate))
    setattr(model, _STATE_ATTR, state)
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``enable``: original generate, hooks removed, pool freed. A no-op on a model never enabled."""
    state: _EnableState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    if state.switch.active:
        raise RuntimeError("hf_paged.disable() called while a generate on this model is still running")
    for handle in state.hooks:
        handle.remove()
    if "generate" in vars(model):
        del model.generate
    if state.original_cache_implementation is not None:
        model.generation_config.cache_implementation = state.original_cache_implementation
    state.pool = None
    delattr(model, _STATE_ATTR)
    return model


def _paged_generate(model: torch.nn.Module, original_generate: Any, *args: Any, **kwargs: Any) -> Any:
    state: _EnableState = getattr(model, _STATE_ATTR)
    user_cache = kwargs.get("past_key_values")
    gen_config = kwargs.get("generation_config")
    if isinstance(user_cache, PagedCache):
        with state.paged_implementation():
            return original_generate(*args, **kwargs)
    if (
        user_cache is not None
        or kwargs.get("use_cache") is False
        or kwargs.get("cache_implementation") is not None
        or getattr(gen_config, "cache_implementation", None) is not None
        or getattr(gen_config, "use_cache", True) is False
    ):
        # The caller chose a cache (or none) explicitly: respect it, unpaged.
        logger.info("hf_paged: an explicit cache choice was passed to generate; running it unpaged")
        return original_generate(*args, **kwargs)
    cache = PagedCache(
        state.num_layers, state.get_pool, dense=not state.uses_interface, backend=state.options.backend
    )
    try:
        with state.paged_implementation():
            return original_generate(*args, past_key_values=cache, **kwargs)
    finally:
        cache.release()


def _pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, PagedCache):
        cache.begin_forward(kwargs.get("attention_mask"), kwargs.get("input_ids"))
        cache._context_token = attention._ACTIVE_CACHE.set(cache)


def _post_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cache = kwargs.get("past_key_values")
    token = getattr(cache, "_context_token", None)
    if isinstance(cache, PagedCache) and token is not None:
        cache._context_token = None
        attention._ACTIVE_CACHE.reset(token)
