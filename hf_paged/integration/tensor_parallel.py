"""Facts about a model loaded with a transformers tensor-parallel plan, as the KV pool needs them.

``from_pretrained(path, tp_plan="auto")`` (or ``distributed_config=DistributedConfig(tp_size=N)``)
under ``torchrun --nproc-per-node N`` shards every attention layer by heads: each rank computes
``num_key_value_heads / N`` KV heads, so each rank's pool holds only those. The model records its TP
size as ``model._tp_size`` and its device mesh as ``model._device_mesh`` (every transformers 4.5x-5.x
release sets both in ``from_pretrained``).

All ranks of a tensor-parallel model must run the same forwards, so a pool sized from each rank's own
free memory would give different block counts, and one rank's ``PoolExhaustedError`` would leave the
others waiting in a collective: ``agreed_pool_options`` makes every rank use the smallest count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..memory.kv_pool import KVLayout, resolve_num_blocks
from ..options import PoolOptions


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """How many ranks the model's layers are sharded over (1: not tensor parallel)."""
    size = getattr(model, "_tp_size", None)
    return size if isinstance(size, int) and size > 1 else 1


def config_kv_heads(model: torch.nn.Module) -> int:
    """The model's KV head count as its config states it (all ranks together)."""
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    if num_kv_heads is None:
        num_kv_heads = 1 if getattr(config, "multi_query", False) else num_heads
    return num_kv_heads


def kv_heads_per_rank(model: torch.nn.Module, num_kv_heads: int | None = None) -> int:
    """KV heads each rank computes and stores (of ``num_kv_heads``, default: the config's).

    ``ValueError`` when the TP size does not divide them: transformers loads such a model anyway (the
    last rank gets a partial head) and its forward then fails on a reshape, so the refusal names both
    numbers before any memory is allocated.
    """
    tp = tensor_parallel_size(model)
    if num_kv_heads is None:
        num_kv_heads = config_kv_heads(model)
    if num_kv_heads % tp:
        raise ValueError(
            f"the tensor parallel size ({tp}) does not divide the model's number of KV heads ({num_kv_heads}): "
            f"each rank must hold whole KV heads; use a tensor parallel size that divides {num_kv_heads}"
        )
    return num_kv_heads // tp


def check_kv_heads(model: torch.nn.Module) -> None:
    """``kv_heads_per_rank``'s refusal alone; nothing is read from a model that is not tensor parallel."""
    if tensor_parallel_size(model) > 1:
        kv_heads_per_rank(model)


def process_group(model: torch.nn.Module) -> Any:
    """The process group of the model's TP dimension (None when not tensor parallel)."""
    if tensor_parallel_size(model) == 1:
        return None
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return torch.distributed.group.WORLD
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh.get_group("tp") if "tp" in names else mesh.get_group()


def agreed_pool_options(options: PoolOptions, layout: KVLayout, group: Any) -> PoolOptions:
    """``options`` with ``num_blocks`` fixed to the smallest count any rank of ``group`` can hold.

    Every rank sizes its own pool from its own memory (its share of the KV heads), then all take the
    minimum, so block ids mean the same on every rank. A no-op without a group.
    """
    if group is None:
        return options
    mine = torch.tensor([resolve_num_blocks(options, layout)], dtype=torch.int64, device=layout.device)
    torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MIN, group=group)
    return dataclasses.replace(options, num_blocks=int(mine.item()))
