"""Compiled modules for paged steps: the model's RMSNorm and MLP modules (``ElementwiseFusion``), or its
whole decoder layers (``CompiledLayers``, the engine's ``compile`` option).

The H200 profile (benchmarks/RESULTS.md, "Where the time goes") puts 25-30% of a decode step in HF's
eager elementwise kernels: an RMSNorm is six launches (cast, square, mean, rsqrt, two multiplies), an
MLP's ``act(gate) * up`` two more. Compiling the modules' own ``forward`` (not a rewrite of them, so any
architecture's variant is kept) lets Inductor fuse each into one or two kernels.

The compiled functions replace the modules' ``forward`` only inside ``with fusion:`` (the model
runner's paged forward, CUDA-graph capture included); every other forward of the model runs the
original code. One compiled function per module class, with dynamic shapes: the layers share it and a
new packed length does not recompile.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import torch

from ..integration.attention import LAYER_TENSOR

# Model types whose compiled decoder layers are checked on a GPU against stock ``generate``
# (tests/test_compile_gpu.py): where ``compile="auto"`` compiles.
AUTO_COMPILE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox"})

# Class-name suffixes of the modules compiled: pure tensor functions in every transformers model.
FUSED_SUFFIXES = ("RMSNorm", "MLP")


@functools.cache
def _compiled(cls: type, backend: str) -> Any:
    # One compiled function per module class, shared by its instances. dynamic=True: rows, tokens,
    # block-table width and kept rows are symbols (the runner keeps each >= 2 under ``compile``, so none
    # specializes to 1), so new batch sizes and prompt lengths do not recompile.
    return torch.compile(cls.forward, dynamic=True, backend=backend)


class _CompiledForwards:
    """Context manager: while active, each of ``self.modules`` runs ``torch.compile`` of its own forward
    (an instance attribute shadowing the class's); reentrant and thread-safe, restored on the last exit."""

    def __init__(self, modules: list[torch.nn.Module], backend: str) -> None:
        self.modules = modules
        self.backend = backend
        self._lock = threading.Lock()
        self._active = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                for m in self.modules:
                    m.forward = functools.partial(_compiled(type(m), self.backend), m)
            self._active += 1

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                for m in self.modules:
                    del m.forward


class ElementwiseFusion(_CompiledForwards):
    """Context manager: while active, the model's RMSNorm / MLP modules run compiled.

    ``backend`` is torch.compile's ("inductor" fuses; tests use "eager" to check the swapping alone).
    """

    def __init__(self, model: torch.nn.Module, backend: str = "inductor") -> None:
        super().__init__([m for m in model.modules() if type(m).__name__.endswith(FUSED_SUFFIXES)], backend)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated decoder layers: the ``ModuleList`` holding ``num_hidden_layers`` modules."""
    num_layers = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return list(module)
    return []


class CompiledLayers(_CompiledForwards):
    """Context manager: while active, the model's decoder layers run ``torch.compile`` of their own forward.

    Why layers and not the whole model: the layers are identical code with different weights, so one
    compiled graph serves all of them (the attention names its layer by a tensor, see ``LAYER_TENSOR``):
    compile time does not grow with depth (on CPU, a 32-layer model compiles in the time of a 2-layer one,
    25 s with an empty Inductor cache; the whole 32-layer model took several minutes). The paged attention and K/V write inside a layer are opaque custom
    ops, so a layer traces without graph breaks and Inductor fuses its norms, residual adds, RoPE,
    SiLU-mul and casts. What runs outside the layers (embedding, RoPE tables, final norm, LM head) stays
    eager: a few kernels per step. Same swapping as ``ElementwiseFusion``: only inside ``with``.
    """

    def __init__(self, model: torch.nn.Module, backend: str = "inductor") -> None:
        self.layers = decoder_layers(model)
        if not self.layers:
            raise ValueError(
                f"compile needs the model's decoder layers as one ModuleList of num_hidden_layers modules; "
                f"{type(model).__name__} has none (use compile='off')"
            )
        # Each attention module's layer index as a 0-d CPU tensor: the compiled graph's input, so one
        # graph serves every layer (an int attribute is a constant of the graph). Plain attributes, not
        # buffers: they stay on the host whatever device the model moves to, and stay out of state_dict.
        for layer in self.layers:
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int) and LAYER_TENSOR not in m.__dict__:
                    m.__dict__[LAYER_TENSOR] = torch.tensor(m.layer_idx, dtype=torch.int64)
        super().__init__(self.layers, backend)


def compile_config() -> Any:
    """Settings for tracing the layers (a context manager, entered around each compiled forward):

    - no "duck" sizing: sizes that happen to be equal when the graph is traced (a decode step's rows,
      tokens and kept logits) must not become one symbol, which a prompt step would then break;
    - a recompile limit above the layer count: a model whose layer code reads its integer layer index
      gets one graph per layer, slower to compile but still compiled (torch's default limit, 8, would
      silently leave the later layers eager).
    Settings a torch version does not have are left out.
    """
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    stack = contextlib.ExitStack()
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if hasattr(dynamo_config, name):
        stack.enter_context(dynamo_config.patch(**{name: max(256, getattr(dynamo_config, name))}))
    if hasattr(fx_config, "use_duck_shape"):
        stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack
