"""``ContinuousGenerator``: offline continuous batching for an ordinary transformers causal LM.

    gen = ContinuousGenerator(model, tokenizer)
    results = gen.generate(["Hello", "The capital of France is"], SamplingParams(max_new_tokens=32))
    for event in gen.stream(prompts): ...
    results = gen.chat([[{"role": "user", "content": "Hi"}]])

It drives the engine core (``hf_paged.engine.core``) in the caller's thread: add every request, then
``step()`` until none is unfinished. Every exception surfaces after every KV block is freed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..engine.core import EngineCore, RequestGroup
from ..engine.gc_freeze import objects_before_frozen
from ..engine.profile import StepProfile
from ..engine.request import GenerationResult, Request, SampleResult, StreamEvent
from ..engine.sampling_params import SamplingParams
from ..options import EngineOptions

# The options are the engine's; the old name stays importable.
GeneratorOptions = EngineOptions


@dataclass(slots=True)
class GeneratorStats:
    """Counters of the latest ``generate``/``stream`` run (reset when the next one starts)."""

    steps: int = 0  # forward steps
    steps_scheduled_ahead: int = 0  # of those, decode steps queued before the previous step's tokens were read
    preemptions: int = 0  # requests preempted (their K/V dropped to be recomputed, or swapped out)
    recomputed_tokens: int = 0  # tokens whose K/V preemption threw away
    swapped_out_blocks: int = 0  # blocks preemption copied to host memory (preemption_mode="swap")
    swapped_in_blocks: int = 0  # blocks copied back when their requests resumed
    prompt_tokens: int = 0  # prompt tokens submitted (each of n samples counts)
    generated_tokens: int = 0  # tokens sampled
    kv_blocks_used: int = 0  # blocks in use now
    kv_blocks_peak: int = 0  # most blocks in use after any step's scheduling
    kv_blocks_total: int = 0  # blocks in the pool
    kv_blocks_cached: int = 0  # blocks holding a cached prefix now (owned or free-but-reusable)
    prefix_queried_tokens: int = 0  # tokens of admitted requests looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, tokens whose K/V came from the cache instead of being computed
    forked_samples: int = 0  # samples (n > 1) that shared their prompt's blocks instead of computing it
    profile: StepProfile | None = None  # per-stage times when the generator was built with profile=True

    @property
    def prefix_hit_rate(self) -> float:
        """Share of looked-up tokens found in the prefix cache (0 when caching is off or nothing was looked up)."""
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


class ContinuousGenerator:
    """Generates for many prompts at once with continuous batching over a paged KV pool.

    Args:
        model: a transformers causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS``
            (Llama, Mistral, Qwen, Gemma, Phi, GPT-NeoX, GPT-2, OPT, ...), in eval mode.
        tokenizer: needed for string prompts, stop strings and text outputs.
        block_size: tokens per KV block (a multiple of 16).
        num_blocks: KV pool size in blocks; None sizes it from ``memory_fraction`` (CUDA: of the free
            memory now) or ``cpu_memory_bytes`` (other devices).
        max_num_seqs: most requests running at once (512: bigger decode batches amortise the weights;
            +12% over 256 on the H200's 1B workload, see benchmarks/RESULTS.md; the pool still bounds it).
        max_num_batched_tokens: most tokens in one forward step (prompts are chunked to fit).
        backend: attention backend, "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        progress: show a tqdm bar over finished sequences.
        cuda_graphs: capture decode steps as CUDA graphs, one per batch-size bucket (CUDA + Triton only).
        prefix_caching: reuse the K/V of every full block of a prompt's longest prefix computed before
            (by this call or an earlier one; kept while the pool has room, least recently used evicted
            first). The cache is cleared by itself when the model's weights change in place.
        fuse_elementwise: run the model's RMSNorm and MLP modules through ``torch.compile`` during
            paged steps, fusing HF's elementwise kernels (CUDA only; compiles once per module class).
        profile: record where each step's time goes (``stats.profile``); costs a little host time.
        kv_cache_dtype: "auto" keeps K/V in the model's dtype; "fp8" stores them as float8 e4m3 with a
            float32 scale per token and KV head (about 1.9x the tokens in the same memory; logprobs move
            by a few hundredths), dequantized inside the attention kernels.
        preemption_mode: what happens to a request preempted when the pool is full: "recompute" (its
            K/V are dropped and recomputed when it resumes) or "swap" (its blocks are copied to host
            memory and back; a request that does not fit in the swap space is recomputed).
        swap_space_gb: host memory (GiB; pinned on CUDA) for swapped-out blocks, allocated in "swap"
            mode only.
        compile: "off" (eager), "decode" or "all": those steps run ``torch.compile`` of the model's
            decoder layers, with the paged attention as one opaque op, so the norms, RoPE, residual
            adds and MLP activations between attention calls fuse; decode CUDA graphs capture the
            compiled forward. The first steps compile (about 10 s for an 8B model; one graph serves
            every layer, batch size and prompt length). "auto" (the default): "all" on one CUDA GPU
            for Llama, Mistral, Qwen2/3, Gemma2, Phi-3, GPT-2 and GPT-NeoX models, "off" elsewhere
            (CPU, other architectures, tensor parallelism). If compiling fails, the generator warns
            and runs eagerly.
        async_scheduling: queue each decode step on the device before the previous step's tokens are
            read back, so the host's per-step work (stop checks, scheduling, launches) overlaps the
            device instead of leaving it idle; a request that stops on an end token or stop string
            costs one extra computed token, which is dropped. Outputs are the same either way.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 512,
        max_num_batched_tokens: int = 8192,
        memory_fraction: float = 0.9,
        cpu_memory_bytes: int = 1 << 30,
        backend: str = "auto",
        progress: bool = True,
        cuda_graphs: bool = True,
        prefix_caching: bool = True,
        fuse_elementwise: bool = False,
        profile: bool = False,
        kv_cache_dtype: str = "auto",
        preemption_mode: str = "recompute",
        swap_space_gb: float = 4.0,
        compile: str = "auto",
        async_scheduling: bool = True,
    ) -> None:
        self.options = EngineOptions(
            block_size=block_size,
            num_blocks=num_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            memory_fraction=memory_fraction,
            cpu_memory_bytes=cpu_memory_bytes,
            backend=backend,
            progress=progress,
            cuda_graphs=cuda_graphs,
            prefix_caching=prefix_caching,
            fuse_elementwise=fuse_elementwise,
            profile=profile,
            kv_cache_dtype=kv_cache_dtype,
            preemption_mode=preemption_mode,
            swap_space_gb=swap_space_gb,
            compile=compile,
            async_scheduling=async_scheduling,
        )
        self.core = EngineCore(model, tokenizer, self.options)
        self.model = model
        self.tokenizer = tokenizer
        self._stats = GeneratorStats(kv_blocks_total=self.pool.num_blocks)
        self._base = self.core.stats()
        # A non-blocking acquire makes "is a run in progress?" and "start one" one atomic step.
        self._busy = threading.Lock()
        self._closed = False

    @property
    def pool(self):
        return self.core.pool

    @property
    def runner(self):
        return self.core.runner

    @property
    def stats(self) -> GeneratorStats:
        """Counters of the latest ``generate``/``stream`` run (the current one while it runs)."""
        now, base = self.core.stats(), self._base
        return replace(
            self._stats,
            steps=now.steps - base.steps,
            steps_scheduled_ahead=now.steps_scheduled_ahead - base.steps_scheduled_ahead,
            preemptions=now.preemptions - base.preemptions,
            recomputed_tokens=now.recomputed_tokens - base.recomputed_tokens,
            swapped_out_blocks=now.swapped_out_blocks - base.swapped_out_blocks,
            swapped_in_blocks=now.swapped_in_blocks - base.swapped_in_blocks,
            generated_tokens=now.generated_tokens - base.generated_tokens,
            prefix_queried_tokens=now.prefix_queried_tokens - base.prefix_queried_tokens,
            prefix_hit_tokens=now.prefix_hit_tokens - base.prefix_hit_tokens,
            forked_samples=now.forked_samples - base.forked_samples,
            kv_blocks_used=now.kv_blocks_used,
            kv_blocks_peak=self.core.kv_blocks_peak,
            kv_blocks_cached=now.kv_blocks_cached,
        )

    def default_sampling_params(self) -> SamplingParams:
        """The parameters used when ``sampling_params`` is None: the model's ``generation_config``
        (``do_sample=False``, transformers' default, means greedy). Override fields with
        ``dataclasses.replace(gen.default_sampling_params(), max_new_tokens=64)``."""
        return self.core.default_sampling_params()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the next requests compute their prompts in full)."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("cannot reset the prefix cache while a generate()/stream() runs")
        try:
            self.pool.allocator.clear_cache()
        finally:
            self._busy.release()

    def close(self) -> None:
        """Free the KV pool (and, for a tensor-parallel model, release the other ranks' ``run_worker``).
        Idempotent; the generator cannot run afterwards. Also ``with ContinuousGenerator(...) as gen:``."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("cannot close a ContinuousGenerator while a generate()/stream() runs")
        try:
            if not self._closed:
                self._closed = True
                self.core.close()
        finally:
            self._busy.release()

    def __enter__(self) -> "ContinuousGenerator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- public API ------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Any], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[GenerationResult]:
        """Generate for every prompt; results in input order. Every input is validated before any work.

        A prompt is a string, a list of token ids, or what a tokenizer / ``apply_chat_template`` returns
        for one sequence (a dict or ``BatchEncoding`` with ``input_ids``).
        """
        groups = self._make_groups(prompts, sampling_params, text=False)
        with contextlib.closing(self._run(groups)) as steps:
            for _ in steps:
                pass
        return [self._result(g) for g in groups]

    def stream(
        self, prompts: Sequence[Any], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[StreamEvent]:
        """Like ``generate``, but yields a ``StreamEvent`` per sample as each token is produced.

        Inputs are validated now, generation runs as the iterator is consumed. Leaving the iteration
        early stops generation and frees every block.
        """
        groups = self._make_groups(prompts, sampling_params, text=True)
        return self._stream(groups)

    def chat(
        self,
        conversations: Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **template_kwargs: Any,
    ) -> list[GenerationResult]:
        """``generate`` on conversations rendered by the tokenizer's chat template (generation prompt added).

        ``conversations``: a list of conversations, each a list of ``{"role": ..., "content": ...}``
        messages (a single conversation is accepted too). ``template_kwargs`` go to
        ``tokenizer.apply_chat_template`` (e.g. ``tools=...``).
        """
        if self.tokenizer is None or not callable(getattr(self.tokenizer, "apply_chat_template", None)):
            raise ValueError("chat() needs a tokenizer with apply_chat_template")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [render_chat(self.tokenizer, conv, f"conversation {i}", **template_kwargs) for i, conv in enumerate(conversations)]
        return self.generate(prompts, sampling_params)

    # ---- the loop --------------------------------------------------------------------------------
    def _stream(self, groups: list[RequestGroup]) -> Iterator[StreamEvent]:
        with contextlib.closing(self._run(groups)) as steps:
            for advanced in steps:
                for request in advanced:
                    yield self.core.event(request)

    def _run(self, groups: list[RequestGroup]) -> Iterator[list[Request]]:
        """Step until every request finishes, yielding the requests that got a token each step."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this ContinuousGenerator is already running a generate()/stream(); finish it first")
        if self._closed:
            self._busy.release()
            raise RuntimeError("this ContinuousGenerator is closed")
        try:
            core = self.core
            core.check_weights_unchanged()
            self._base = core.stats()
            core.kv_blocks_peak = 0
            self._stats = GeneratorStats(
                prompt_tokens=sum(r.prompt_len for g in groups for r in g.requests), kv_blocks_total=self.pool.num_blocks
            )
            profile = self._stats.profile = core.profile = StepProfile(core.device) if self.options.profile else None
            bar = _progress_bar(sum(len(g.requests) for g in groups), self.options.progress)
            try:
                with objects_before_frozen():  # no collector pauses that walk the model's objects
                    core.prepare(groups)  # one graph capture for the whole run, not one per longer request
                    for group in groups:
                        core.add(group)
                    while core.has_unfinished():
                        advanced = core.step().advanced
                        bar.update(sum(1 for r in advanced if r.finished))
                        yield advanced
            except BaseException:
                # KeyboardInterrupt, an error in a forward, or the consumer of stream() leaving early.
                core.abort_all()
                raise
            finally:
                if profile:
                    profile.finish()
                core.profile = None
                bar.close()
        finally:
            self._busy.release()

    # ---- inputs ----------------------------------------------------------------------------------
    def _make_groups(self, prompts: Any, sampling_params: Any, *, text: bool) -> list[RequestGroup]:
        """Validate every prompt and parameter set, then build the requests (n per prompt)."""
        if isinstance(prompts, (str, bytes, dict)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
        if sampling_params is None:
            params_list = [self.core.default_sampling_params()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (str, bytes, dict)) or not isinstance(sampling_params, Sequence):
            raise TypeError(
                f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}"
            )
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts; pass one or one per prompt")
        with objects_before_frozen():
            checked = [self.core.check(f"request {i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params_list))]
            return [self.core.make_group(f"gen-{i}", i, ids, params, text=text) for i, (ids, params) in enumerate(checked)]

    # ---- outputs ---------------------------------------------------------------------------------
    def _result(self, group: RequestGroup) -> GenerationResult:
        samples = [SampleResult(r.output_token_ids, self.core.text(r), r.finish_reason, r.logprobs) for r in group.requests]
        first = samples[0]
        return GenerationResult(
            index=group.index,
            prompt_token_ids=group.requests[0].prompt_token_ids,
            token_ids=first.token_ids,
            text=first.text,
            finish_reason=first.finish_reason,
            samples=samples,
            logprobs=first.logprobs,
            ttft_s=min(r.first_token_time for r in group.requests) - group.arrival_time,
            latency_s=max(r.finish_time for r in group.requests) - group.arrival_time,
            prompt_logprobs=group.requests[0].prompt_logprobs,
        )


def render_chat(tokenizer: Any, conversation: Any, where: str, **template_kwargs: Any) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, with the generation prompt."""
    if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
        raise TypeError(f"{where}: a conversation is a list of {{'role': ..., 'content': ...}} dicts, got {conversation!r:.80}")
    template_kwargs.setdefault("add_generation_prompt", True)
    out = tokenizer.apply_chat_template(list(conversation), tokenize=True, **template_kwargs)
    # transformers 5 returns a BatchEncoding; older versions a list of ids.
    ids = out["input_ids"] if not isinstance(out, list) else out
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="seq", desc="hf_paged")
