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
With a swap space (``swap_blocks > 0``) a victim's blocks are copied to host memory instead
(``ScheduledBatch.swap_out``) and copied back into fresh blocks when it is admitted again
(``swap_in``), so nothing is recomputed; a victim that does not fit in the free swap space is
recomputed. A step that preempts admits nobody, so no step both swaps out and swaps in: a block or
swap slot freed by one direction is never the target of the other within a step.

Shared blocks (reference counts in the allocator make freeing exact):

- Prefix caching: a request admitted with nothing computed first takes every full block of its
  longest cached prefix (``BlockAllocator.lookup``) and computes only the rest; full blocks are
  registered as soon as a step has computed them, and stay findable after their request ends until
  ``allocate`` evicts them.
- Parallel sampling: the other samples of a prompt wait until its first sample has computed the
  prompt, then fork from it: they share its blocks and recompute only the last prompt token (which
  samples their first token with their own seed), so a decode-shaped step is all a fork costs.
- Copy-on-write: a step never writes a block that another sequence also holds; ``_allocate_slots``
  gives the writer a private copy first and the batch carries the ``(src, dst)`` copies to run
  before the forward. Only partly filled blocks are ever shared-and-written (full cached blocks lie
  wholly before every write position), so only those are copied.
- Sliding window: when every layer attends through a window, blocks wholly before every future
  query's window are given back as the sequence moves on, so its memory stays bounded by the window.

Pure Python plus the ``BlockAllocator``: no torch, tested on CPU with fake step outputs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..memory.block_allocator import BlockAllocator, block_keys
from .request import Request, RequestStatus, TokenLogprobs


