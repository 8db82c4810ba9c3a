"""Per-step attention metadata: built once per forward step, then only read by every layer.

Length vocabulary, used with these exact names everywhere (kernels included)::

    |------------ context_len ------------|----- query_len -----|
    |------------------------- seq_len -------------------------|

- ``context_len``: tokens of a row already in the pool before this step.
- ``query_len``:   query slots of the row in this step's packed batch. Under ``generate`` with left
  padding the first slots of a prompt may be padding; they get a negative position and no slot.
- ``seq_len``:     tokens of the row in the pool after this step's K/V are written.

Query slot ``i`` (0-based) of a row sits at position ``seq_len - query_len + i`` and sees every key
position ``j <= position`` (minus what a sliding window hides). A negative position marks padding:
such a slot writes nothing and attends to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class StepMetadata:
    """Device tensors describing one packed step of B rows and T query slots."""

    query_start_loc: torch.Tensor  # int32 [B+1]: row b owns query slots [start[b], start[b+1])
    seq_lens: torch.Tensor  # int32 [B]: seq_len of each row (context + this step's real tokens)
    block_tables: torch.Tensor  # int32 [B, max_blocks]: physical block of each logical block
    slot_mapping: torch.Tensor  # int64 [T]: pool slot each query slot writes, -1 for padding
    max_query_len: int  # host-side upper bound on query_len, sizes the kernel grid
    max_seq_len: int  # host-side max seq_len, sizes the dense fallback gather
    # Scratch of attention backends that plan once per step and reuse the plan in every layer (the CPU
    # path's row buckets, gather indices and masks); filled by the first layer, dropped with the step.
    # Code that rewrites the tensors above in place for another step must clear it.
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return self.seq_lens.shape[0]


def build_step_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    writes: list[bool] | None = None,
) -> StepMetadata:
    """Vectorised host-side build, then one non-blocking copy per tensor to ``device``.

    ``writes[b] = False`` gives row b's query slots no pool slot: its K/V are already stored by an
    identical row whose blocks it shares (the row still attends normally).
    """
    num_rows = len(query_lens)
    assert len(seq_lens) == num_rows == len(block_tables)
    q = torch.tensor(query_lens, dtype=torch.int64)
    s = torch.tensor(seq_lens, dtype=torch.int64)
    max_blocks = max(map(len, block_tables), default=0) or 1
    # One tensor from padded Python lists: a tensor per row costs ~5 us each, the bulk of a CPU step's build.
    tables = torch.tensor([[*t, *[0] * (max_blocks - len(t))] for t in block_tables], dtype=torch.int64)
    tables = tables.view(num_rows, max_blocks)  # (also for num_rows == 0)

    start = torch.zeros(num_rows + 1, dtype=torch.int64)
    torch.cumsum(q, 0, out=start[1:])
    num_tokens = int(start[-1])
    row = torch.repeat_interleave(torch.arange(num_rows), q)
    slot_in_row = torch.arange(num_tokens) - start[:-1][row]
    position = s[row] - q[row] + slot_in_row
    safe = position.clamp(min=0)
    block = tables[row, safe // block_size]
    writing = position >= 0
    if writes is not None:
        writing &= torch.tensor(writes, dtype=torch.bool)[row]
    slots = torch.where(writing, block * block_size + safe % block_size, torch.full_like(position, -1))

    pin = device.type == "cuda"

    def to_device(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = t.to(dtype)
        if pin:
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return StepMetadata(
        query_start_loc=to_device(start, torch.int32),
        seq_lens=to_device(s, torch.int32),
        block_tables=to_device(tables, torch.int32),
        slot_mapping=to_device(slots, torch.int64),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )
