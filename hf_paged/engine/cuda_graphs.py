"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with fresh inputs.

A decode step (every scheduled request brings exactly one token and samples) of B requests is padded
to the smallest captured bucket ``Bp >= B``. Padding rows get ``seq_len = 0``, so their one query slot
sits at position -1: it writes no K/V (slot -1) and attends to nothing (see ``metadata.py``), which
makes them free of side effects without any special case in the kernels.

Every tensor the captured forward reads lives in ``_Bucket`` buffers; a step copies its inputs there
(one pinned host tensor, one non-blocking copy) and replays. Each bucket alternates between two pinned
staging buffers: with a step scheduled ahead (``EngineCore``), the host stages step t+1 while step t's
copy may still wait in the stream, and step t-1's has finished (the engine reads every step back before
it queues the one after next). The same padded path also runs eagerly (``capture=False``) so CPU tests
check it against the unpadded forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..integration.decode_graphs import capture_cuda_graph
from ..memory.kv_pool import KVPool
from ..memory.metadata import StepMetadata

# (input_ids [1, T], position_ids [1, T], step, logits_to_keep [R]) -> logits [R, V]: ModelRunner.forward
Forward = Callable[[torch.Tensor, torch.Tensor, StepMetadata, torch.Tensor], torch.Tensor]

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@dataclass(slots=True)
class _Bucket:
    size: int  # padded batch size Bp
    staging: tuple[torch.Tensor, torch.Tensor]  # 2 pinned host int64 [4*Bp + Bp*M]: ids, positions, seq_lens, slots, tables
    device_in: torch.Tensor  # the same on the device
    input_ids: torch.Tensor  # [1, Bp] int64
    positions: torch.Tensor  # [1, Bp] int64
    step: StepMetadata  # static metadata tensors of Bp rows
    logits_to_keep: torch.Tensor  # [Bp] = arange: every row samples in a decode step
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [Bp, V] output of the captured forward
    uses: int = 0  # steps loaded so far: picks the staging buffer


class DecodeGraphs:
    """Captures and replays decode steps of ``forward`` (the model runner's packed forward over ``pool``).

    Args:
        max_blocks_per_seq: block-table width of the captured graphs (longest sequence / block size).
        buckets: padded batch sizes to capture; steps larger than the largest run eagerly.
        capture: record CUDA graphs (CUDA only); False runs the padded path eagerly (tests).
    """

    def __init__(
        self,
        forward: Forward,
        pool: KVPool,
        max_blocks_per_seq: int,
        max_batch: int,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        capture: bool = True,
    ) -> None:
        self.forward = forward
        self.block_size = pool.block_size
        self.device = pool.layout.device
        self.width = max_blocks_per_seq
        sizes = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.sizes = sizes
        self.capture = capture and self.device.type == "cuda"
        self._buckets: dict[int, _Bucket] = {}
        self._pool = None  # graphs share one memory pool: they never run concurrently
        self.capture_seconds = 0.0

    def bucket_for(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def _make_bucket(self, size: int) -> _Bucket:
        m, dev = self.width, self.device
        pin = dev.type == "cuda"
        staging = tuple(torch.zeros(4 * size + size * m, dtype=torch.int64, pin_memory=pin) for _ in range(2))
        device_in = torch.zeros_like(staging[0], device=dev)
        step = StepMetadata(
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(size, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((size, m), dtype=torch.int32, device=dev),
            slot_mapping=torch.full((size,), -1, dtype=torch.int64, device=dev),
            max_query_len=1,
            max_seq_len=m * self.block_size,
        )
        return _Bucket(
            size=size,
            staging=staging,
            device_in=device_in,
            input_ids=torch.zeros((1, size), dtype=torch.int64, device=dev),
            positions=torch.zeros((1, size), dtype=torch.int64, device=dev),
            step=step,
            logits_to_keep=torch.arange(size, dtype=torch.int64, device=dev),
        )

    def _forward(self, b: _Bucket) -> torch.Tensor:
        return self.forward(b.input_ids, b.positions, b.step, b.logits_to_keep)

    def _load(
        self, b: _Bucket, token_ids: list[int], seq_lens: list[int], block_tables: list[list[int]], device_ids: torch.Tensor | None
    ) -> None:
        """Stage the step's inputs on the host, then one copy to the device and a few device-side casts.
        ``device_ids`` (``[B]`` on the device) replace ``token_ids`` when given."""
        n, size, m, bs = len(token_ids), b.size, self.width, self.block_size
        staging = b.staging[b.uses % 2]
        b.uses += 1
        host = staging.numpy()
        host[:] = 0
        lens = np.asarray(seq_lens, dtype=np.int64)
        host[0:n] = token_ids
        host[size : size + n] = lens - 1  # position of the new token
        host[2 * size : 2 * size + n] = lens
        tables = host[4 * size :].reshape(size, m)
        for row, blocks in enumerate(block_tables):
            tables[row, : len(blocks)] = blocks
        last = lens - 1
        host[3 * size : 4 * size] = -1
        host[3 * size : 3 * size + n] = tables[np.arange(n), last // bs] * bs + last % bs
        b.device_in.copy_(staging, non_blocking=True)
        d = b.device_in
        b.input_ids[0].copy_(d[0:size])
        if device_ids is not None:
            b.input_ids[0, :n].copy_(device_ids)
        b.positions[0].copy_(d[size : 2 * size].clamp(min=0))
        b.step.seq_lens.copy_(d[2 * size : 3 * size])
        b.step.slot_mapping.copy_(d[3 * size : 4 * size])
        b.step.block_tables.copy_(d[4 * size :].view(size, m))
        b.step.plans.clear()  # the bucket's metadata is reused with new values: plans made from old ones are stale

    def _capture(self, b: _Bucket) -> None:
        start = time.perf_counter()
        with torch.inference_mode():
            graph, b.logits = capture_cuda_graph(lambda: self._forward(b), pool=self._pool)
        self._pool = graph.pool()
        b.graph = graph
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - start

    def capture_all(self) -> None:
        """Capture every bucket now (startup cost, reported in ``capture_seconds``) instead of mid-run."""
        for size in self.sizes:
            if size not in self._buckets:
                b = self._buckets[size] = self._make_bucket(size)
                if self.capture:
                    self._capture(b)

    def run(
        self,
        token_ids: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Logits ``[B, V]`` of a decode step, or None when B exceeds every bucket (caller runs it eagerly).

        ``device_ids``: the step's token ids as a ``[B]`` device tensor (sampled by a step still on the
        device), used instead of ``token_ids``."""
        size = self.bucket_for(len(token_ids))
        if size is None:
            return None
        b = self._buckets.get(size)
        if b is None:
            b = self._buckets[size] = self._make_bucket(size)
            if self.capture:
                # Capture runs the forward with whatever the buffers hold; all-padding rows write nothing.
                self._capture(b)
        self._load(b, token_ids, seq_lens, block_tables, device_ids)
        if b.graph is not None:
            b.graph.replay()
            logits = b.logits
        else:
            logits = self._forward(b)
        return logits[: len(token_ids)]
