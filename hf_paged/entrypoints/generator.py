"""``ContinuousGenerator``: continuous batching for an ordinary transformers causal LM.

    gen = ContinuousGenerator(model, tokenizer)
    results = gen.generate(["Hello", "The capital of France is"], SamplingParams(max_new_tokens=32))
    for event in gen.stream(prompts): ...

The step loop is synchronous and lets every exception surface (after freeing every KV block)::

    batch = scheduler.schedule()                  # which tokens of which requests, within the budgets
    logits = runner.execute(batch)                # one packed forward over the paged KV pool
    out = sampler.sample(logits, sampler.prepare(batch.sampling requests))
    scheduler.update(batch, out.token_ids, ...)   # append, check stops, free finished requests' blocks

The generator only wires these together; it owns the pool (created once) and the per-run statistics.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..integration.enable import uses_attention_interface
from ..memory.kv_pool import KVPool
from ..engine.model_runner import ModelRunner, kv_layout_from_config, max_model_len
from ..options import BACKENDS, PoolOptions, pool_options_of
from ..engine.request import GenerationResult, IncrementalDetokenizer, Request, SampleResult, StreamEvent
from ..engine.sampler import Sampler
from ..engine.profile import StepProfile
from ..engine.sampling_params import SamplingParams
from ..engine.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class GeneratorOptions:
    """Options of ``ContinuousGenerator``; see its docstring."""

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 8192
    memory_fraction: float = 0.9
    cpu_memory_bytes: int = 1 << 30
    backend: str = "auto"
    progress: bool = True
    cuda_graphs: bool = True  # replay captured graphs for decode steps (CUDA + Triton only)
    prefix_caching: bool = True  # reuse the K/V of full blocks of earlier prompts (and keep them after use)
    fuse_elementwise: bool = False  # torch.compile the model's RMSNorm / MLP modules for paged steps (CUDA only)
    profile: bool = False  # time each stage of each step (adds CUDA events; see StepProfile)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("progress", "cuda_graphs", "prefix_caching", "fuse_elementwise", "profile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.pool()  # validates the pool fields

    def pool(self) -> PoolOptions:
        return pool_options_of(self)


@dataclass(slots=True)
class GeneratorStats:
    """Counters of the latest ``generate``/``stream`` run (reset when the next one starts)."""

    steps: int = 0  # forward steps
    preemptions: int = 0  # requests preempted (their K/V dropped, to be recomputed)
    recomputed_tokens: int = 0  # tokens whose K/V preemption threw away
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
    ) -> None:
        self.options = GeneratorOptions(
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
        )
        if not uses_attention_interface(model):
            raise NotImplementedError(
                f"{type(model).__name__} hard-codes its attention, so it cannot run packed continuous batches; "
                "use hf_paged.enable(model) and model.generate(...) instead (paged KV memory, dense attention)"
            )
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        # PreTrainedModel.dtype / .device: the first floating-point parameter's, i.e. the activations'.
        dtype, device = getattr(model, "dtype", param.dtype), getattr(model, "device", param.device)
        self.pool = KVPool.create(self.options.pool(), kv_layout_from_config(model, dtype, device))
        self.runner = ModelRunner(
            model,
            self.pool,
            self.options.backend,
            cuda_graphs=self.options.cuda_graphs,
            max_num_seqs=self.options.max_num_seqs,
            fuse_elementwise=self.options.fuse_elementwise,
        )
        out_emb = model.get_output_embeddings()
        vocab = out_emb.weight.shape[0] if out_emb is not None else model.config.get_text_config().vocab_size
        self.sampler = Sampler(vocab, device)
        self.num_embeddings = model.get_input_embeddings().weight.shape[0]
        self.max_model_len = max_model_len(model)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self._stats = GeneratorStats(kv_blocks_total=self.pool.num_blocks)
        # Cached K/V are named by the model that computed them; the pool belongs to this generator and
        # model, so the seed only has to change when the weights do (see _check_weights_unchanged).
        self._prefix_seed = (type(model).__name__, id(model), str(dtype))
        self._weights_version = _weights_version(model)
        self._busy = False
        self._next_request_id = 0

    @property
    def stats(self) -> GeneratorStats:
        allocator = self.pool.allocator
        return replace(self._stats, kv_blocks_used=allocator.num_used, kv_blocks_cached=allocator.num_cached)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the next requests compute their prompts in full)."""
        if self._busy:
            raise RuntimeError("cannot reset the prefix cache while a generate()/stream() runs")
        self.pool.allocator.clear_cache()

    # ---- public API ------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str | Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[GenerationResult]:
        """Generate for every prompt; results in input order. Every input is validated before any work."""
        requests = self._make_requests(prompts, sampling_params, streaming=False)
        with contextlib.closing(self._run(requests)) as steps:
            for _ in steps:
                pass
        return self._results(requests, len(prompts))

    def stream(
        self, prompts: Sequence[str | Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[StreamEvent]:
        """Like ``generate``, but yields a ``StreamEvent`` per sample as each token is produced.

        Inputs are validated now, generation runs as the iterator is consumed. Leaving the iteration
        early stops generation and frees every block.
        """
        requests = self._make_requests(prompts, sampling_params, streaming=True)
        return self._stream(requests)

    # ---- the loop --------------------------------------------------------------------------------
    def _stream(self, requests: list[Request]) -> Iterator[StreamEvent]:
        with contextlib.closing(self._run(requests)) as steps:
            for advanced in steps:
                for request in advanced:
                    yield self._event(request)

    def _run(self, requests: list[Request]) -> Iterator[list[Request]]:
        """Step until every request finishes, yielding the requests that got a token each step."""
        if self._busy:
            raise RuntimeError("this ContinuousGenerator is already running a generate()/stream(); finish it first")
        self._busy = True
        opts = self.options
        scheduler = Scheduler(
            self.pool.allocator,
            self.pool.block_size,
            max_num_seqs=opts.max_num_seqs,
            max_num_batched_tokens=opts.max_num_batched_tokens,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            prefix_cache_seed=self._prefix_seed if opts.prefix_caching else None,
            sliding_window=self.runner.cache.sliding_window,
        )
        self._check_weights_unchanged()
        stats = self._stats = GeneratorStats(
            prompt_tokens=sum(r.prompt_len for r in requests), kv_blocks_total=self.pool.num_blocks
        )
        first = 0
        while first < len(requests):  # created in (prompt, sample) order; samples 1.. fork from sample 0
            n = requests[first].params.n
            scheduler.add(requests[first], requests[first + 1 : first + n])
            first += n
        self.runner.prepare(max(r.prompt_len + r.params.max_new_tokens for r in requests))
        profile = stats.profile = StepProfile(self.pool.layout.device) if opts.profile else None
        bar = _progress_bar(len(requests), opts.progress)
        try:
            while scheduler.has_unfinished():
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    batch = scheduler.schedule()
                    stats.steps += 1
                    stats.kv_blocks_peak = max(stats.kv_blocks_peak, self.pool.allocator.num_used)
                    t1 = time.perf_counter()
                    if profile:
                        profile.gpu_start()
                    logits = self.runner.execute(batch)
                    scheduler.register_computed(batch)  # host work while the GPU runs the step
                    t2 = time.perf_counter()
                    sampling = [s.request for s in batch.sampling]
                    if sampling:
                        out = self.sampler.sample(logits, self.sampler.prepare(sampling))
                        t3 = time.perf_counter()
                        advanced = scheduler.update(batch, out.token_ids, out.logprobs)
                    else:
                        t3 = time.perf_counter()
                        advanced = scheduler.update(batch, [])
                    if profile:
                        profile.add(batch, t0, t1, t2, t3, time.perf_counter())
                if scheduler.sliding_window is None:  # learnt from the first forward's attention calls
                    scheduler.sliding_window = self.runner.cache.sliding_window
                stats.generated_tokens += len(advanced)
                stats.preemptions = scheduler.num_preemptions
                stats.recomputed_tokens = scheduler.num_recomputed_tokens
                stats.prefix_queried_tokens = scheduler.num_queried_tokens
                stats.prefix_hit_tokens = scheduler.num_cached_tokens
                stats.forked_samples = scheduler.num_forked_samples
                for request in advanced:
                    if request.finished:
                        self.sampler.release(request)
                        bar.update(1)
                yield advanced
        except BaseException:
            # KeyboardInterrupt, an error in a forward, or the consumer of stream() leaving early.
            scheduler.abort_all()
            raise
        finally:
            if profile:
                profile.finish()
            self.sampler.reset()
            bar.close()
            self._busy = False

    def _check_weights_unchanged(self) -> None:
        """Cached K/V were computed by the weights of the time: drop them if the weights changed since."""
        version = _weights_version(self.model)
        if version != self._weights_version:
            self.pool.allocator.clear_cache()
            self._weights_version = version

    # ---- inputs ----------------------------------------------------------------------------------
    def _make_requests(self, prompts: Any, sampling_params: Any, *, streaming: bool) -> list[Request]:
        """Validate every prompt and parameter set, then build the requests (n per prompt)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts; pass one or one per prompt")

        checked = [self._check(i, prompt, params) for i, (prompt, params) in enumerate(zip(prompts, params_list))]

        requests = []
        now = time.perf_counter()
        for i, (ids, params) in enumerate(checked):
            base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
            for k in range(params.n):
                needs_text = self.tokenizer is not None and (streaming or bool(params.stop))
                requests.append(
                    Request(
                        request_id=self._next_request_id,
                        index=i,
                        sample=k,
                        prompt_len=len(ids),
                        token_ids=list(ids),
                        params=params,
                        seed=base_seed + k,
                        arrival_time=now,
                        logprobs=[] if params.logprobs is not None else None,
                        detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop) if needs_text else None,
                    )
                )
                self._next_request_id += 1
        return requests

    def _check(self, i: int, prompt: Any, params: Any) -> tuple[list[int], SamplingParams]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {i}: sampling_params must be a SamplingParams, got {type(params).__name__}")
        try:
            params.validate()
        except ValueError as e:
            raise ValueError(f"request {i}: {e}") from None
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {i}: stop strings {params.stop!r} need a tokenizer")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"request {i}: prompt is a string but the generator has no tokenizer; pass token ids")
            ids = list(self.tokenizer(prompt).input_ids)
        elif isinstance(prompt, (Sequence, torch.Tensor)):
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            bad = next((t for t in ids if not _is_token_id(t, self.num_embeddings)), None)
            if bad is not None:
                raise ValueError(f"request {i}: prompt token id {bad!r} is not an int in [0, {self.num_embeddings})")
            ids = [int(t) for t in ids]  # numpy ints -> int
        else:
            raise ValueError(f"request {i}: a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"request {i}: the prompt is empty")
        if self.max_model_len is not None and len(ids) > self.max_model_len:
            raise ValueError(f"request {i}: the prompt has {len(ids)} tokens, more than the model's context ({self.max_model_len})")
        bs = self.pool.block_size
        need = -(-(len(ids) + params.max_new_tokens) // bs)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"request {i}: prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) needs {need} KV "
                f"blocks of {bs} tokens, but the pool holds {self.pool.num_blocks}; raise num_blocks or lower max_new_tokens"
            )
        return ids, replace(params)  # a snapshot: later edits by the caller do not reach running requests

    # ---- outputs ---------------------------------------------------------------------------------
    def _text(self, request: Request) -> str | None:
        if request.detokenizer is not None:
            return request.detokenizer.text
        if self.tokenizer is not None:
            return self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        return None

    def _results(self, requests: list[Request], num_prompts: int) -> list[GenerationResult]:
        by_prompt: list[list[Request]] = [[] for _ in range(num_prompts)]
        for request in requests:  # created in (prompt, sample) order
            by_prompt[request.index].append(request)
        results = []
        for i, group in enumerate(by_prompt):
            samples = [SampleResult(r.output_token_ids, self._text(r), r.finish_reason, r.logprobs) for r in group]
            first = samples[0]
            arrival = group[0].arrival_time
            results.append(
                GenerationResult(
                    index=i,
                    prompt_token_ids=group[0].prompt_token_ids,
                    token_ids=first.token_ids,
                    text=first.text,
                    finish_reason=first.finish_reason,
                    samples=samples,
                    logprobs=first.logprobs,
                    ttft_s=min(r.first_token_time for r in group) - arrival,
                    latency_s=max(r.finish_time for r in group) - arrival,
                )
            )
        return results

    def _event(self, request: Request) -> StreamEvent:
        new_ids = request.token_ids[request.prompt_len + request.num_streamed_tokens :]
        request.num_streamed_tokens += len(new_ids)
        text = None
        detok = request.detokenizer
        if detok is not None:
            end = detok.stable_text_len(request.finished)
            text = detok.text[request.num_streamed_chars : end]
            request.num_streamed_chars = max(end, request.num_streamed_chars)
        return StreamEvent(request.index, request.sample, new_ids, text, request.finished, request.finish_reason)


def _weights_version(model: torch.nn.Module) -> int:
    """Changes whenever a parameter or buffer is modified in place (optimizer steps, load_state_dict)."""
    return sum(t._version for t in itertools.chain(model.parameters(), model.buffers()))


def _eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: the generation config's (int or list), else the tokenizer's."""
    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _is_token_id(t: Any, vocab: int) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="seq", desc="hf_paged")
