"""The KV block pool: one tensor holding every layer's K and V blocks, plus its allocator.

Layout: ``kv[layer, 0 | 1, block, offset_in_block, kv_head, head_dim]``. Each ``kv[layer, 0]`` is a
contiguous ``[num_blocks, block_size, num_kv_heads, head_dim]`` tensor, the layout the kernels read.
One allocation for all layers means one block id names the same slot range in every layer, so block
tables are shared by all layers of a sequence.

``KVPool.write`` is the only code that writes new K/V into the pool.

``kv_cache_dtype="fp8"`` stores K/V as float8 e4m3 plus ``scales[layer, 0 | 1, block, offset,
kv_head]`` (float32): one scale per token and KV head, so a token's stored K/V depend on that token
alone (see ``kernels/kv_write.py``). Blocks then take ``(head_dim + 4) / (2 * head_dim)`` of their
16-bit size (0.52x at head_dim 128), so the same memory holds about 1.9x the tokens.
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
from dataclasses import dataclass

import torch

from .block_allocator import BlockAllocator
from ..options import KV_CACHE_DTYPES, PoolOptions

FP8_DTYPE = torch.float8_e4m3fn

logger = logging.getLogger("hf_paged")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of one token's K/V in one layer, read off the first ``Cache.update`` call."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bytes_per_block(self, block_size: int, kv_cache_dtype: str = "auto") -> int:
        """Bytes of one block in every layer, K and V (FP8: e4m3 values plus a float32 scale per row)."""
        if kv_cache_dtype == "fp8":
            row = self.head_dim + 4
        else:
            row = self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * row


def cuda_free_bytes(device: torch.device) -> int:
    """Memory a new pool can take on ``device``: what the driver reports free plus what PyTorch's caching
    allocator holds reserved but unused. The driver alone undercounts badly after anything large was
    freed in this process (a previous pool, a checkpoint loaded then sharded): those bytes stay reserved by
    the allocator, reusable by the pool, yet not "free" to the driver. Under tensor parallelism a rank's
    previous pool still reserved this way once shrank every rank's next pool to a tenth."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + max(cached, 0)


def resolve_num_blocks(options: PoolOptions, layout: KVLayout) -> int:
    """How many blocks the pool gets: explicit ``num_blocks``, else a memory budget.

    On CUDA the budget is ``memory_fraction`` of the device memory free right now; elsewhere it is
    ``cpu_memory_bytes``, because "free memory" on a host says little about what the user can spare.
    """
    if options.num_blocks is not None:
        return options.num_blocks
    per_block = layout.bytes_per_block(options.block_size, options.kv_cache_dtype)
    if layout.device.type == "cuda":
        budget = int(cuda_free_bytes(layout.device) * options.memory_fraction)
    else:
        budget = options.cpu_memory_bytes
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(
            f"the KV memory budget ({budget} bytes) holds no block of {per_block} bytes; "
            "raise memory_fraction / cpu_memory_bytes or pass num_blocks"
        )
    if layout.device.type != "cuda":
        # A fixed budget, whatever the model: say what it buys (host pools commit memory as blocks are used).
        logger.info(
            "hf_paged: KV pool on %s: %d blocks x %d tokens = %d tokens, %.1f MiB reserved (cpu_memory_bytes); "
            "pass num_blocks= or cpu_memory_bytes= to change it",
            layout.device, num_blocks, options.block_size, num_blocks * options.block_size, num_blocks * per_block / 2**20,
        )
    return int(num_blocks)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the host, backed by anonymous memory, which the OS hands out zero-filled and
    commits page by page: a large CPU pool then costs no time (``torch.zeros`` of 1 GiB writes it all,
    ~0.8 s) and no resident memory until its blocks are used. Private, so forked processes do not share it."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    flags = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
    # frombuffer keeps a reference to the mapping: it is unmapped when the last view of the tensor goes.
    return torch.frombuffer(mmap.mmap(-1, nbytes, **flags), dtype=dtype).view(shape)


@functools.cache
def _kv_writer(cuda: bool):
    """The Triton writer on CUDA, the torch reference elsewhere (imported once: triton loads lazily)."""
    from ..kernels import kv_write

    return kv_write.write_kv if cuda else kv_write.write_kv_reference


