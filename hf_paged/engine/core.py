"""The engine core: one scheduler, one step function, and the one place that turns a step into events.

Every entry point drives this object; none has a step loop of its own beyond "call ``step()`` while
something is unfinished":

- ``ContinuousGenerator.generate/stream`` adds a list of requests and steps in the caller's thread;
- ``AsyncEngine`` adds and aborts requests from a background thread, between steps, for its whole life.

One step::

    batch = scheduler.schedule()                 # which tokens of which requests, within the budgets
    logits = runner.execute(batch)               # one packed forward over the paged KV pool
    out = sampler.sample(logits, ...)            # one token per sampling request, on the device
    advanced = scheduler.update(batch, out...)   # append, stop checks, free finished requests' blocks

Async scheduling (``async_scheduling=True``, the default): before waiting for a step's tokens, the core
schedules the decode step after it (``Scheduler.schedule_ahead``) and queues it on the device, its input
ids taken from the sampled ids still on the device. The host then reads back and applies step t while
the device already runs step t+1, so on a GPU the host's per-step work (update, stop checks, schedule,
metadata, launches) stays off the critical path. The price: a request that stops on an end token or a
stop string is computed for one more step, whose token is dropped. Each ``step()`` still applies exactly
one step, in order; the step scheduled ahead is applied by the next call.

The core owns the pool (allocated once), the runner, the sampler and the scheduler for its whole life;
cumulative counters (``counters``) and live numbers (``stats()``) are cheap enough to be always on.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..integration.enable import warn_if_training
from ..options import EngineOptions
from .distributed import make_pool_and_runner
from .inputs import (
    RequestLimits,
    check_model,
    check_request,
    check_tokenizer,
    eos_token_ids,
    sampling_params_from_generation_config,
)
from .model_runner import kv_layout_from_config, max_model_len
from .profile import StepProfile
from .request import IncrementalDetokenizer, Request, StreamEvent, TokenLogprobs
from .sampler import PendingSample, Sampler
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler


@dataclass(slots=True, eq=False)
class RequestGroup:
    """One user request: a prompt and its ``n`` samples (one ``Request`` each, sample 0 first)."""

    request_id: str  # the caller's id (AsyncEngine) or a generated one
    index: int  # position of the prompt in the caller's list (0 for the online engine)
    requests: list[Request]
    arrival_time: float  # time.perf_counter() when the caller submitted it
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.requests)


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """Timings of one finished user request (all its samples), as serving metrics export them."""

    request_id: str
    finish_reason: str  # sample 0's: "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_generation_tokens: int  # over all samples
    arrival_time: float  # time.perf_counter() at submission
    queue_time_s: float | None  # submission -> first scheduled (None: never scheduled)
    ttft_s: float | None  # submission -> first generated token (None: none was generated)
    e2e_s: float  # submission -> finish
    inter_token_latencies_s: list[float]  # gaps between sample 0's consecutive tokens


@dataclass(slots=True)
class EngineCounters:
    """Cumulative counters over the core's life (never reset; entry points diff them per run)."""

    steps: int = 0
    steps_scheduled_ahead: int = 0  # decode steps queued before the previous step's tokens were read back
    prompt_tokens: int = 0  # prompt tokens submitted (each of n samples counts)
    generated_tokens: int = 0
    requests_added: int = 0  # user requests
    finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> user requests


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine: live gauges and cumulative counters."""

    running: int  # sequences holding blocks and scheduled every step
    waiting: int  # sequences queued (new, preempted, or samples waiting to fork)
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int  # blocks holding a reusable prefix (owned or free-but-reusable)
    steps: int
    prompt_tokens: int
    generated_tokens: int
    preemptions: int
    recomputed_tokens: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    forked_samples: int
    finished: dict[str, int]  # finish_reason -> user requests finished
    swapped_out_blocks: int = 0  # blocks preemptions copied to the swap space (preemption_mode="swap")
    swapped_in_blocks: int = 0  # blocks copied back when their requests resumed
    steps_scheduled_ahead: int = 0  # of ``steps``, decode steps queued before the previous one's tokens were read

    @property
    def kv_usage(self) -> float:
        """Share of the pool's blocks in use (0..1); cached-but-free blocks count as free."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


@dataclass(frozen=True, slots=True)
class _PromptLogprobRows:
    rows: list[int]  # packed token indices
    targets: list[int]  # the prompt token each row's logits predict
    owners: list[Request]


@dataclass(frozen=True, slots=True, eq=False)
class _LaunchedStep:
    """A step queued on the device whose sampled tokens have not been applied yet."""

    batch: ScheduledBatch
    sampling: list[Request]  # the requests of the sampled rows, in row order
    sample: PendingSample | None  # None: no request samples this step


