"""The KV block pool: one tensor holding every layer's K and V blocks, plus its allocator.

Layout: ``kv[layer, 0 | 1, block, offset_in_block, kv_head, head_dim]``. Each ``kv[layer, 0]`` is a
contiguous ``[num_blocks, block_size, num_kv_heads, head_dim]`` tensor, the layout the kernels read.
One allocation for all layers means one block id names the same slot range in every layer, so block
tables are shared by all layers of a sequence.

``KVPool.write`` is the only code that writes new K/V into the pool.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .block_allocator import BlockAllocator
from ..options import PoolOptions


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of one token's K/V in one layer, read off the first ``Cache.update`` call."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bytes_per_block(self, block_size: int) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem


def resolve_num_blocks(options: PoolOptions, layout: KVLayout) -> int:
    """How many blocks the pool gets: explicit ``num_blocks``, else a memory budget.

    On CUDA the budget is ``memory_fraction`` of the device memory free right now; elsewhere it is
    ``cpu_memory_bytes``, because "free memory" on a host says little about what the user can spare.
    """
    if options.num_blocks is not None:
        return options.num_blocks
    per_block = layout.bytes_per_block(options.block_size)
    if layout.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(layout.device)
        budget = int(free * options.memory_fraction)
    else:
        budget = options.cpu_memory_bytes
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(
            f"the KV memory budget ({budget} bytes) holds no block of {per_block} bytes; "
            "raise memory_fraction / cpu_memory_bytes or pass num_blocks"
        )
    return int(num_blocks)


@functools.cache
def _kv_writer(cuda: bool):
    """The Triton writer on CUDA, the torch reference elsewhere (imported once: triton loads lazily)."""
    from ..kernels import kv_write

    return kv_write.write_kv if cuda else kv_write.write_kv_reference


class KVPool:
    """Per-layer K/V block tensors and the allocator that hands out their block ids."""

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int) -> None:
        self.layout = layout
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Zeros, not empty: the dense fallback gathers padding columns from slot 0 and masks them,
        # and a masked NaN would still poison a matmul (0 * NaN = NaN).
        self.kv = torch.zeros(
            (layout.num_layers, 2, num_blocks, block_size, layout.num_kv_heads, layout.head_dim),
            dtype=layout.dtype,
            device=layout.device,
        )
        self.allocator = BlockAllocator(num_blocks)

    @classmethod
    def create(cls, options: PoolOptions, layout: KVLayout) -> "KVPool":
        return cls(layout, resolve_num_blocks(options, layout), options.block_size)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of one layer, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        kv = self.kv[layer_idx]
        return kv[0], kv[1]

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Scatter new tokens' K/V (``[num_tokens, num_kv_heads, head_dim]``) into their slots; slot -1 = skip."""
        k_cache, v_cache = self.layer(layer_idx)
        _kv_writer(k_cache.is_cuda)(key, value, k_cache, v_cache, slot_mapping)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks in every layer (copy-on-write of a shared, partly filled block)."""
        if not src:
            return
        device = self.kv.device
        s = torch.tensor(src, dtype=torch.long, device=device)
        d = torch.tensor(dst, dtype=torch.long, device=device)
        self.kv.index_copy_(2, d, self.kv.index_select(2, s))
