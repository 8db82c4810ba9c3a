"""One token-budget scheduler: chunked prefill, decode and preemption-by-recompute are one code path.

NOTE on the algorithm (after vLLM v1): there is no prefill phase and no decode phase. Every request
has ``num_computed_tokens`` (K/V in the pool) and ``num_tokens`` (prompt + generated). Each step hands
out at most ``max_num_batched_tokens`` tokens so that requests catch up: running requests first, in
admission order (a decode asks for 1 token, an unfinished prompt for its next chunk), then waiting
requests FIFO, so decodes and prompt chunks share a step. A request samples when its chunk reaches
``num_tokens``.

Blocks are allocated on demand. When the allocator says no (``None``), the most recently admitted
running request is preempted: its blocks are freed and it goes to the FRONT of the waiting queue with
its generated tokens kept, to be recomputed as part of its "prompt" later. Outputs do not change:
greedy decoding recomputes the same K/V, and seeded noise depends on (seed, position) only.

Pure Python plus the ``BlockAllocator``: no torch, tested on CPU with fake step outputs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from .block_allocator import BlockAllocator
from .request import Request, RequestStatus, TokenLogprobs


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    context_len: int  # tokens of the request already in the pool before this step
    num_scheduled_tokens: int  # query_len: tokens computed this step (a prompt chunk, or 1 for a decode)
    samples: bool  # this chunk reaches num_tokens, so its last logits sample the next token

    @property
    def seq_len(self) -> int:
        return self.context_len + self.num_scheduled_tokens


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    """What one forward step computes; consumed by the model runner, then by ``Scheduler.update``."""

    requests: tuple[ScheduledRequest, ...]  # running requests first, then newly admitted ones
    num_scheduled_tokens: int  # sum of query_len: the packed batch length T

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def sampling(self) -> list[ScheduledRequest]:
        """The requests that sample this step, in batch order (the order of the sampled ids)."""
        return [s for s in self.requests if s.samples]


class Scheduler:
    """Decides each step's tokens within the budgets and applies each step's sampled tokens.

    Args:
        allocator: hands out KV blocks; ``allocate`` returning ``None`` triggers preemption.
        block_size: tokens per KV block.
        max_num_seqs: most requests running (holding blocks) at once.
        max_num_batched_tokens: most tokens computed in one step.
        eos_token_ids: ids that finish a request ("stop") unless its ``ignore_eos`` is set.
        max_model_len: a request stops ("length") when prompt + generated reaches it (None: no limit).
    """

    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        eos_token_ids: Collection[int] = (),
        max_model_len: int | None = None,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"{max_num_seqs = } and {max_num_batched_tokens = } must both be >= 1")
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; the last one is the preemption victim
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0  # tokens whose K/V a preemption threw away

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- schedule ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, "a running request has nothing to compute"
            while not self._allocate_slots(request, num_new):
                # Victims come from the end of `running`, i.e. after `i`: none of them is scheduled yet.
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # the request preempted itself: nothing behind it is left either
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            i += 1

        # A preemption means the pool is tight: admitting new work now would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_slots(request, num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

        if not scheduled and self.has_unfinished():
            raise RuntimeError(
                f"cannot schedule any request: {self.allocator.num_free}/{self.allocator.num_blocks} KV blocks "
                f"free, {len(self.waiting)} waiting, {len(self.running)} running"
            )
        return ScheduledBatch(tuple(scheduled), self.max_num_batched_tokens - budget)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        context_len = request.num_computed_tokens
        return ScheduledRequest(request, context_len, num_new, context_len + num_new == request.num_tokens)

    def _allocate_slots(self, request: Request, num_new: int) -> bool:
        """Give ``request`` the blocks for ``num_new`` more tokens; False (nothing taken) if the pool is full."""
        need = -(-(request.num_computed_tokens + num_new) // self.block_size) - len(request.block_ids)
        if need <= 0:
            return True
        blocks = self.allocator.allocate(need)
        if blocks is None:
            return False
        request.block_ids.extend(blocks)
        return True

    def _preempt(self, request: Request) -> None:
        """Drop the request's K/V; it is recomputed (prompt + generated tokens) when admitted again."""
        self._free(request)
        self.num_preemptions += 1
        self.num_recomputed_tokens += request.num_computed_tokens
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _free(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []

    # ---- update ------------------------------------------------------------------------------
    def update(
        self,
        batch: ScheduledBatch,
        sampled_token_ids: list[int],
        logprobs: list[TokenLogprobs | None] | None = None,
    ) -> list[Request]:
        """Apply a step's results; returns the requests that got a token (finished ones included).

        ``sampled_token_ids`` (and ``logprobs``) hold one entry per sampling request, in batch order.
        A request that finishes gives its blocks back at once.
        """
        now = time.perf_counter()
        advanced: list[Request] = []
        row = 0
        for s in batch.requests:
            request = s.request
            request.num_computed_tokens += s.num_scheduled_tokens
            if not s.samples:
                continue
            token = sampled_token_ids[row]
            if request.logprobs is not None:
                request.logprobs.append(logprobs[row])
            row += 1
            request.token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            reason = self._finish_reason(request, token)
            if reason is not None:
                request.status = RequestStatus.FINISHED
                request.finish_reason = reason
                request.finish_time = now
                if request.detokenizer is not None:
                    request.detokenizer.flush()
                self._free(request)
            advanced.append(request)
        assert row == len(sampled_token_ids), f"{len(sampled_token_ids)} sampled ids for {row} sampling requests"
        if any(r.finished for r in advanced):
            self.running = [r for r in self.running if not r.finished]
        return advanced

    def _finish_reason(self, request: Request, token: int) -> str | None:
        params = request.params
        stop_string = request.detokenizer is not None and request.detokenizer.append(token)
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids) or stop_string:
            return "stop"
        if request.num_output_tokens >= params.max_new_tokens:
            return "length"
        if self.max_model_len is not None and request.num_tokens >= self.max_model_len:
            return "length"
        return None

    def abort_all(self) -> None:
        """Free every block of every request (after an error or an interrupt) and forget them all."""
        for request in self.running:
            self._free(request)
            request.status = RequestStatus.FINISHED
        for request in self.waiting:
            self._free(request)
            request.status = RequestStatus.FINISHED
        self.running = []
        self.waiting.clear()
