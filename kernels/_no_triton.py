"""Stand-ins for ``triton`` and ``triton.language`` where Triton is not installed (CPU-only torch).

torch's CUDA wheels bring Triton; a CPU install does not need it, because the CPU path is the torch
reference that sits next to each kernel. A kernel module imports these stand-ins when ``import
triton`` fails, so that reference stays importable; launching one of its kernels then raises an
``ImportError`` that says what is missing.
"""

from __future__ import annotations

_MISSING = "needs Triton, which is not installed (CUDA builds of torch bring it; or pip install triton)"


class _Kernel:
    """What ``@triton.jit`` gives without Triton: a kernel that refuses to launch."""

    def __init__(self, fn) -> None:
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid):
        raise ImportError(f"the Triton kernel {self.__name__} {_MISSING}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"the Triton kernel {self.__name__} {_MISSING}")


class _Triton:
    @staticmethod
    def jit(fn=None, **options):
        return _Kernel(fn) if fn is not None else _Kernel

    def __getattr__(self, name: str):
        raise ImportError(f"triton.{name} {_MISSING}")


class _Language:
    def __getattr__(self, name: str):
        return None  # module-level uses only (annotations, constexpr defaults); kernel bodies never run


triton = _Triton()
tl = _Language()
