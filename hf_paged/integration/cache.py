"""``PagedCache``: a transformers ``Cache`` whose K/V live in a shared block pool.

Two lengths matter here:

- the *logical* length is what ``generate`` and the mask code believe: every row of the batch is as
  long as the longest (left-padded) prompt plus what was generated. ``get_seq_length`` and
  ``get_mask_sizes`` report it, so positions and mask slicing in transformers stay as they are;
- the *real* length of a row is how many tokens it actually stores. Padding is never written, so KV
  memory is ``sum(ceil(real_len / block_size))`` blocks, at most one partly filled block per row.

A step is planned once, on the first ``update`` of a forward (block allocation, copy-on-write of
shared partial blocks, ``StepMetadata``); every layer then only reads that plan. The forward
pre-hook installed by ``enable`` hands over the step's 2D attention mask, which is how padding is
told apart from real tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..memory.kv_pool import KVLayout, KVPool
from ..memory.metadata import StepMetadata, build_step_metadata


class PoolExhaustedError(RuntimeError):
    """The KV pool has no free block for a running ``generate``; nothing a retry of the same step can fix."""


class PagedLayer(CacheLayerMixin):
    """Per-layer placeholder: the data lives in the pool, the bookkeeping in ``PagedCache``.

    transformers derives ``is_sliding``, ``is_compileable`` and friends from ``Cache.layers``, so the
    list must exist with one entry per model layer.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "PagedCache") -> None:
        super().__init__()
        # A weak reference keeps PagedCache free of reference cycles, so dropping the last reference
        # frees its blocks at once (see PagedCache.__del__).
        self._cache_ref = weakref.ref(cache)
        self.is_initialized = True

    @property
    def _cache(self) -> "PagedCache":
        return self._cache_ref()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - Cache.update is overridden
        raise NotImplementedError("PagedCache.update handles every layer")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, 0)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return len(self._cache._lens)


