"""``enable(model)`` / ``disable(model)``: paged KV for stock ``model.generate``.

What ``enable`` changes, all on the one model instance and all undone by ``disable``:

- ``model.generate`` becomes a wrapper that passes a fresh ``PagedCache`` as ``past_key_values`` and,
  for the duration of the call only, switches the model's attention implementation to ``hf_paged``;
- two forward hooks activate the paged attention for forwards that carry a ``PagedCache`` (and hand
  the step's 2D mask to it);
- a ``cache_implementation`` in the checkpoint's generation config is cleared (it would conflict
  with a user-supplied cache);
- ``model.forward`` becomes a wrapper that hands the decode steps of a paged ``generate`` to
  ``DecodeGraphs`` (CUDA graphs, ``decode_graphs.py``); every other forward goes straight through.

Each call reads the generation options the way ``generate`` does (call keywords, a passed
``generation_config``, then the model's stored one): an explicit cache choice (``past_key_values``,
``cache_implementation``, ``use_cache=False``), also one stored after ``enable``, runs unpaged exactly
as stock. A fresh call first checks that its prompts plus ``max_new_tokens`` fit the pool.

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
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import attention, tensor_parallel
from .cache import PagedCache, PoolBudget
from .decode_graphs import DecodeGraphs
from ..memory.kv_pool import KVLayout, KVPool
from ..options import EnableOptions, from_kwargs

logger = logging.getLogger("hf_paged")

_STATE_ATTR = "_hf_paged_state"


_WARNED_TRAINING: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def warn_if_training(model: torch.nn.Module) -> None:
    """One warning per model left in ``train()`` mode (``enable``'s generate and the engine alike): its
    dropout would be active while generating, which is rarely what the user wants."""
    if model.training and model not in _WARNED_TRAINING:
        _WARNED_TRAINING.add(model)
        logger.warning(
            "hf_paged: %s is in training mode, so generation runs with dropout; call model.eval() first "
            "unless that is what you want (shown once per model)", type(model).__name__,
        )


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
    graphs: DecodeGraphs | None = None  # decode steps replayed from CUDA graphs (None: always eager)

    def get_pool(self, layout: KVLayout) -> KVPool:
        with self.lock:
            if self.pool is not None and self.pool.layout != layout:
                # The model changed dtype or device. Caches still holding blocks (a running generate, a
                # returned cache) keep the old pool alive through their own reference until they go.
                self.pool = None
            if self.pool is None:
                options = tensor_parallel.agreed_pool_options(self.options.pool(), layout, self.tp_group)
                self.pool = KVPool.create(options, layout)
                if self.graphs is not None:
                    self.graphs.clear()  # captured with the old pool's addresses
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
    float8 e4m3 with a float32 scale per token and KV head, about half the bytes per token),
    ``cuda_graphs`` (True: on CUDA, the decode steps of Llama, Mistral, Qwen2/3, Gemma2, Phi-3, GPT-2
    and GPT-NeoX models replay a CUDA graph per batch size instead of launching every kernel from
    Python; the first step of a new batch size captures one), ``compile`` ("off" | "decode": those
    graphs capture ``torch.compile`` of the forward, which fuses the elementwise work between the
    paged-attention calls; the first step of a batch size then also compiles, tens of seconds for an
    8B model).
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

    if opts.cuda_graphs and uses_interface and state.tp_group is None and DecodeGraphs.supports(model):
        state.graphs = DecodeGraphs(model, compile=opts.compile == "decode")
    state.hooks = [
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True),
    ]
    original_generate = model.generate
    model.generate = functools.wraps(original_generate)(functools.partial(_paged_generate, model, original_generate))
    # Decode steps of a generate replay CUDA graphs; every other forward goes straight to the original.
    original_forward = model.forward
    model.forward = functools.wraps(original_forward)(functools.partial(_paged_forward, model, original_forward))
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
    for name in ("generate", "forward"):
        if name in vars(model):
            delattr(model, name)
    # Restore a checkpoint's cache_implementation, unless one was set after enable (that one stays).
    gen_config = getattr(model, "generation_config", None)
    if state.original_cache_implementation is not None and getattr(gen_config, "cache_implementation", None) is None:
        gen_config.cache_implementation = state.original_cache_implementation
    state.pool = None
    delattr(model, _STATE_ATTR)
    return model


def _setting(model: torch.nn.Module, kwargs: dict, name: str, default: Any = None) -> Any:
    """A generation option as ``generate`` resolves it: the call's keyword, else a ``generation_config``
    passed to the call, else the model's stored generation config (read at every call, so a change made
    after ``enable`` counts), else ``default``."""
    if name in kwargs:
        value = kwargs[name]
    else:
        value = getattr(kwargs.get("generation_config"), name, None)
        if value is None:
            value = getattr(getattr(model, "generation_config", None), name, None)
    return default if value is None else value


def _explicit_cache_choice(model: torch.nn.Module, kwargs: dict) -> str | None:
    """Why this call must run unpaged (the caller chose a cache, or none), or None."""
    if kwargs.get("past_key_values") is not None:
        return "a past_key_values cache was passed"
    if _setting(model, kwargs, "use_cache", True) is False:
        return "use_cache is False"
    implementation = _setting(model, kwargs, "cache_implementation")
    if implementation is not None:
        return f"cache_implementation={implementation!r} was chosen"
    return None


def _prompt_columns(args: tuple, kwargs: dict) -> int:
    candidates = (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
    for candidate in candidates:
        if isinstance(candidate, torch.Tensor) and candidate.dim() >= 2:
            return int(candidate.shape[1])
    return 0


def _budget(model: torch.nn.Module, args: tuple, kwargs: dict) -> PoolBudget:
    columns = _prompt_columns(args, kwargs)
    new = _setting(model, kwargs, "max_new_tokens")
    if new is None:
        new = max(0, int(_setting(model, kwargs, "max_length", 20)) - columns)
    beams = int(_setting(model, kwargs, "num_beams", 1)) > 1
    return PoolBudget(max_new_tokens=int(new), prompt_columns=columns, beams=beams)


def _paged_generate(model: torch.nn.Module, original_generate: Any, *args: Any, **kwargs: Any) -> Any:
    state: _EnableState = getattr(model, _STATE_ATTR)
    warn_if_training(model)
    user_cache = kwargs.get("past_key_values")
    if isinstance(user_cache, PagedCache):
        # A cache returned by an earlier call (or transformers passing an assistant's cache back in).
        user_cache.begin_call()
        with state.paged_implementation():
            return original_generate(*args, **kwargs)
    reason = _explicit_cache_choice(model, kwargs)
    if reason is not None:
        # Respect the caller's choice, unpaged, exactly as stock generate would run it.
        logger.info("hf_paged: %s; running this generate unpaged", reason)
        return original_generate(*args, **kwargs)
    kwargs.pop("past_key_values", None)  # an explicit None
    cache = PagedCache(
        state.num_layers, state.get_pool, dense=not state.uses_interface, backend=state.options.backend
    )
    cache.begin_call(_budget(model, args, kwargs))
    try:
        with state.paged_implementation():
            output = original_generate(*args, past_key_values=cache, **kwargs)
    except BaseException:
        cache.release()
        raise
    # A returned cache (return_dict_in_generate=True) keeps its blocks for its reader; the others go
    # back now. A returned one releases them when it is garbage collected or on cache.release().
    if getattr(output, "past_key_values", None) is not cache:
        cache.release()
    return output


def _paged_forward(model: torch.nn.Module, original_forward: Any, *args: Any, **kwargs: Any) -> Any:
    cache = kwargs.get("past_key_values")
    if not args and isinstance(cache, PagedCache):
        state = getattr(model, _STATE_ATTR, None)
        graphs = None if state is None else state.graphs
        if graphs is not None:
            output = graphs.run(original_forward, cache, kwargs)
            if output is not None:
                return output
    return original_forward(*args, **kwargs)


def _pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, PagedCache):
        cache.begin_forward(kwargs.get("attention_mask"), kwargs.get("input_ids"))
        cache.want_attention_weights = bool(kwargs.get("output_attentions"))
        cache._context_token = attention._ACTIVE_CACHE.set(cache)


def _post_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cache = kwargs.get("past_key_values")
    token = getattr(cache, "_context_token", None)
    if isinstance(cache, PagedCache) and token is not None:
        cache._context_token = None
        attention._ACTIVE_CACHE.reset(token)