class KVPool:
    """Per-layer K/V block tensors and the allocator that hands out their block ids."""

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> None:
        check_kv_cache_dtype(kv_cache_dtype, layout.device)
        self.layout = layout
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache_dtype = kv_cache_dtype
        fp8 = kv_cache_dtype == "fp8"
        shape = (layout.num_layers, 2, num_blocks, block_size, layout.num_kv_heads, layout.head_dim)
        # Zeros, not empty: the dense fallback gathers padding columns from slot 0 and masks them,
        # and a masked NaN would still poison a matmul (0 * NaN = NaN).
        self.kv = _zeros(shape, FP8_DTYPE if fp8 else layout.dtype, layout.device)
        self.scales = _zeros(shape[:-1], torch.float32, layout.device) if fp8 else None
        self.allocator = BlockAllocator(num_blocks)
        # Host copies of preempted requests' blocks (see allocate_swap); None without a swap space.
        self.swap_kv: torch.Tensor | None = None
        self.swap_scales: torch.Tensor | None = None

    @classmethod
    def create(cls, options: PoolOptions, layout: KVLayout) -> "KVPool":
        return cls(layout, resolve_num_blocks(options, layout), options.block_size, options.kv_cache_dtype)

    @property
    def nbytes(self) -> int:
        scales = self.scales.numel() * 4 if self.scales is not None else 0
        return self.kv.numel() * self.kv.element_size() + scales

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of one layer, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        kv = self.kv[layer_idx]
        return kv[0], kv[1]

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """FP8 pools: ``(k_scale, v_scale)`` of one layer, each ``[num_blocks, block_size, num_kv_heads]``
        float32; ``(None, None)`` otherwise."""
        return layer_scales(self.scales, layer_idx)

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Scatter new tokens' K/V (``[num_tokens, num_kv_heads, head_dim]``) into their slots; slot -1 = skip."""
        write_layer(self.kv, self.scales, layer_idx, key, value, slot_mapping)

    def read_dense(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given slots (``[n]`` int64) as ``[n, num_kv_heads, head_dim]`` in the model's
        dtype (FP8 pools dequantize just these rows)."""
        out = []
        for cache, scale in zip(self.layer(layer_idx), self.layer_scales(layer_idx)):
            rows = cache.reshape(-1, *cache.shape[2:]).index_select(0, slots)
            if scale is not None:
                rows = rows.to(torch.float32) * scale.reshape(-1, scale.shape[-1]).index_select(0, slots)[..., None]
            out.append(rows.to(self.layout.dtype))
        return out[0], out[1]

    @property
    def bytes_per_block(self) -> int:
        return self.layout.bytes_per_block(self.block_size, self.kv_cache_dtype)

    def allocate_swap(self, num_blocks: int) -> None:
        """Host memory for ``num_blocks`` blocks of every layer, slot-major (``[slot, layer, 0 | 1, offset,
        kv_head, head_dim]``: a run of consecutive slots is one contiguous copy), pinned when the pool is
        on CUDA so copies run at full PCIe speed; ``swap_out``/``swap_in`` address it by slot."""
        pin = self.kv.is_cuda
        shape = (num_blocks, self.kv.shape[0], self.kv.shape[1], *self.kv.shape[3:])
        self.swap_kv = torch.zeros(shape, dtype=self.kv.dtype, pin_memory=pin)
        if self.scales is not None:
            self.swap_scales = torch.zeros(shape[:-1], dtype=torch.float32, pin_memory=pin)

    def swap_out(self, blocks: list[int], slots: list[int]) -> None:
        """Copy pool ``blocks`` to swap ``slots`` (every layer, K and V, FP8 scales). Returns once the host
        holds them, so the blocks may be overwritten right after."""
        b = torch.tensor(blocks, dtype=torch.long, device=self.kv.device)
        for pool, swap in ((self.kv, self.swap_kv), (self.scales, self.swap_scales)):
            if pool is not None:
                rows = _raw(pool).index_select(2, b).movedim(2, 0)  # [n, layers, 2, ...] (a gather)
                run = _consecutive(slots)
                if run is not None:  # one device -> host copy straight into the swap space
                    _raw(swap)[run].copy_(rows)
                else:
                    _raw(swap).index_copy_(0, torch.tensor(slots, dtype=torch.long), rows.cpu())

    def swap_in(self, slots: list[int], blocks: list[int]) -> None:
        """Copy swap ``slots`` into pool ``blocks``. The copies are queued on the device's stream; every
        later write to the swap space (``swap_out``) waits for that stream first."""
        b = torch.tensor(blocks, dtype=torch.long, device=self.kv.device)
        for pool, swap in ((self.kv, self.swap_kv), (self.scales, self.swap_scales)):
            if pool is not None:
                run = _consecutive(slots)
                rows = _raw(swap)[run] if run is not None else _raw(swap).index_select(0, torch.tensor(slots))
                if pool.is_cuda and not rows.is_pinned():
                    rows = rows.pin_memory()
                _raw(pool).index_copy_(2, b, rows.to(pool.device, non_blocking=True).movedim(0, 2))

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks in every layer (copy-on-write of a shared, partly filled block)."""
        if not src:
            return
        device = self.kv.device
        s = torch.tensor(src, dtype=torch.long, device=device)
        d = torch.tensor(dst, dtype=torch.long, device=device)
        raw = _raw(self.kv)
        raw.index_copy_(2, d, raw.index_select(2, s))
        if self.scales is not None:
            self.scales.index_copy_(2, d, self.scales.index_select(2, s))


def _consecutive(slots: list[int]) -> slice | None:
    """``slots`` as a slice when they are consecutive ascending (the common case), else None."""
    if slots and slots[-1] - slots[0] == len(slots) - 1 and slots == list(range(slots[0], slots[-1] + 1)):
        return slice(slots[0], slots[-1] + 1)
    return None


def _raw(t: torch.Tensor) -> torch.Tensor:
    """float8 as bytes (CPU torch has no index_copy_ for float8); other dtypes as they are."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def check_kv_cache_dtype(kv_cache_dtype: str, device: torch.device) -> None:
    """``ValueError`` for an unknown KV cache dtype, or FP8 on a CUDA GPU without e4m3 support."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(
            f"kv_cache_dtype='fp8' needs a GPU with float8 e4m3 support (compute capability 8.9+: Ada, Hopper or "
            f"newer); {torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}"
        )


def layer_scales(scales: torch.Tensor | None, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One layer's ``(k_scale, v_scale)`` of a pool's ``scales`` tensor (None for pools without scales)."""
    if scales is None:
        return None, None
    return scales[layer_idx, 0], scales[layer_idx, 1]


def write_layer(
    kv: torch.Tensor, scales: torch.Tensor | None, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The one K/V writer: ``KVPool.write`` and the ``hf_paged::write_kv`` / ``write_and_attend`` ops (which
    hold the pool's tensors, not the pool) both store through it."""
    _kv_writer(kv.is_cuda)(key, value, kv[layer_idx, 0], kv[layer_idx, 1], slot_mapping, *layer_scales(scales, layer_idx))