@dataclass(frozen=True, slots=True)
class StepResult:
    advanced: list[Request]  # requests that got a token this step, or were aborted / finished
    finished: list[RequestGroup]  # user requests whose last sample ended this step


class EngineCore:
    """Owns the pool, runner, sampler and scheduler of one model; steps them.

    Not thread-safe: one thread at a time calls its methods (the caller's for ``ContinuousGenerator``,
    the engine thread for ``AsyncEngine``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, options: EngineOptions) -> None:
        check_model(model)
        check_tokenizer(tokenizer)
        self.options = options
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        # PreTrainedModel.dtype / .device: the first floating-point parameter's, i.e. the activations'.
        dtype, device = getattr(model, "dtype", param.dtype), getattr(model, "device", param.device)
        self.device = torch.device(device)
        # A tensor-parallel model (rank 0) gets a runner that sends each step to the other ranks first.
        self.pool, self.runner = make_pool_and_runner(model, options, kv_layout_from_config(model, dtype, device))
        out_emb = model.get_output_embeddings()
        vocab = out_emb.weight.shape[0] if out_emb is not None else model.config.get_text_config().vocab_size
        self.num_embeddings = model.get_input_embeddings().weight.shape[0]
        self.max_model_len = max_model_len(model)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        # min_new_tokens holds these back (unless a request ignores EOS).
        self.sampler = Sampler(vocab, device, eos_token_ids=self.eos_token_ids)
        # Cached K/V are named by the model that computed them; the pool belongs to this core and model,
        # so the seed only has to change when the weights do (see check_weights_unchanged).
        self._prefix_seed = (type(model).__name__, id(model), str(dtype))
        self._weights_version = _weights_version(model)
        self.scheduler = Scheduler(
            self.pool.allocator,
            self.pool.block_size,
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            prefix_cache_seed=self._prefix_seed if options.prefix_caching else None,
            sliding_window=self.runner.cache.sliding_window,
            swap_blocks=self._num_swap_slots(options),
        )
        self.counters = EngineCounters()
        self.kv_blocks_peak = 0  # reset by whoever wants a per-run peak
        self.profile: StepProfile | None = None
        self._next_request_id = 0
        self._groups: dict[int, RequestGroup] = {}  # request_id of every unfinished sample -> its group
        self._num_prompt_logprobs = 0  # unfinished requests that want prompt logprobs (0: skip the search)
        # Async scheduling needs a runner that takes token ids from the device (not tensor parallelism).
        self._schedule_ahead = options.async_scheduling and getattr(self.runner, "takes_device_ids", False)
        self._ahead: _LaunchedStep | None = None  # the step scheduled ahead, queued on the device

    def _num_swap_slots(self, options: EngineOptions) -> int:
        """Swap slots for preemption by swapping (0: preempt by recompute); the pool allocated them (every
        tensor-parallel rank allocates the same, see ``distributed.make_pool_and_runner``)."""
        return self.pool.swap_kv.shape[0] if options.preemption_mode == "swap" else 0

    # ---- inputs ----------------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        """What a request without ``SamplingParams`` uses: the model's ``generation_config``, as ``generate`` does.

        ``do_sample=False`` (transformers' default) means greedy; with ``do_sample=True`` its temperature,
        top-k, top-p, min-p and repetition penalty apply; ``max_new_tokens`` and ``min_new_tokens`` too.
        Override single fields with ``dataclasses.replace(core.default_sampling_params(), ...)``.
        """
        return sampling_params_from_generation_config(getattr(self.model, "generation_config", None))

    def check(self, where: str, prompt: Any, params: Any) -> tuple[list[int], SamplingParams]:
        """Validate one prompt and its parameters; returns the token ids and a snapshot of the params.

        ``where`` names the request in error messages ("request 3", "request 'abc'").
        """
        return check_request(where, prompt, params, self.tokenizer, self.limits)

    @property
    def limits(self) -> RequestLimits:
        """What ``check`` checks against, as plain numbers (a front end in another process uses them)."""
        return RequestLimits(self.num_embeddings, self.max_model_len, self.pool.block_size, self.pool.num_blocks)

    def make_group(
        self, request_id: str, index: int, ids: list[int], params: SamplingParams, *, text: bool, arrival_time: float | None = None
    ) -> RequestGroup:
        """The ``n`` requests of one checked prompt. ``text``: keep an incremental detokenizer (stream text)."""
        now = time.perf_counter() if arrival_time is None else arrival_time
        base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        needs_text = self.tokenizer is not None and (text or bool(params.stop))
        requests = []
        for k in range(params.n):
            requests.append(
                Request(
                    request_id=self._next_request_id,
                    index=index,
                    sample=k,
                    prompt_len=len(ids),
                    token_ids=list(ids),
                    params=params,
                    seed=base_seed + k,
                    arrival_time=now,
                    logprobs=[] if params.logprobs is not None else None,
                    prompt_logprobs=[None] if params.prompt_logprobs is not None and k == 0 else None,
                    detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop) if needs_text else None,
                )
            )
            self._next_request_id += 1
        return RequestGroup(request_id, index, requests, now)

    def add(self, group: RequestGroup) -> None:
        """Queue a user request; it joins the next step. Samples 1.. fork from sample 0's prompt."""
        warn_if_training(self.model)
        first = group.requests[0]
        if first.prompt_logprobs is not None:
            self._num_prompt_logprobs += 1
        for r in group.requests:
            r.group = group
            self._groups[r.request_id] = group
        self.scheduler.add(first, group.requests[1:])
        self.counters.requests_added += 1
        self.counters.prompt_tokens += first.prompt_len * len(group.requests)
        self.prepare([group])

    def prepare(self, groups: Sequence[RequestGroup]) -> None:
        """Size the decode graphs for the longest of these requests (a recapture only when they outgrow
        the graphs): a caller that knows all its requests up front calls this once, before adding them."""
        cap = self.max_model_len or (1 << 30)
        longest = max((g.requests[0].prompt_len + g.requests[0].params.max_new_tokens for g in groups), default=0)
        if longest:
            self.runner.prepare(min(cap, longest))

    def check_weights_unchanged(self) -> None:
        """Cached K/V were computed by the weights of the time: drop them if the weights changed since.

        Call only while nothing is in flight (the blocks of running requests would be stale too).
        """
        version = _weights_version(self.model)
        if version != self._weights_version:
            self.pool.allocator.clear_cache()
            self._weights_version = version

    # ---- the step --------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> StepResult:
        """Apply one step (the one scheduled ahead by the previous call, else a new one); may queue the
        next one on the device first. Every exception propagates (the caller decides to abort)."""
        scheduler, profile = self.scheduler, self.profile
        with torch.inference_mode():
            t0 = time.perf_counter()
            launched, self._ahead = self._ahead, None
            if launched is not None and all(r.finished for r in launched.sampling):
                # Everything it computed ended meanwhile: nothing to apply. Still wait for it, so every
                # step queued is read back before its input buffers are reused (see cuda_graphs.py).
                launched.sample.result()
                launched = None
            if launched is None:
                launched = self._launch(scheduler.schedule())
            t1 = time.perf_counter()
            if self._schedule_ahead and launched.sample is not None:
                self._ahead = self._launch_ahead(launched)
            t2 = time.perf_counter()
            out = launched.sample.result() if launched.sample is not None else None  # waits for the device
            t3 = time.perf_counter()
            if out is not None:
                advanced = scheduler.update(launched.batch, out.token_ids, out.logprobs)
            else:
                advanced = scheduler.update(launched.batch, [])
            t4 = time.perf_counter()
            if profile:
                profile.add(launched.batch, t0, t1, t2, t3, t4)
        if scheduler.sliding_window is None:  # learnt from the first forward's attention calls
            scheduler.sliding_window = self.runner.cache.sliding_window
        self.counters.generated_tokens += len(advanced)
        finished: list[RequestGroup] = []
        for request in advanced:
            if request.sample == 0:
                if request.last_token_time is not None:
                    request.inter_token_latencies.append(t4 - request.last_token_time)
                request.last_token_time = t4
            if request.finished:
                self._finish(request, finished)
        return StepResult(advanced, finished)

    def _launch(self, batch: ScheduledBatch) -> _LaunchedStep:
        """Queue ``batch``'s forward and sampling on the device."""
        self._begin_step(ahead=False)
        wanted = self._prompt_logprob_rows(batch) if self._num_prompt_logprobs else None
        logits = self.runner.execute(batch, wanted.rows) if wanted else self.runner.execute(batch)
        self.scheduler.register_computed(batch)  # host work while the device runs the step
        sampling = [s.request for s in batch.sampling]
        if wanted:
            self._record_prompt_logprobs(logits[len(sampling) :], wanted)
            logits = logits[: len(sampling)]
        return self._queue_sampling(batch, sampling, logits, ahead=0)

    def _launch_ahead(self, launched: _LaunchedStep) -> _LaunchedStep | None:
        """Schedule and queue the decode step after ``launched`` before its tokens reach the host; None
        where the scheduler cannot decide it yet."""
        batch = self.scheduler.schedule_ahead(launched.batch)
        if batch is None:
            return None
        self._begin_step(ahead=True)
        ids = launched.sample.token_ids  # [rows of launched] on the device
        row_of = {r.request_id: i for i, r in enumerate(launched.sampling)}
        rows = [row_of[s.request.request_id] for s in batch.requests]
        if len(rows) != len(launched.sampling):  # some requests stop on length or ended: pick the others'
            index = torch.tensor(rows, dtype=torch.int64)
            ids = ids[index.pin_memory().to(ids.device, non_blocking=True) if ids.is_cuda else index]
        logits = self.runner.execute(batch, device_ids=ids)
        # Block keys need the tokens this step computes: ``update`` registers its blocks.
        return self._queue_sampling(batch, [s.request for s in batch.requests], logits, ahead=1)

    def _begin_step(self, ahead: bool) -> None:
        self.counters.steps += 1
        self.counters.steps_scheduled_ahead += ahead
        self.kv_blocks_peak = max(self.kv_blocks_peak, self.pool.allocator.num_used)
        if self.profile:
            self.profile.gpu_start()

    def _queue_sampling(self, batch: ScheduledBatch, sampling: list[Request], logits: torch.Tensor, ahead: int) -> _LaunchedStep:
        """``ahead``: tokens the requests gain (in steps still on the device) before these rows sample."""
        sample = self.sampler.sample_async(logits, self.sampler.prepare(sampling, ahead)) if sampling else None
        if self.profile:
            self.profile.gpu_end(batch)
        return _LaunchedStep(batch, sampling, sample)

    def _prompt_logprob_rows(self, batch) -> "_PromptLogprobRows | None":
        """Packed tokens of this step whose logits give prompt logprobs not recorded yet (position p
        predicts prompt token p + 1)."""
        rows, targets, owners = [], [], []
        start = 0
        for s in batch.requests:
            r = s.request
            if r.prompt_logprobs is not None:
                # Positions already recorded (before a preemption) are skipped.
                first = max(s.context_len, len(r.prompt_logprobs) - 1)
                for p in range(first, min(s.seq_len, r.prompt_len - 1)):
                    rows.append(start + p - s.context_len)
                    targets.append(r.token_ids[p + 1])
                    owners.append(r)
            start += s.num_scheduled_tokens
        return _PromptLogprobRows(rows, targets, owners) if rows else None

    def _record_prompt_logprobs(self, logits: torch.Tensor, wanted: "_PromptLogprobRows") -> None:
        """Log-softmax of the raw logits (no penalties, no temperature), the prompt token's value and the top k."""
        lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        targets = torch.tensor(wanted.targets, device=lp.device)
        chosen = lp.gather(-1, targets[:, None])[:, 0]
        k = min(max(r.params.prompt_logprobs for r in wanted.owners), lp.shape[-1])
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], targets[:, None][:, :0])
        host = torch.cat([chosen[:, None].double(), top_ids.double(), top_lp.double()], dim=1).tolist()
        for row, target, r in zip(host, wanted.targets, wanted.owners):
            want = r.params.prompt_logprobs
            top = tuple((int(row[1 + j]), row[1 + k + j]) for j in range(min(want, k)))
            r.prompt_logprobs.append(TokenLogprobs(target, row[0], top))

    def _finish(self, request: Request, finished: list[RequestGroup]) -> None:
        self.sampler.release(request)
        if request.prompt_logprobs is not None:
            self._num_prompt_logprobs -= 1
        group = self._groups.pop(request.request_id)
        group.num_finished += 1
        if group.finished:
            reason = group.requests[0].finish_reason
            self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1
            finished.append(group)

    def abort(self, group: RequestGroup) -> StepResult:
        """End every unfinished sample of ``group`` now ("abort"), freeing its blocks. Between steps only."""
        now = time.perf_counter()
        live = [r for r in group.requests if not r.finished]
        self.scheduler.abort(live)
        finished: list[RequestGroup] = []
        for r in live:
            r.finish_reason = "abort"
            r.finish_time = now
            self._finish(r, finished)
        return StepResult(live, finished)

    def abort_all(self, reason: str = "abort") -> list[RequestGroup]:
        """Free every block of every request (after an error or an interrupt); returns the groups ended."""
        now = time.perf_counter()
        groups = list({id(g): g for g in self._groups.values()}.values())
        self._ahead = None  # its requests end here; what it writes lands in freed blocks, before any reuse
        self.scheduler.abort_all()
        self.sampler.reset()
        for group in groups:
            for r in group.requests:
                if r.finish_reason is None:
                    r.finish_reason, r.finish_time = reason, now
            group.num_finished = len(group.requests)
            self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1
        self._groups.clear()
        self._num_prompt_logprobs = 0
        return groups

    def close(self) -> None:
        """Abort everything and give the pool's memory back; the core is unusable afterwards."""
        self.abort_all()
        self.runner.close()  # tensor parallel: also releases the other ranks
        self.pool.kv = torch.empty(0, device=self.pool.kv.device)
        self.pool.scales = None  # FP8 pools' per-token scales
        self.pool.swap_kv = self.pool.swap_scales = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- outputs ---------------------------------------------------------------------------------
    def event(self, request: Request) -> StreamEvent:
        """What ``request`` produced since its previous event (the one place steps become events)."""
        request_id, sample, new_ids, text, finish_reason, logprobs, prompt_logprobs = self.event_record(request)
        return StreamEvent(
            request.index,
            sample,
            new_ids,
            text,
            request.finished,
            finish_reason,
            request_id=request_id,
            logprobs=logprobs,
            num_prompt_tokens=request.prompt_len,
            prompt_logprobs=prompt_logprobs,
        )

    def event_record(self, request: Request) -> tuple:
        """``event``'s variable fields as a plain tuple, (request_id, sample, new token ids, new text or None,
        finish_reason or None, logprobs or None, prompt_logprobs or None): the online engine sends hundreds
        per step, to another process too, where tuples pickle ~10x faster than dataclasses."""
        start = request.num_streamed_tokens
        new_ids = request.token_ids[request.prompt_len + start :]
        request.num_streamed_tokens += len(new_ids)
        logprobs = request.logprobs[start:] if request.logprobs is not None else None
        text = None
        detok = request.detokenizer
        if detok is not None:
            end = detok.stable_text_len(request.finished)
            text = detok.text[request.num_streamed_chars : end]
            request.num_streamed_chars = max(end, request.num_streamed_chars)
        group = request.group
        prompt_logprobs = request.prompt_logprobs if start == 0 and request.prompt_logprobs is not None else None
        request_id = group.request_id if group is not None else None
        return (request_id, request.sample, new_ids, text, request.finish_reason, logprobs, prompt_logprobs)

    def text(self, request: Request) -> str | None:
        """The whole generated text of a finished request (None without a tokenizer)."""
        if request.detokenizer is not None:
            return request.detokenizer.text
        if self.tokenizer is not None:
            return self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        return None

    def metrics(self, group: RequestGroup) -> RequestMetrics:
        first = group.requests[0]
        token_times = [r.first_token_time for r in group.requests if r.first_token_time is not None]
        admitted = [r.first_scheduled_time for r in group.requests if r.first_scheduled_time is not None]
        finish = max((r.finish_time for r in group.requests if r.finish_time is not None), default=time.perf_counter())
        return RequestMetrics(
            request_id=group.request_id,
            finish_reason=first.finish_reason or "abort",
            num_prompt_tokens=first.prompt_len,
            num_generation_tokens=sum(r.num_output_tokens for r in group.requests),
            arrival_time=group.arrival_time,
            queue_time_s=min(admitted) - group.arrival_time if admitted else None,
            ttft_s=min(token_times) - group.arrival_time if token_times else None,
            e2e_s=finish - group.arrival_time,
            inter_token_latencies_s=list(first.inter_token_latencies),
        )

    def stats(self) -> EngineStats:
        s, c, a = self.scheduler, self.counters, self.pool.allocator
        return EngineStats(
            running=len(s.running),
            waiting=s.num_waiting,
            kv_blocks_used=a.num_used,
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_cached=a.num_cached,
            steps=c.steps,
            prompt_tokens=c.prompt_tokens,
            generated_tokens=c.generated_tokens,
            preemptions=s.num_preemptions,
            recomputed_tokens=s.num_recomputed_tokens,
            prefix_queried_tokens=s.num_queried_tokens,
            prefix_hit_tokens=s.num_cached_tokens,
            forked_samples=s.num_forked_samples,
            finished=dict(c.finished),
            swapped_out_blocks=s.num_swapped_out_blocks,
            swapped_in_blocks=s.num_swapped_in_blocks,
            steps_scheduled_ahead=c.steps_scheduled_ahead,
        )


def _weights_version(model: torch.nn.Module) -> int:
    """Changes whenever a parameter or buffer is modified in place (optimizer steps, load_state_dict)."""
    return sum(t._version for t in itertools.chain(model.parameters(), model.buffers()))