class PagedCache(Cache):
    """KV cache for ``generate`` backed by a block pool and per-row block tables.

    Args:
        num_layers: layers of the model (one ``PagedLayer`` each).
        pool_provider: returns the pool to use for a ``KVLayout``; called on the first ``update``, when
            the K/V shape, dtype and device are known. ``enable`` passes the model's shared pool.
        dense: return dense, left-padded ``[B, H, logical_len, D]`` K/V from ``update`` for models that
            hard-code their attention instead of calling the registered attention function.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    """

    def __init__(
        self,
        num_layers: int,
        pool_provider: Callable[[KVLayout], KVPool],
        *,
        dense: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(layers=[PagedLayer(self) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.dense = dense
        self.backend = backend
        self._pool_provider = pool_provider
        self.pool: KVPool | None = None
        self._blocks: list[list[int]] = []  # per row: physical block ids, in order
        self._lens: list[int] = []  # per row: real tokens stored
        self._logical_len = 0
        self._pending_mask: torch.Tensor | None = None
        self._pending_ids: torch.Tensor | None = None
        self._has_pending = False
        self._last_layer: int | None = None
        self.step: StepMetadata | None = None
        self._dense_index: torch.Tensor | None = None  # [B, logical_len] slots for the dense fallback
        self._external = False  # steps planned by the caller (ContinuousGenerator), not by update()
        # The sliding window each layer's attention asked for (None: full attention), as seen by the
        # paged attention function (0: not seen yet); the generator frees blocks behind the window when
        # every layer has one.
        self.layer_windows: list[int | None] = [0] * num_layers

    @classmethod
    def for_external_steps(cls, pool: KVPool, num_layers: int, *, backend: str = "auto") -> "PagedCache":
        """A cache whose steps a scheduler plans: call ``set_step`` before each forward.

        Block ownership then belongs to the caller; this cache only writes K/V and serves attention.
        """
        cache = cls(num_layers, lambda layout: pool, backend=backend)
        cache.pool = pool
        cache._external = True
        return cache

    @property
    def sliding_window(self) -> int | None:
        """The widest window when every layer attends through one, else None (also before any forward)."""
        if not all(self.layer_windows):
            return None
        return max(self.layer_windows)

    def set_step(self, step: StepMetadata) -> None:
        """Metadata of the next forward, built once by the caller and read by every layer."""
        self.step = step

    # ---- what generate and the mask code call -------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._logical_len

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._logical_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._logical_len + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        # True would make generate auto-compile the forward and build 4D masks; neither applies here.
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return len(self._lens)

    @property
    def is_initialized(self) -> bool:
        return self.pool is not None

    # ---- the step --------------------------------------------------------------------------------
    def begin_forward(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None = None) -> None:
        """Called by the forward pre-hook: the 2D mask (``[B, logical_len + q]``) and ids of the coming step."""
        self._pending_mask = attention_mask
        self._pending_ids = input_ids
        self._has_pending = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V (``[B, H_kv, q, D]``) into the pool; the only K/V writer of hf_paged."""
        if not self._external and (self._last_layer is None or layer_idx <= self._last_layer or self._has_pending):
            self._plan(key_states)
        self._last_layer = layer_idx
        step = self.step
        batch, heads, q_len, head_dim = key_states.shape
        # [B, H, q, D] -> [B*q, H, D] as a strided view: the writer takes strides, no copy needed.
        k_tok = key_states.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
        v_tok = value_states.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
        self.pool.write(layer_idx, k_tok, v_tok, step.slot_mapping)
        if self.dense:
            return self._gather_dense(layer_idx)
        return key_states, value_states

    def _plan(self, key_states: torch.Tensor) -> None:
        batch, heads, q_len, head_dim = key_states.shape
        if self.pool is None:
            layout = KVLayout(self.num_layers, heads, head_dim, key_states.dtype, key_states.device)
            self.pool = self._pool_provider(layout)
            self._blocks = [[] for _ in range(batch)]
            self._lens = [0] * batch
        if batch != len(self._lens):
            raise ValueError(f"PagedCache holds {len(self._lens)} rows but the forward has batch size {batch}")
        real = self._real_new_tokens(batch, q_len)
        same_as = self._duplicate_rows(batch, q_len)
        self._has_pending = False
        self._pending_mask = self._pending_ids = None
        new_lens = [n + r for n, r in zip(self._lens, real)]
        self._reserve(new_lens, real, same_as)
        self._lens = new_lens
        self._logical_len += q_len
        writes = None if all(s is None for s in same_as) else [s is None for s in same_as]
        self.step = build_step_metadata(
            [q_len] * batch, new_lens, self._blocks, self.pool.block_size, key_states.device, writes
        )
        if self.dense:
            self._dense_index = self._build_dense_index(key_states.device)

    def _real_new_tokens(self, batch: int, q_len: int) -> list[int]:
        """How many of this step's ``q_len`` tokens are real in each row (the rest is left padding)."""
        mask = self._pending_mask
        # Decode steps only ever append real tokens (generate extends the mask with ones), so the mask
        # is read on the host only when a step brings several tokens.
        if mask is None or (q_len == 1 and self._logical_len > 0):
            return [q_len] * batch
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != self._logical_len + q_len:
            raise ValueError(
                f"hf_paged expects a 2D attention mask of shape [{batch}, {self._logical_len + q_len}], "
                f"got {tuple(mask.shape)}"
            )
        new = mask[:, -q_len:].to(device="cpu", dtype=torch.bool)
        counts = new.sum(dim=1)
        # Left padding means each row's new columns are zeros then ones, and a row that already holds
        # tokens gets only ones. Anything else (right padding, holes) would need reordering queries.
        expected = torch.arange(q_len).unsqueeze(0) >= (q_len - counts).unsqueeze(1)
        had = torch.tensor([n > 0 for n in self._lens])
        bad = (new != expected).any(dim=1) | (had & (counts != q_len))
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"hf_paged needs left padding, but row {row} of the attention mask has padding after real "
                "tokens; set tokenizer.padding_side = 'left'"
            )
        return counts.tolist()

    def _duplicate_rows(self, batch: int, q_len: int) -> list[int | None]:
        """Per row, an earlier row it duplicates exactly (same blocks so far, same new ids and mask), else None.

        ``generate(num_beams=k)`` and ``num_return_sequences=k`` expand every prompt k times before the
        first forward; duplicates then share the first copy's blocks instead of storing the prompt k
        times. Checked on multi-token steps only, whose mask is read on the host anyway.
        """
        ids, mask = self._pending_ids, self._pending_mask
        if batch == 1 or q_len == 1 or ids is None or ids.shape != (batch, q_len):
            return [None] * batch
        ids = ids.cpu().tolist()
        mask = mask[:, -q_len:].cpu().tolist() if mask is not None else [None] * batch
        first: dict[tuple, int] = {}
        same_as: list[int | None] = []
        for row in range(batch):
            key = (tuple(self._blocks[row]), self._lens[row], tuple(ids[row]), mask[row] and tuple(mask[row]))
            source = first.setdefault(key, row)
            same_as.append(None if source == row else source)
        return same_as

    def _reserve(self, new_lens: list[int], real: list[int], same_as: list[int | None]) -> None:
        """Give every row the blocks its new tokens need, copying shared partial blocks before writes.

        A row that duplicates an earlier one gives its blocks back first (so the earlier row's shared
        partial block is not copied needlessly) and then shares whatever that row ends up with.
        """
        pool = self.pool
        bs = pool.block_size
        cow_src: list[int] = []
        cow_dst: list[int] = []
        for row, source in enumerate(same_as):
            if source is not None:
                pool.allocator.free(self._blocks[row])
                self._blocks[row] = []
        for row, (blocks, old_len, new_len) in enumerate(zip(self._blocks, self._lens, new_lens)):
            if same_as[row] is not None:
                continue
            if real[row] and old_len % bs and pool.allocator.ref_count(blocks[-1]) > 1:
                fresh = self._allocate(1, row)
                cow_src.append(blocks[-1])
                cow_dst.append(fresh[0])
                pool.allocator.free([blocks[-1]])
                blocks[-1] = fresh[0]
            need = -(-new_len // bs) - len(blocks)
            if need > 0:
                blocks.extend(self._allocate(need, row))
        for row, source in enumerate(same_as):
            if source is not None:
                pool.allocator.share(self._blocks[source])
                self._blocks[row] = list(self._blocks[source])
        pool.copy_blocks(cow_src, cow_dst)

    def _allocate(self, n: int, row: int) -> list[int]:
        got = self.pool.allocator.allocate(n)
        if got is None:
            a = self.pool.allocator
            raise PoolExhaustedError(
                f"the KV pool is full ({a.num_used}/{a.num_blocks} blocks of {self.pool.block_size} tokens in use) "
                f"while growing row {row}; pass a larger num_blocks / memory_fraction to hf_paged.enable, "
                "or use ContinuousGenerator, which preempts instead"
            )
        return got

    # ---- dense fallback for models that hard-code their attention ------------------------------
    def _build_dense_index(self, device: torch.device) -> torch.Tensor:
        """Slots of a left-padded ``[B, logical_len]`` view: row b's real tokens sit in its last columns."""
        bs = self.pool.block_size
        total = self._logical_len
        index = torch.zeros((len(self._lens), total), dtype=torch.long)
        for row, (blocks, n) in enumerate(zip(self._blocks, self._lens)):
            if n:
                pos = torch.arange(n)
                table = torch.tensor(blocks, dtype=torch.long)
                index[row, total - n :] = table[pos // bs] * bs + pos % bs
        return index.to(device, non_blocking=True)

    def _gather_dense(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Padding columns read slot 0, which holds finite data; the model's own mask hides them.
        b, t = self._dense_index.shape
        k, v = self.pool.read_dense(layer_idx, self._dense_index.view(-1))  # dequantized when FP8
        heads, dim = k.shape[-2:]
        return k.view(b, t, heads, dim).transpose(1, 2), v.view(b, t, heads, dim).transpose(1, 2)

    # ---- batch surgery: beam search, assisted decoding, contrastive search ---------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes old row ``beam_idx[i]``: block tables are permuted and shared, never copied.

        A shared partly filled last block is copied only when one of its owners writes to it.
        """
        if self.pool is None:
            return
        order = beam_idx.tolist()
        allocator = self.pool.allocator
        new_blocks = [list(self._blocks[i]) for i in order]
        for blocks in new_blocks:
            allocator.share(blocks)
        for blocks in self._blocks:
            allocator.free(blocks)
        self._blocks = new_blocks
        self._lens = [self._lens[i] for i in order]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(torch.arange(len(self._lens)).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens of every row (assisted decoding rejects draft tokens this way).

        Negative: remove that many; 0: nothing; positive: keep that many logical tokens (transformers
        5.17's legacy meaning).
        """
        if tokens_to_remove == 0 or self.pool is None:
            return
        drop = -tokens_to_remove if tokens_to_remove < 0 else self._logical_len - tokens_to_remove
        drop = max(0, min(drop, self._logical_len))
        bs = self.pool.block_size
        for row, blocks in enumerate(self._blocks):
            if self._lens[row] < drop:
                raise ValueError(f"cannot crop {drop} tokens from row {row}, which holds {self._lens[row]} real tokens")
            self._lens[row] -= drop
            keep = -(-self._lens[row] // bs)
            self.pool.allocator.free(blocks[keep:])
            del blocks[keep:]
        self._logical_len -= drop

    def activate_past_recording(self) -> None:
        # Everything stays in the pool until crop() drops it, so there is nothing to record.
        pass

    def is_recording_past(self, layer_idx: int) -> bool:
        return True

    def reset(self) -> None:
        self.release()

    def release(self) -> None:
        """Give every block back to the pool. Safe to call twice; ``generate`` calls it on exit."""
        if self.pool is not None:
            for blocks in self._blocks:
                self.pool.allocator.free(blocks)
        self._blocks = [[] for _ in self._lens]
        self._lens = [0] * len(self._lens)
        self._logical_len = 0
        self._last_layer = None
        self.step = None
        self._dense_index = None

    def __del__(self) -> None:
        # Caches that outlive a generate call (transformers keeps an assistant model's cache between
        # rounds and passes it back in) give their blocks back when dropped.
        try:
            self.release()
        except Exception:  # interpreter shutdown: the pool may already be gone
            pass

    # ---- introspection -----------------------------------------------------------------------
    @property
    def num_blocks_used(self) -> int:
        return len({b for blocks in self._blocks for b in blocks})

    @property
    def real_lengths(self) -> list[int]:
        return list(self._lens)