class ScheduledRequest(NamedTuple):  # a NamedTuple: built per request per step, 3x cheaper than a frozen dataclass
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
    # Copy-on-write: whole-block copies (src, dst) to run before the forward, in order.
    block_copies: tuple[tuple[int, int], ...] = ()
    # Preemption by swapping, run first (before the copies and the forward, which may reuse the blocks
    # swapped out): (pool block, swap slot) to save, and (swap slot, pool block) to restore.
    swap_out: tuple[tuple[int, int], ...] = ()
    swap_in: tuple[tuple[int, int], ...] = ()

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
        prefix_cache_seed: names the model whose K/V the blocks hold; None turns prefix caching off.
        sliding_window: when every layer attends through a window of at most this many keys, blocks
            wholly before it are given back as sequences grow (None: keep every block).
        swap_blocks: slots of host swap space for preempted requests' blocks (0: preempt by recompute).
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
        prefix_cache_seed: Hashable | None = None,
        sliding_window: int | None = None,
        swap_blocks: int = 0,
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
        self.prefix_cache_seed = prefix_cache_seed
        self.sliding_window = sliding_window
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0  # tokens whose K/V a preemption threw away
        self.num_queried_tokens = 0  # tokens looked up in the prefix cache at admission
        self.num_cached_tokens = 0  # of those, tokens found (their K/V reused, not computed)
        self.num_forked_samples = 0
        self.num_swap_blocks = swap_blocks
        self.num_swapped_out_blocks = 0  # blocks copied to the swap space by preemptions
        self.num_swapped_in_blocks = 0  # blocks copied back on readmission
        self._swap_free = list(range(swap_blocks - 1, -1, -1))  # free swap slots (popped from the end)
        # request_id -> (swap slots holding its blocks in order, its leading block ids given back to
        # the sliding window: kept as they were, never read again)
        self._swapped: dict[int, tuple[list[int], list[int]]] = {}
        self._swap_out: list[tuple[int, int]] = []
        self._swap_in: list[tuple[int, int]] = []
        self._copies: list[tuple[int, int]] = []
        self._registered_batch: ScheduledBatch | None = None
        self._forks: dict[int, list[Request]] = {}  # request_id -> samples waiting to fork from it

    def add(self, request: Request, samples: Sequence[Request] = ()) -> None:
        """Queue ``request``; ``samples`` (other samples of its prompt) fork from it once its prompt is computed."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        if samples:
            assert all(s.token_ids == request.token_ids for s in samples), "samples fork from an equal prompt"
            for s in samples:
                s.status = RequestStatus.WAITING
            self._forks[request.request_id] = list(samples)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_swap_slots_used(self) -> int:
        return self.num_swap_blocks - len(self._swap_free)

    @property
    def num_waiting(self) -> int:
        """Sequences not running: queued (new or preempted) or waiting to fork from a running sample."""
        return len(self.waiting) + sum(len(samples) for samples in self._forks.values())

    # ---- schedule ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = False
        self._copies = []
        self._swap_out, self._swap_in = [], []
        in_flight: set[int] = set()  # prefix-cache keys of the full blocks this step computes

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
            if num_new > 1:  # a prompt chunk (a decode's block is rarely anyone's prefix)
                self._mark_in_flight(request, num_new, in_flight)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            i += 1

        # A preemption means the pool is tight: admitting new work now would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.request_id in self._swapped:
                num_new = min(request.num_tokens - request.num_computed_tokens, budget)
                if not self._swap_in_blocks(request, num_new):
                    break
                self.waiting.popleft()
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                continue
            looked_up = self._take_cached_prefix(request)
            if looked_up and self._next_block_in_flight(request, in_flight):
                # An earlier request computes this prompt's next block right now: admitting it now would
                # compute the block twice, admitting it next step finds it in the cache.
                self._drop_cached_prefix(request)
                break
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_slots(request, num_new):
                if looked_up:
                    self._drop_cached_prefix(request)
                break
            self._mark_in_flight(request, num_new, in_flight)
            if looked_up:
                self.num_queried_tokens += request.num_tokens
                self.num_cached_tokens += request.num_cached_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:  # queue time ends at the first admission
                request.first_scheduled_time = time.perf_counter()
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

        if not scheduled and not self.running and self._drop_waiting_blocks():
            return self.schedule()  # forked samples held the blocks the first of them needed
        if not scheduled and self.has_unfinished():
            raise RuntimeError(
                f"cannot schedule any request: {self.allocator.num_free}/{self.allocator.num_blocks} KV blocks "
                f"free, {len(self.waiting)} waiting, {len(self.running)} running"
            )
        assert not (self._swap_out and self._swap_in), "a step that preempts admits nobody"
        return ScheduledBatch(
            tuple(scheduled),
            self.max_num_batched_tokens - budget,
            tuple(self._copies),
            tuple(self._swap_out),
            tuple(self._swap_in),
        )

    def schedule_ahead(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The decode step that follows ``batch``, scheduled before ``batch``'s tokens are known (async
        scheduling: the engine launches it while the device still runs ``batch``), or None where only
        ``schedule()`` after ``update(batch)`` can decide the next step.

        Each request of ``batch`` is assumed to get its token and run on: the step computes that token
        (its id reaches the model from the device). Requests that will stop on length are left out, and
        so are those that ended since ``batch`` was queued; one that stops on an end token or a stop
        string is computed once more and dropped by ``update``. None when ``schedule()`` could decide otherwise: a request still in its prompt,
        samples about to fork, waiting requests that could be admitted, a block to copy, or a pool
        too full for the new blocks (which only ``schedule()`` may preempt for). Takes no decision
        that ``schedule()`` would undo: the same requests, in the same order, one token each.
        """
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        bs = self.block_size
        refs = self.allocator.ref_counts
        rows: list[ScheduledRequest] = []
        need: list[Request] = []
        for s in batch.requests:
            request = s.request
            if request.status is RequestStatus.FINISHED:  # stopped on a token, or aborted, since ``batch`` was queued
                continue
            if not s.samples or request.request_id in self._forks or request.status is not RequestStatus.RUNNING:
                return None
            # After ``batch`` it holds num_tokens + 1 tokens: it stops on length unless one more fits.
            num_tokens = request.num_tokens + 1
            if num_tokens - request.prompt_len >= request.params.max_new_tokens:
                continue
            if self.max_model_len is not None and num_tokens >= self.max_model_len:
                continue
            position = s.seq_len  # the token ``batch`` samples, computed by the step ahead
            block = position // bs
            if block < len(request.block_ids):
                if refs[request.block_ids[block]] != 1:
                    return None
            else:
                need.append(request)
            rows.append(ScheduledRequest(request, position, 1, True))
        if not rows:
            return None
        if need:
            blocks = self.allocator.allocate(len(need))
            if blocks is None:
                return None
            for request, block in zip(need, blocks):
                request.block_ids.append(block)
        return ScheduledBatch(tuple(rows), len(rows))

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        context_len = request.num_computed_tokens
        return ScheduledRequest(request, context_len, num_new, context_len + num_new == request.num_tokens)

    def _allocate_slots(self, request: Request, num_new: int) -> bool:
        """Give ``request`` private blocks for ``num_new`` more tokens; False (nothing taken) if the pool is full.

        Blocks it already holds but shares with another sequence are replaced by copies (recorded in
        ``self._copies``) before they are written.
        """
        bs = self.block_size
        first, end = request.num_computed_tokens // bs, -(-(request.num_computed_tokens + num_new) // bs)
        held = len(request.block_ids)
        refs = self.allocator.ref_counts
        if end - first == 1 and end <= held and refs[request.block_ids[first]] == 1:
            return True  # most decode steps: the token fits in the request's own, unshared last block
        shared = [i for i in range(first, min(end, held)) if refs[request.block_ids[i]] > 1]
        need = max(0, end - held)
        if not need and not shared:
            return True
        blocks = self.allocator.allocate(need + len(shared))
        if blocks is None:
            return False
        for i, dst in zip(shared, blocks[need:]):
            src = request.block_ids[i]
            self._copies.append((src, dst))
            self.allocator.free([src])
            request.block_ids[i] = dst
        request.block_ids.extend(blocks[:need])
        return True

    # ---- shared blocks -----------------------------------------------------------------------
    def _take_cached_prefix(self, request: Request) -> bool:
        """Point a request with nothing computed at the cached blocks of its longest cached prefix.

        At least its last token is left to compute: its logits sample the next token. Keys are
        computed only up to the first miss (the rest when the blocks are registered, while the GPU
        runs). Returns whether the cache was looked up (``_drop_cached_prefix`` undoes it).
        """
        if self.prefix_cache_seed is None or request.num_computed_tokens or request.block_ids:
            return False
        if request.prompt_logprobs is not None:  # every prompt position's logits are needed: compute them all
            return False
        keys, hits = request.block_keys, []
        for i in range((request.num_tokens - 1) // self.block_size):
            if i == len(keys):
                block_keys(request.token_ids, self.block_size, self.prefix_cache_seed, keys, i + 1)
            block = self.allocator.lookup(keys[i])
            if block is None:
                break
            hits.append(block)
        self.allocator.take_cached(hits)
        request.block_ids = hits
        request.num_registered_blocks = len(hits)
        request.num_computed_tokens = request.num_cached_tokens = len(hits) * self.block_size
        return True

    def _mark_in_flight(self, request: Request, num_new: int, in_flight: set[int]) -> None:
        """Note the first full block this chunk computes: a request that needs a block of this chunk
        next shares its whole prefix up to there, so it needs that first one (see _next_block_in_flight)."""
        if self.prefix_cache_seed is None:
            return
        first = request.num_computed_tokens // self.block_size
        if request.num_computed_tokens + num_new >= (first + 1) * self.block_size:
            if len(request.block_keys) <= first:
                block_keys(request.token_ids, self.block_size, self.prefix_cache_seed, request.block_keys, first + 1)
            in_flight.add(request.block_keys[first].chain)

    def _next_block_in_flight(self, request: Request, in_flight: set[int]) -> bool:
        i = request.num_computed_tokens // self.block_size
        return i < len(request.block_keys) and request.block_keys[i].chain in in_flight

    def _drop_cached_prefix(self, request: Request) -> None:
        self._free(request)
        request.num_computed_tokens = request.num_cached_tokens = 0

    def register_computed(self, batch: ScheduledBatch) -> None:
        """Index every full block ``batch`` computes, so later requests can reuse it.

        Needs only the scheduled tokens, not the sampled ones: the generator calls it right after
        launching the forward, so the hashing overlaps the GPU. A later step that reads these blocks
        runs after this one on the stream. ``update`` calls it too (a no-op the second time).
        """
        if self.prefix_cache_seed is None or batch is self._registered_batch:
            return
        self._registered_batch = batch
        bs = self.block_size
        for s in batch.requests:
            request = s.request
            if request.status is RequestStatus.FINISHED:  # ended while a step scheduled ahead ran
                continue
            full = s.seq_len // bs
            if full <= request.num_registered_blocks:
                continue
            if len(request.block_keys) < full:
                block_keys(request.token_ids, bs, self.prefix_cache_seed, request.block_keys, full)
            first = max(request.num_registered_blocks, request.num_released_blocks)
            self.allocator.register(request.block_ids[first:full], request.block_keys[first:full])
            request.num_registered_blocks = full

    def _fork(self, request: Request) -> None:
        """Start the samples waiting on ``request``: they share the blocks of all but its last prompt token."""
        samples = self._forks.pop(request.request_id, [])
        context = request.prompt_len - 1
        shared = request.block_ids[: -(-context // self.block_size)]
        released = min(request.num_released_blocks, len(shared))  # sliding window: already given back
        self.num_forked_samples += len(samples)
        for s in reversed(samples):
            self.allocator.share(shared[released:])
            s.block_ids = list(shared)
            s.num_released_blocks = released
            s.block_keys = request.block_keys[: context // self.block_size]
            s.num_registered_blocks = min(request.num_registered_blocks, context // self.block_size)
            s.num_computed_tokens = context
            s.num_cached_tokens = context
            self.waiting.appendleft(s)  # ahead of new prompts: its context is already paid for

    def _drop_waiting_blocks(self) -> bool:
        """Make waiting forked samples give their shared blocks back (to recompute later); True if any did."""
        holders = [r for r in self.waiting if r.block_ids]
        for request in holders:
            self._free(request)
            request.num_computed_tokens = 0
        return bool(holders)

    def _release_out_of_window(self, request: Request) -> None:
        """Give back leading blocks no future query can see through the sliding window."""
        # The next query is at position p >= num_computed_tokens and sees keys j > p - window.
        first_visible = request.num_computed_tokens - self.sliding_window + 1
        end = min(max(0, first_visible) // self.block_size, len(request.block_ids))
        if end > request.num_released_blocks:
            self.allocator.free(request.block_ids[request.num_released_blocks : end][::-1])
            request.num_released_blocks = end

    def _preempt(self, request: Request) -> None:
        """Move the request's K/V to the swap space if they fit, else drop them to be recomputed (prompt +
        generated tokens) when it is admitted again."""
        self.num_preemptions += 1
        if not self._swap_out_blocks(request):
            self._free(request)
            self.num_recomputed_tokens += request.num_computed_tokens
            request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _swap_out_blocks(self, request: Request) -> bool:
        """Record copies of the request's blocks into free swap slots and free the blocks; False (nothing
        done) without a swap space, or when they do not fit in it."""
        released = request.num_released_blocks
        blocks = request.block_ids[released:]
        if not blocks or len(blocks) > len(self._swap_free):
            return False
        slots = [self._swap_free.pop() for _ in blocks]
        self._swap_out.extend(zip(blocks, slots))
        self._swapped[request.request_id] = (slots, request.block_ids[:released])
        self.num_swapped_out_blocks += len(blocks)
        self.allocator.free(blocks[::-1])
        request.block_ids = []
        request.num_registered_blocks = 0  # re-registered (if not cached meanwhile) once swapped in
        return True

    def _swap_in_blocks(self, request: Request, num_new: int) -> bool:
        """Give a swapped-out request fresh blocks for its saved ones (recording the copies back) plus
        what its next ``num_new`` tokens need; False (nothing taken) if the pool cannot."""
        slots, released = self._swapped[request.request_id]
        bs = self.block_size
        end = -(-(request.num_computed_tokens + num_new) // bs)
        held = len(released) + len(slots)
        blocks = self.allocator.allocate(len(slots) + max(0, end - held))
        if blocks is None:
            return False
        del self._swapped[request.request_id]
        self._swap_in.extend(zip(slots, blocks))
        self._swap_free.extend(slots)  # read by this step's swap-in, before any later swap-out
        self.num_swapped_in_blocks += len(slots)
        request.block_ids = released + blocks
        return True

    def _free(self, request: Request) -> None:
        # Last block first: under LRU eviction a prefix's tail goes before its (more shared) head.
        self.allocator.free(request.block_ids[request.num_released_blocks :][::-1])
        request.block_ids = []
        request.num_registered_blocks = request.num_released_blocks = 0
        swapped = self._swapped.pop(request.request_id, None)
        if swapped is not None:  # aborted while swapped out
            self._swap_free.extend(swapped[0])

    # ---- update ------------------------------------------------------------------------------
    def update(
        self,
        batch: ScheduledBatch,
        sampled_token_ids: list[int],
        logprobs: list[TokenLogprobs | None] | None = None,
    ) -> list[Request]:
        """Apply a step's results; returns the requests that got a token (finished ones included).

        ``sampled_token_ids`` (and ``logprobs``) hold one entry per sampling request, in batch order.
        A request that finishes gives its blocks back at once. A request that ended (stop token, abort)
        after ``batch`` was scheduled ahead of its previous step's results is skipped, its token dropped.
        """
        now = time.perf_counter()
        advanced: list[Request] = []
        row = 0
        self.register_computed(batch)
        for s in batch.requests:
            request = s.request
            if request.status is RequestStatus.FINISHED:
                row += s.samples
                continue
            request.num_computed_tokens += s.num_scheduled_tokens
            if request.request_id in self._forks and request.num_computed_tokens >= request.prompt_len:
                self._fork(request)
            if self.sliding_window is not None:
                self._release_out_of_window(request)
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

    def abort(self, requests: Collection[Request]) -> None:
        """Remove ``requests`` (all samples of one prompt, between steps) wherever they are; free their blocks."""
        ids = {r.request_id for r in requests}
        for request in requests:
            self._forks.pop(request.request_id, None)
        for parent, samples in list(self._forks.items()):
            self._forks[parent] = [s for s in samples if s.request_id not in ids]
        self.running = [r for r in self.running if r.request_id not in ids]
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)
        for request in requests:
            self._free(request)
            request.status = RequestStatus.FINISHED

    def abort_all(self) -> None:
        """Free every block of every request (after an error or an interrupt) and forget them all."""
        for samples in self._forks.values():
            for request in samples:
                request.status = RequestStatus.FINISHED
        self._forks.clear()
        for request in self.running:
            self._free(request)
            request.status = RequestStatus.FINISHED
        for request in self.waiting:
            self._free(request)
            request.status = RequestStatus.FINISHED
        self.running = []
        self.waiting.clear()
