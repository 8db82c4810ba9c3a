"""``PagedCache``: a transformers ``Cache`` whose K/V live in a shared block pool.

Two lengths matter here:

- the *logical* length is what ``generate`` and the mask code believe: every row of the batch is as
  long as the attention mask (prompt columns, padding included, plus what was generated).
  ``get_seq_length`` and ``get_mask_sizes`` report it, so positions and mask slicing in transformers
  stay as they are;
- the *real* length of a row is how many tokens it actually stores: only the columns whose attention
  mask is 1 when they are processed (stock attention never looks at the others). KV memory is
  ``sum(ceil(real_len / block_size))`` blocks, at most one partly filled block per row.

Each stored token keeps the logical column it came from. With left padding (the common case) a row's
tokens are simply its last ``real_len`` columns and nothing is recorded; any other 2D mask (right
padding, holes) switches the cache to explicit per-row column lists. Attention then gives every query
column exactly the keys stock attention gives it: the stored tokens at columns ``<= `` its own (and
inside its sliding window, counted in columns), minus tokens that a later mask hides.

A step is planned once, on the first ``update`` of a forward (block allocation, copy-on-write of
shared partial blocks, ``StepMetadata``); every layer then only reads that plan. The forward
pre-hook installed by ``enable`` hands over the step's 2D attention mask.

Lifetime: ``enable``'s ``generate`` gives a cache's blocks back when the call ends, unless the call
returns the cache (``return_dict_in_generate=True``). A returned cache keeps its blocks, so it can be
read (``cache.layers[i].keys``) and passed back to ``generate`` to continue; they return to the pool
when the cache is garbage collected or ``cache.release()`` is called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..memory.kv_pool import KVLayout, KVPool
from ..memory.metadata import StepMetadata, build_step_metadata

# Key column of a padding entry in a masked view: larger than any query column, so never visible.
_NO_COLUMN = 1 << 62


class PoolExhaustedError(RuntimeError):
    """The KV pool has no room for a ``generate`` call; nothing a retry of the same call can fix."""


@dataclass(frozen=True, slots=True)
class PoolBudget:
    """What a fresh ``generate`` call will write at most, checked against the pool before its first step.

    ``max_new_tokens``: tokens generated per row; the last one is never written to the cache.
    ``prompt_columns``: width of the prompt (a chunked prefill shows only part of it in the first step).
    ``beams``: rows are beams of one search, which share blocks as their histories coincide.
    """

    max_new_tokens: int
    prompt_columns: int = 0
    beams: bool = False


@dataclass(slots=True)
class MaskedView:
    """One step's keys as dense per-row lists, for the attention path that takes explicit masks.

    ``slots[b, j]``: pool slot of row b's j-th stored token; ``key_columns[b, j]`` its logical column
    (``_NO_COLUMN`` for padding entries and hidden tokens); ``query_columns``: the step's columns.
    """

    slots: torch.Tensor  # int64 [B, K]
    key_columns: torch.Tensor  # int64 [B, K]
    query_columns: torch.Tensor  # int64 [q]
    total_len: int  # logical length after the step


class PagedLayer(CacheLayerMixin):
    """Per-layer view: the data lives in the pool, the bookkeeping in ``PagedCache``.

    transformers derives ``is_sliding``, ``is_compileable`` and friends from ``Cache.layers``, so the
    list must exist with one entry per model layer. ``keys``/``values`` are dense ``[B, H_kv, L, D]``
    copies gathered from the pool on each access (each stored token at its logical column, zeros in
    columns that hold no token), for code that reads a cache returned by ``generate``.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "PagedCache", layer_idx: int) -> None:
        # CacheLayerMixin.__init__ would assign keys/values, which are read-only views here.
        # A weak reference keeps PagedCache free of reference cycles, so dropping the last reference
        # frees its blocks at once (see PagedCache.__del__).
        self._cache_ref = weakref.ref(cache)
        self.layer_idx = layer_idx

    @property
    def _cache(self) -> "PagedCache":
        return self._cache_ref()

    @property
    def is_initialized(self) -> bool:
        cache = self._cache
        return cache is not None and cache.pool is not None

    @property
    def keys(self) -> torch.Tensor | None:
        return self._cache.dense_layer(self.layer_idx)[0]

    @property
    def values(self) -> torch.Tensor | None:
        return self._cache.dense_layer(self.layer_idx)[1]

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
        dense: return dense ``[B, H, logical_len, D]`` K/V from ``update`` for models that hard-code
            their attention instead of calling the registered attention function.
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
        super().__init__(layers=[PagedLayer(self, i) for i in range(num_layers)])
        self.num_layers = num_layers
        self.dense = dense
        self.backend = backend
        self._pool_provider = pool_provider
        self.pool: KVPool | None = None
        self._blocks: list[list[int]] = []  # per row: physical block ids, in order
        self._lens: list[int] = []  # per row: real tokens stored
        self._logical_len = 0
        # Per row, the logical column of each stored token; None while every row's tokens are its last
        # real_len columns (left padding), which is all the bookkeeping that case needs.
        self._columns: list[list[int]] | None = None
        # Per row, columns of stored tokens that a later attention mask hides (assisted decoding infers
        # its assistant's mask from pad tokens, so an accepted pad token becomes a hole); None: none.
        self._hidden: list[set[int]] | None = None
        self._pending_mask: torch.Tensor | None = None
        self._pending_ids: torch.Tensor | None = None
        self._has_pending = False
        self._new_call = False  # the next forward is the first of a generate call
        self._budget: PoolBudget | None = None
        self._expected_len = 0  # see expected_len
        self._last_layer: int | None = None
        self.step: StepMetadata | None = None
        self._step_len = 0  # query columns of the current step
        self._step_irregular = False  # this step's new columns are not "padding, then tokens"
        self._masked_view: MaskedView | None = None
        self._dense_index: torch.Tensor | None = None  # [B, logical_len] slots for the dense fallback
        self._dense_cache: tuple[int, int, tuple] | None = None  # (layer, version, (K, V)) for readers
        self._version = 0  # bumped whenever the stored tokens change
        self._external = False  # steps planned by the caller (ContinuousGenerator), not by update()
        # Whether the running forward asked for attention weights (output_attentions), set by the hooks.
        self.want_attention_weights = False
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
    def begin_call(self, budget: PoolBudget | None = None) -> None:
        """A ``generate`` call starts with this cache. Its first forward reads the whole attention mask
        (it may hide stored tokens or start with padding); later forwards of the call only append
        tokens. A ``budget`` is checked against the pool before a fresh cache's first step."""
        self._new_call = True
        self._budget = budget if self._logical_len == 0 else None
        self._expected_len = self._logical_len + budget.prompt_columns + budget.max_new_tokens if budget else 0

    def begin_forward(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None = None) -> None:
        """Called by the forward pre-hook: the 2D mask (``[B, logical_len + q]``) and ids of the coming step."""
        self._pending_mask = attention_mask
        self._pending_ids = input_ids
        self._has_pending = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V (``[B, H_kv, q, D]``) into the pool; the only K/V writer of hf_paged."""
        if torch.compiler.is_compiling():
            return self._compiled_update(key_states, value_states, layer_idx)
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

    def _compiled_update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """``update`` as ``torch.compile`` traces it: the step was planned outside the compiled region
        (``static_step``), and the write is the opaque ``hf_paged::write_kv`` op (registered by the attention
        module), so nothing here runs host logic per step."""
        if not self._external or self.dense:
            raise RuntimeError("a compiled forward over a PagedCache needs a step planned outside it (static_step)")
        batch, heads, q_len, head_dim = key_states.shape
        k_tok = key_states.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
        v_tok = value_states.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
        torch.ops.hf_paged.write_kv(k_tok, v_tok, self.pool.kv, self.pool.scales, layer_idx, self.step.slot_mapping)
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
        new = self._new_columns(batch, q_len)
        real = [q_len] * batch if new is None else new.sum(dim=1).tolist()
        irregular = new is not None and self._is_irregular(new)
        if irregular and self._columns is None:
            self._materialize_columns()
        same_as = self._duplicate_rows(batch, q_len, new)
        if self._budget is not None:
            self._check_budget(real, q_len, same_as)
        self._has_pending = False
        self._pending_mask = self._pending_ids = None
        self._advance(new, real, same_as, q_len)
        self._step_irregular = irregular
        writes = None if all(s is None for s in same_as) else [s is None for s in same_as]
        step = build_step_metadata(
            [q_len] * batch, self._lens, self._blocks, self.pool.block_size, key_states.device, writes
        )
        if irregular:
            # Real tokens sit between padding columns: each takes the next slot of its row.
            old_lens = [n - r for n, r in zip(self._lens, real)]
            step = dataclasses.replace(step, slot_mapping=self._slot_mapping(new, old_lens, writes, key_states.device))
        self.step = step
        if self.dense:
            self._dense_index = self._build_dense_index(key_states.device)

    def _advance(self, new: torch.Tensor | None, real: list[int], same_as: list[int | None], q_len: int) -> None:
        """The host bookkeeping of a step: blocks reserved, lengths and logical columns advanced."""
        old_lens = self._lens
        new_lens = [n + r for n, r in zip(old_lens, real)]
        self._reserve(new_lens, real, same_as)
        if self._columns is not None:
            self._append_columns(new, q_len)
        self._lens = new_lens
        self._logical_len += q_len
        self._step_len = q_len
        self._masked_view = None
        self._version += 1

    # ---- decode steps run from static buffers (enable()'s CUDA graphs) ---------------------------
    def static_decode_ready(self, batch: int) -> bool:
        """Whether the coming forward, one new token per row of ``batch``, may run from static buffers.

        That holds for the steps after a call's first: left padding only (each row's tokens are its last
        columns), nothing hidden, no attention weights asked for, a mask that only appends a column.
        Any other step goes through ``update``'s own planning.
        """
        mask = self._pending_mask
        return (
            self._has_pending
            and not self._external
            and not self.dense
            and self.pool is not None
            and not self._new_call
            and self._logical_len > 0
            and self._budget is None
            and batch == len(self._lens)
            and self._columns is None
            and self._hidden is None
            and not self.want_attention_weights
            and (mask is None or (mask.dim() == 2 and tuple(mask.shape) == (batch, self._logical_len + 1)))
        )

    def advance_decode_step(self) -> None:
        """Plan a step of one new token per row on the host only (blocks, lengths); the caller then
        describes it to the layers through ``static_step``. Requires ``static_decode_ready``."""
        batch = len(self._lens)
        self._has_pending = False
        self._pending_mask = self._pending_ids = None
        self._advance(None, [1] * batch, [None] * batch, 1)
        self._step_irregular = False

    @contextlib.contextmanager
    def static_step(self, step: StepMetadata) -> Iterator[None]:
        """Inside, every layer writes and attends through ``step`` and plans nothing (the step has been
        advanced already); ``step`` stays the cache's current step afterwards."""
        external = self._external
        self._external = True
        self.step = step
        try:
            yield
        finally:
            self._external = external

    @property
    def expected_len(self) -> int:
        """Logical length the running call will reach (prompt columns plus ``max_new_tokens``), when its
        budget said so; 0 when unknown."""
        return self._expected_len

    def _new_columns(self, batch: int, q_len: int) -> torch.Tensor | None:
        """``[B, q]`` bool on the host: which of this step's columns are real (None: all of them).

        Within one ``generate`` call, every forward after the first only appends tokens whose mask is
        1 (generate extends the mask with ones), so a one-token step after the first reads nothing on
        the host. The first forward of a call also checks the mask over the stored columns.
        """
        mask = self._pending_mask
        if mask is None:
            if self._new_call and self._logical_len:
                self._check_context(torch.ones((batch, self._logical_len), dtype=torch.bool), given=False)
            self._new_call = False
            return None
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != self._logical_len + q_len:
            raise ValueError(
                f"hf_paged expects a 2D attention mask of shape [{batch}, {self._logical_len + q_len}], "
                f"got {tuple(mask.shape)}"
            )
        if q_len == 1 and self._logical_len > 0 and not self._new_call:
            return None
        host = mask.to(device="cpu", dtype=torch.bool)
        if self._new_call and self._logical_len:
            self._check_context(host[:, : self._logical_len])
        self._new_call = False
        new = host[:, self._logical_len :]
        return None if bool(new.all()) else new

    def _is_irregular(self, new: torch.Tensor) -> bool:
        """Whether some row's new columns are not "padding, then tokens" into an empty row.

        Such a step (right padding, holes, padding after stored tokens) is attended with explicit masks,
        and its rows' stored tokens no longer are their last columns.
        """
        q_len = new.shape[1]
        counts = new.sum(dim=1)
        suffix = torch.arange(q_len).unsqueeze(0) >= (q_len - counts).unsqueeze(1)
        had = torch.tensor([n > 0 for n in self._lens], dtype=torch.bool)
        return bool(((new != suffix).any(dim=1) | (had & (counts != q_len))).any())

    def _row_columns(self, row: int) -> list[int]:
        if self._columns is not None:
            return self._columns[row]
        n = self._lens[row]
        return list(range(self._logical_len - n, self._logical_len))

    def _materialize_columns(self) -> None:
        self._columns = [self._row_columns(row) for row in range(len(self._lens))]

    def _append_columns(self, new: torch.Tensor | None, q_len: int) -> None:
        start = self._logical_len
        for row, columns in enumerate(self._columns):
            if new is None:
                columns.extend(range(start, start + q_len))
            else:
                columns.extend((start + new[row].nonzero().flatten()).tolist())

    def _check_context(self, context: torch.Tensor, given: bool = True) -> None:
        """The first forward of a call brings the mask of the stored columns: hide tokens it masks.

        A column that is 1 now but was masked when it was processed was never stored, so the mask
        cannot be honoured: that raises instead of attending to something else.
        """
        total = self._logical_len
        if self._columns is None and self._hidden is None:
            lens = torch.tensor(self._lens, dtype=torch.long)
            expected = torch.arange(total).unsqueeze(0) >= (total - lens).unsqueeze(1)
            if torch.equal(context, expected):
                return
            self._materialize_columns()
        hidden: list[set[int]] = []
        for row, columns in enumerate(self._columns):
            stored = torch.zeros(total, dtype=torch.bool)
            if columns:
                stored[torch.tensor(columns, dtype=torch.long)] = True
            missing = context[row] & ~stored
            if bool(missing.any()):
                column = int(missing.nonzero()[0])
                which = "the attention mask" if given else "the attention mask (none was passed: all ones)"
                raise ValueError(
                    f"row {row} of {which} has a 1 at column {column}, which was masked out when it was "
                    "processed, so hf_paged never stored it; pass the same mask for columns already in the cache"
                )
            hidden.append(set((stored & ~context[row]).nonzero().flatten().tolist()))
        self._hidden = hidden if any(hidden) else None
        self._masked_view = None
        self._version += 1

    def _duplicate_rows(self, batch: int, q_len: int, new: torch.Tensor | None) -> list[int | None]:
        """Per row, an earlier row it duplicates exactly (same blocks so far, same new ids and mask), else None.

        ``generate(num_beams=k)`` and ``num_return_sequences=k`` expand every prompt k times before the
        first forward; duplicates then share the first copy's blocks instead of storing the prompt k
        times. Checked on multi-token steps only, whose mask is read on the host anyway.
        """
        ids = self._pending_ids
        if batch == 1 or q_len == 1 or ids is None or ids.shape != (batch, q_len):
            return [None] * batch
        ids = ids.cpu().tolist()
        mask = new.tolist() if new is not None else [None] * batch
        first: dict[tuple, int] = {}
        same_as: list[int | None] = []
        for row in range(batch):
            columns = tuple(self._columns[row]) if self._columns is not None else None
            hidden = tuple(sorted(self._hidden[row])) if self._hidden is not None else None
            key = (
                tuple(self._blocks[row]), self._lens[row], columns, hidden, tuple(ids[row]), mask[row] and tuple(mask[row])
            )
            source = first.setdefault(key, row)
            same_as.append(None if source == row else source)
        return same_as

    def _check_budget(self, real: list[int], q_len: int, same_as: list[int | None]) -> None:
        """Refuse a fresh call whose prompts plus ``max_new_tokens`` cannot fit the pool, before any work.

        Counts the fewest blocks the call can finish with: every row's final length (prompt plus new
        tokens, minus the last token, which is never written), prompts shared by identical rows, and for
        beams one own block per extra beam (beams share whatever history they have in common).
        """
        budget, self._budget = self._budget, None
        bs = self.pool.block_size
        new = max(0, budget.max_new_tokens - 1)
        # Prompt columns a chunked prefill has not shown yet count as real (padding comes first).
        unseen = max(0, budget.prompt_columns - q_len)
        copies: dict[int, int] = {}
        for row, source in enumerate(same_as):
            leader = row if source is None else source
            copies[leader] = copies.get(leader, 0) + 1
        need = 0
        for row, k in copies.items():
            prompt = self._lens[row] + real[row] + unseen
            shared = prompt // bs
            own = -(-(prompt + new) // bs) - shared
            if budget.beams:
                need += shared + own + (k - 1) * min(own, 1)
            else:
                need += shared + k * own
        allocator = self.pool.allocator
        if need > allocator.num_free:
            longest = max(self._lens[r] + real[r] for r in range(len(real))) + unseen
            raise PoolExhaustedError(
                f"this generate call needs at least {need} KV blocks of {bs} tokens ({len(real)} rows, prompts of up "
                f"to {longest} tokens, max_new_tokens={budget.max_new_tokens}) but the pool has {allocator.num_free} "
                f"free of {allocator.num_blocks}; pass a larger num_blocks / memory_fraction / cpu_memory_bytes to "
                "hf_paged.enable, lower max_new_tokens, or use ContinuousGenerator, which preempts instead"
            )

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
                if self._columns is not None:
                    self._columns[row] = list(self._columns[source])
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

    def _slot_mapping(
        self, new: torch.Tensor, old_lens: list[int], writes: list[bool] | None, device: torch.device
    ) -> torch.Tensor:
        """``[B*q]`` pool slots of this step's columns: the k-th real column of a row takes its next slot."""
        bs = self.pool.block_size
        width = max(len(b) for b in self._blocks) or 1
        tables = torch.zeros((len(self._blocks), width), dtype=torch.long)
        for row, blocks in enumerate(self._blocks):
            if blocks:
                tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        index = torch.tensor(old_lens, dtype=torch.long).unsqueeze(1) + new.long().cumsum(dim=1) - 1
        index = index.clamp(min=0)
        slots = tables.gather(1, index // bs) * bs + index % bs
        keep = new.clone()
        if writes is not None:
            keep &= torch.tensor(writes, dtype=torch.bool).unsqueeze(1)
        return torch.where(keep, slots, torch.full_like(slots, -1)).flatten().to(device)

    # ---- explicit-mask attention (irregular masks, hidden tokens, attention weights) -------------
    def needs_masked_attention(self, sliding_window: int | None) -> bool:
        """Whether a layer of this step must attend through ``masked_view`` instead of the kernels.

        The kernels give a query the row's stored tokens up to its own position, counted in stored
        tokens. That equals stock attention unless the step itself has padding after tokens, a later
        mask hides stored tokens, or a sliding window (counted in columns) spans a gap.
        """
        if self._step_irregular or self._hidden is not None:
            return True
        return sliding_window is not None and self._columns is not None

    def masked_view(self) -> MaskedView:
        """The step's keys and columns, built once per step on first use."""
        if self._masked_view is None:
            self._masked_view = self._build_masked_view()
        return self._masked_view

    def _build_masked_view(self) -> MaskedView:
        bs = self.pool.block_size
        device = self.pool.kv.device
        width = max(self._lens, default=0) or 1
        slots = torch.zeros((len(self._lens), width), dtype=torch.long)
        key_columns = torch.full((len(self._lens), width), _NO_COLUMN, dtype=torch.long)
        for row, (blocks, n) in enumerate(zip(self._blocks, self._lens)):
            if not n:
                continue
            pos = torch.arange(n)
            table = torch.tensor(blocks, dtype=torch.long)
            slots[row, :n] = table[pos // bs] * bs + pos % bs
            columns = torch.tensor(self._row_columns(row), dtype=torch.long)
            if self._hidden is not None and self._hidden[row]:
                hidden = torch.tensor(sorted(self._hidden[row]), dtype=torch.long)
                columns = torch.where(torch.isin(columns, hidden), torch.full_like(columns, _NO_COLUMN), columns)
            key_columns[row, :n] = columns
        total = self._logical_len
        return MaskedView(
            slots=slots.to(device),
            key_columns=key_columns.to(device),
            query_columns=torch.arange(total - self._step_len, total, device=device),
            total_len=total,
        )

    # ---- dense views: the fallback for hard-coded attention, and readers of a returned cache -----
    def _build_dense_index(self, device: torch.device) -> torch.Tensor:
        """Slots of a ``[B, logical_len]`` view: each stored token at its logical column."""
        bs = self.pool.block_size
        total = self._logical_len
        index = torch.zeros((len(self._lens), total), dtype=torch.long)
        for row, (blocks, n) in enumerate(zip(self._blocks, self._lens)):
            if n:
                pos = torch.arange(n)
                table = torch.tensor(blocks, dtype=torch.long)
                columns = torch.tensor(self._row_columns(row), dtype=torch.long)
                index[row, columns] = table[pos // bs] * bs + pos % bs
        return index.to(device, non_blocking=True)

    def _gather_dense(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Padding columns read slot 0, which holds finite data; the model's own mask hides them.
        b, t = self._dense_index.shape
        k, v = self.pool.read_dense(layer_idx, self._dense_index.view(-1))  # dequantized when FP8
        heads, dim = k.shape[-2:]
        return k.view(b, t, heads, dim).transpose(1, 2), v.view(b, t, heads, dim).transpose(1, 2)

    def dense_layer(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A copy of one layer as ``[B, H_kv, logical_len, D]`` K and V (zeros where no token is stored).

        For readers of a cache (``cache.layers[i].keys``); ``generate`` itself never calls this. The
        last copy is kept until the cache changes, since readers often take keys and values in turn.
        """
        if self.pool is None:
            return None, None
        cached = self._dense_cache
        if cached is not None and cached[0] == layer_idx and cached[1] == self._version:
            return cached[2]
        bs = self.pool.block_size
        total = self._logical_len
        rows, columns, slots = [], [], []
        for row, (blocks, n) in enumerate(zip(self._blocks, self._lens)):
            if n:
                pos = torch.arange(n)
                table = torch.tensor(blocks, dtype=torch.long)
                rows.append(torch.full((n,), row, dtype=torch.long))
                columns.append(torch.tensor(self._row_columns(row), dtype=torch.long))
                slots.append(table[pos // bs] * bs + pos % bs)
        layout = self.pool.layout
        shape = (len(self._lens), total, layout.num_kv_heads, layout.head_dim)
        k = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        v = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        if rows:
            device = layout.device
            r, c = torch.cat(rows).to(device), torch.cat(columns).to(device)
            k_rows, v_rows = self.pool.read_dense(layer_idx, torch.cat(slots).to(device))
            k[r, c] = k_rows
            v[r, c] = v_rows
        result = (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        self._dense_cache = (layer_idx, self._version, result)
        return result

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
        if self._columns is not None:
            self._columns = [list(self._columns[i]) for i in order]
        if self._hidden is not None:
            self._hidden = [set(self._hidden[i]) for i in order]
        self._masked_view = None
        self._version += 1

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(torch.arange(len(self._lens)).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last logical columns of every row, with the tokens stored for them (assisted
        decoding rejects draft tokens this way).

        Negative: remove that many; 0: nothing; positive: keep that many logical tokens (transformers
        5.17's legacy meaning).
        """
        if tokens_to_remove == 0 or self.pool is None:
            return
        drop = -tokens_to_remove if tokens_to_remove < 0 else self._logical_len - tokens_to_remove
        drop = max(0, min(drop, self._logical_len))
        keep_len = self._logical_len - drop
        bs = self.pool.block_size
        for row, blocks in enumerate(self._blocks):
            if self._columns is None:
                # Stored tokens are the row's last columns, so the dropped columns hold its last tokens.
                removed = min(drop, self._lens[row])
            else:
                columns = self._columns[row]
                removed = 0
                while columns and columns[-1] >= keep_len:
                    columns.pop()
                    removed += 1
            if self._hidden is not None:
                self._hidden[row] = {c for c in self._hidden[row] if c < keep_len}
            self._lens[row] -= removed
            keep = -(-self._lens[row] // bs)
            self.pool.allocator.free(blocks[keep:])
            del blocks[keep:]
        if self._hidden is not None and not any(self._hidden):
            self._hidden = None
        self._logical_len = keep_len
        self._masked_view = None
        self._version += 1

    def activate_past_recording(self) -> None:
        # Everything stays in the pool until crop() drops it, so there is nothing to record.
        pass

    def is_recording_past(self, layer_idx: int) -> bool:
        return True

    def reset(self) -> None:
        self.release()

    def release(self) -> None:
        """Give every block back to the pool. Safe to call twice; ``generate`` calls it on exit unless it
        returns this cache."""
        if self.pool is not None:
            for blocks in self._blocks:
                self.pool.allocator.free(blocks)
        self._blocks = [[] for _ in self._lens]
        self._lens = [0] * len(self._lens)
        self._logical_len = 0
        self._columns = None
        self._hidden = None
        self._last_layer = None
        self.step = None
        self._masked_view = None
        self._dense_index = None
        self._dense_cache = None
        self._version += 1

    def __del__(self) -> None:
        # Caches that outlive a generate call (a returned cache; transformers keeps an assistant model's
        # cache between rounds and passes it back in) give their blocks back when dropped.
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
