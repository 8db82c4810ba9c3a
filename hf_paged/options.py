"""Validated option objects. Unknown option names raise ``TypeError``; bad values raise ``ValueError``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

BACKENDS = ("auto", "torch", "triton")
# "auto": K/V stored in the model's dtype; "fp8": float8 e4m3 with a scale per token and KV head.
KV_CACHE_DTYPES = ("auto", "fp8")
# What a preempted request's K/V become: dropped and recomputed later, or copied to host memory and back.
PREEMPTION_MODES = ("recompute", "swap")
# Which engine steps run ``torch.compile`` of the model: none, decode steps (and their CUDA graphs), or all.
COMPILE_MODES = ("auto", "off", "decode", "all")


def from_kwargs(cls: type[T], kwargs: dict[str, Any], *, where: str) -> T:
    """Build dataclass ``cls`` from user kwargs, naming every unknown option instead of ignoring it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{where} got unknown option(s) {unknown}; valid options are {sorted(known)}")
    return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """How big the KV block pool is and how it is cut into blocks."""

    # Tokens per block. Multiples of 16 keep the Triton kernels' tiles aligned to blocks.
    block_size: int = 16
    # Explicit pool size in blocks; when None the pool is sized from a memory budget (below).
    num_blocks: int | None = None
    # CUDA: fraction of the currently free device memory given to the pool.
    memory_fraction: float = 0.9
    # Non-CUDA devices: bytes given to the pool (host "free memory" is not a safe budget).
    cpu_memory_bytes: int = 1 << 30
    # "auto" (the model's dtype) or "fp8" (e4m3 + per-token scales: ~1.9x the tokens per byte).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, got {self.block_size!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive int or None, got {self.num_blocks!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        if not isinstance(self.cpu_memory_bytes, int) or self.cpu_memory_bytes < 1:
            raise ValueError(f"cpu_memory_bytes must be a positive int, got {self.cpu_memory_bytes!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")


@dataclass(frozen=True, slots=True)
class EnableOptions:
    """Options of ``hf_paged.enable(model, **options)``."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float = 0.5
    cpu_memory_bytes: int = 1 << 30
    # "auto": Triton kernels on CUDA, the torch reference elsewhere; "torch" forces the reference.
    backend: str = "auto"
    kv_cache_dtype: str = "auto"
    # Decode steps of generate replay CUDA graphs (CUDA, Triton kernels, supported model families).
    cuda_graphs: bool = True
    # "decode": those graphs capture torch.compile of the forward (fused norms, RoPE, MLP) around the
    # paged-attention op; "off": the eager forward.
    compile: str = "off"

    def __post_init__(self) -> None:
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.compile not in ("off", "decode"):
            raise ValueError(f"compile must be 'off' or 'decode', got {self.compile!r}")
        if self.compile != "off" and not self.cuda_graphs:
            raise ValueError("compile='decode' compiles the forward the decode CUDA graphs capture: needs cuda_graphs=True")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self.pool()  # validates the pool fields

    def pool(self) -> PoolOptions:
        return pool_options_of(self)


def pool_options_of(options: Any) -> PoolOptions:
    """The pool fields of a larger options object (``enable``'s or ``ContinuousGenerator``'s), validated;
    a field the object lacks keeps its default."""
    fields = dataclasses.fields(PoolOptions)
    return PoolOptions(**{f.name: getattr(options, f.name) for f in fields if hasattr(options, f.name)})


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Options of the engine core, shared by ``ContinuousGenerator`` and ``AsyncEngine``; see their docstrings."""

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 8192
    memory_fraction: float = 0.9
    cpu_memory_bytes: int = 1 << 30
    backend: str = "auto"
    progress: bool = True
    cuda_graphs: bool = True  # replay captured graphs for decode steps (CUDA + Triton only)
    prefix_caching: bool = True  # reuse the K/V of full blocks of earlier prompts (and keep them after use)
    fuse_elementwise: bool = False  # torch.compile the model's RMSNorm / MLP modules for paged steps (CUDA only)
    profile: bool = False  # time each stage of each step (adds CUDA events; see StepProfile)
    kv_cache_dtype: str = "auto"  # "fp8": e4m3 K/V with a scale per token and KV head (see PoolOptions)
    preemption_mode: str = "recompute"  # "swap": preempted requests' blocks go to host memory and back
    swap_space_gb: float = 4.0  # host memory for swapped-out blocks (GiB), allocated in "swap" mode only
    # "decode" / "all": those steps run torch.compile of the model around the opaque paged-attention op
    # (fused norms, RoPE, MLP; decode CUDA graphs capture the compiled forward); "off": eager; "auto":
    # "all" where it is measured and tested (CUDA, Triton kernels, one GPU), else "off".
    compile: str = "auto"
    # Queue each decode step on the device before the previous step's tokens are read back, so the
    # host's per-step work overlaps the device (one extra computed token per request that stops early).
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("progress", "cuda_graphs", "prefix_caching", "fuse_elementwise", "profile", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.compile in ("decode", "all") and self.fuse_elementwise:
            raise ValueError(
                f"fuse_elementwise=True and compile={self.compile!r} are alternatives (the compiled forward already "
                "fuses the norms and MLPs); choose one"
            )
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if isinstance(self.swap_space_gb, bool) or not isinstance(self.swap_space_gb, (int, float)) or not self.swap_space_gb > 0:
            raise ValueError(f"swap_space_gb must be a number > 0, got {self.swap_space_gb!r}")
        self.pool()  # validates the pool fields

    def pool(self) -> PoolOptions:
        return pool_options_of(self)
