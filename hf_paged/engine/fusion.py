"""Fused norms and MLPs for paged steps: ``torch.compile`` of the model's own RMSNorm and MLP modules.

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

import functools
import threading
from typing import Any

import torch

# Class-name suffixes of the modules compiled: pure tensor functions in every transformers model.
FUSED_SUFFIXES = ("RMSNorm", "MLP")


@functools.cache
def _compiled(cls: type, backend: str) -> Any:
    return torch.compile(cls.forward, dynamic=True, backend=backend)


class ElementwiseFusion:
    """Context manager: while active, the model's RMSNorm / MLP modules run compiled.

    ``backend`` is torch.compile's ("inductor" fuses; tests use "eager" to check the swapping alone).
    """

    def __init__(self, model: torch.nn.Module, backend: str = "inductor") -> None:
        self.modules = [m for m in model.modules() if type(m).__name__.endswith(FUSED_SUFFIXES)]
        self.backend = backend
        self._lock = threading.Lock()
        self._active = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                for m in self.modules:
                    m.forward = functools.partial(_compiled(type(m), self.backend), m)  # instance attribute shadows the class's
            self._active += 1

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                for m in self.modules:
                    del m.forward
