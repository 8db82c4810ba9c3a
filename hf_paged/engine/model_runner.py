"""Turns a ``ScheduledBatch`` into one packed forward of the model and returns the sampling rows' logits.

The packed batch is one row of ``T = sum(query_len)`` tokens: request b's tokens ``[context_len,
seq_len)`` in order, each at its own position. The attention never sees a mask: the ``hf_paged``
attention function reads the step's block tables and lengths from the cache (``set_step``), and a
tiny dummy 4D ``attention_mask`` makes transformers return it as-is instead of building one
(``masking_utils._preprocess_mask_arguments``: "If the mask is already 4D, simply return as-is").
"""

from __future__ import annotations

import contextlib

import torch

from ..integration.attention import active_cache, implementation_switch
from ..integration.cache import PagedCache
from ..integration.tensor_parallel import kv_heads_per_rank
from .cuda_graphs import DecodeGraphs
from .fusion import ElementwiseFusion
from ..memory.kv_pool import KVLayout, KVPool
from ..memory.metadata import StepMetadata, build_step_metadata
from .scheduler import ScheduledBatch


def kv_layout_from_config(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str) -> KVLayout:
    """The K/V shape of one token in one layer, from the config, so the pool is sized before any forward."""
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    # A tensor-parallel model computes only its rank's share of the KV heads (refused if uneven).
    num_kv_heads = kv_heads_per_rank(model)
    return KVLayout(config.num_hidden_layers, num_kv_heads, head_dim, dtype, torch.device(device))


def max_model_len(model: torch.nn.Module) -> int | None:
    """Longest sequence the model's positions cover (None when the config names no limit)."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ModelRunner:
    """Runs the model on packed steps against the pool, through a ``PagedCache`` planned by the scheduler.

    Args:
        model: a transformers causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
        pool: the KV pool (its layout must match what the model's layers produce).
        backend: attention backend ("auto", "torch" or "triton").
        cuda_graphs: replay captured CUDA graphs for decode steps (CUDA only).
        max_num_seqs: largest decode batch a graph is captured for.
        fuse_elementwise: run the model's RMSNorm / MLP modules compiled (``fusion.py``; CUDA only).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        backend: str,
        *,
        cuda_graphs: bool = False,
        max_num_seqs: int = 512,
        fuse_elementwise: bool = False,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = pool.layout.device
        self.cache = PagedCache.for_external_steps(pool, pool.layout.num_layers, backend=backend)
        self.switch = implementation_switch(model)
        # Returned as-is by the mask code; the paged attention ignores it.
        self.dummy_mask = torch.zeros((1, 1, 1, 1), dtype=pool.layout.dtype, device=self.device)
        self._layout_checked = False
        self._use_graphs = cuda_graphs and self.device.type == "cuda" and backend != "torch"
        self.max_num_seqs = max_num_seqs
        self.graphs: DecodeGraphs | None = None
        use_fusion = fuse_elementwise and self.device.type == "cuda"
        self.fusion = ElementwiseFusion(model) if use_fusion else contextlib.nullcontext()

    def prepare(self, max_seq_len: int) -> None:
        """Size the decode graphs' block tables for sequences of up to ``max_seq_len`` tokens.

        Graphs are captured lazily per batch bucket and recaptured only when a run needs wider tables.
        """
        if not self._use_graphs:
            return
        blocks = -(-max_seq_len // self.pool.block_size)
        width = 1 << max(0, blocks - 1).bit_length()  # a power of two: few distinct widths, few recaptures
        if self.graphs is None or self.graphs.width < width:
            self.graphs = DecodeGraphs(self.forward, self.pool, width, self.max_num_seqs)
            if self._layout_checked:  # capture needs a forward that already checked the layout
                self.graphs.capture_all()

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Forward the step; returns ``[R, V]`` logits of the requests that sample, in batch order."""
        if batch.swap_out:  # preemption by swapping: first, the forward may reuse the blocks
            self.pool.swap_out(*map(list, zip(*batch.swap_out)))
        if batch.swap_in:
            self.pool.swap_in(*map(list, zip(*batch.swap_in)))
        if batch.block_copies:  # copy-on-write, before anything writes the copies
            src, dst = zip(*batch.block_copies)
            self.pool.copy_blocks(list(src), list(dst))
        if self.graphs is not None and self._layout_checked and all(
            s.num_scheduled_tokens == 1 and s.samples for s in batch.requests
        ):
            logits = self.graphs.run(
                [s.request.token_ids[s.context_len] for s in batch.requests],
                [s.seq_len for s in batch.requests],
                [s.request.block_ids for s in batch.requests],
            )
            if logits is not None:
                return logits
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        keep: list[int] = []  # packed index of each sampling request's last token
        for s in batch.requests:
            r = s.request
            input_ids.extend(r.token_ids[s.context_len : s.seq_len])
            query_lens.append(s.num_scheduled_tokens)
            seq_lens.append(s.seq_len)
            block_tables.append(r.block_ids)
            if s.samples:
                keep.append(len(input_ids) - 1)

        # position of packed token t of row b = context_len[b] + (t - query_start[b])
        q = torch.tensor(query_lens)
        context = torch.tensor(seq_lens) - q
        starts = torch.cumsum(q, 0) - q
        row = torch.repeat_interleave(torch.arange(len(query_lens)), q)
        positions = context[row] + torch.arange(len(input_ids)) - starts[row]

        host = torch.stack([torch.tensor(input_ids), positions])  # [2, T] int64: one copy
        keep_host = torch.tensor(keep, dtype=torch.long)
        if self.device.type == "cuda":
            host, keep_host = host.pin_memory(), keep_host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        logits_to_keep = keep_host.to(self.device, non_blocking=True)

        step = build_step_metadata(query_lens, seq_lens, block_tables, self.pool.block_size, self.device)
        if not self._layout_checked:
            self._check_layout_on_first_update()
        return self.forward(dev[0:1], dev[1:2], step, logits_to_keep)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: StepMetadata, logits_to_keep: torch.Tensor
    ) -> torch.Tensor:
        """One packed forward (``[1, T]`` ids and positions) over the pool; ``[R, V]`` logits of the kept rows.

        The eager path and the captured decode graphs both run exactly this.
        """
        self.cache.set_step(step)
        with torch.inference_mode(), self.switch, self.fusion, active_cache(self.cache):
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=self.dummy_mask,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
            )
        return out.logits[0]

    def _check_layout_on_first_update(self) -> None:
        """Wrap the cache's ``update`` for one forward to assert the real K/V match the pool's layout."""
        cache, layout = self.cache, self.pool.layout

        def checked_update(key_states, value_states, layer_idx, *args, **kwargs):
            _, heads, _, head_dim = key_states.shape
            got = (heads, head_dim, key_states.dtype, key_states.device)
            want = (layout.num_kv_heads, layout.head_dim, layout.dtype, layout.device)
            assert got == want and layer_idx < layout.num_layers, (
                f"the model's K/V of layer {layer_idx} are (heads, head_dim, dtype, device) = {got}, but the pool "
                f"was sized from the config as {want} with {layout.num_layers} layers"
            )
            del cache.update  # back to the class method: one check per generator is enough
            self._layout_checked = True
            return cache.update(key_states, value_states, layer_idx, *args, **kwargs)

        cache.update = checked_update
