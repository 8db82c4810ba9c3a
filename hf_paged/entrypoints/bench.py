"""End-to-end throughput comparison: ContinuousGenerator vs HF static ``generate`` vs HF ``generate_batch``.

Every system runs the same random-weight model and the same workload (random token prompts with
lengths drawn from U[min_len, max_len], greedy, EOS ignored, exactly ``new_tokens`` generated per
request) in one process, so the numbers are side by side. Used by ``hf-paged bench`` and by the
pytest-benchmark suite in ``benchmarks/``.

torch and transformers are imported inside the functions that use them, so the command line can read
``SHAPES`` and ``SYSTEMS`` to check its arguments without loading either.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Random-weight Llama shapes: Llama-3.2-1B and Llama-3.1-8B (same layer sizes, random weights, so no
# download is needed), plus a CPU-sized one.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=2048, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
SYSTEMS = ("continuous", "hf_static", "hf_generate_batch", "enable_generate")
MAX_POSITIONS = 8192  # max_position_embeddings of the random-weight shapes


@dataclass(frozen=True, slots=True)
class Workload:
    num_prompts: int
    min_len: int
    max_len: int
    new_tokens: int
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        lens = torch.randint(self.min_len, self.max_len + 1, (self.num_prompts,), generator=g).tolist()
        return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lens]


@dataclass(slots=True)
class BenchResult:
    system: str
    output_tokens: int
    prompt_tokens: int
    wall_s: float
    peak_mem_gib: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    tpot_p50_s: float | None = None
    tpot_p99_s: float | None = None
    kv_blocks_peak: int | None = None
    kv_blocks_total: int | None = None
    preemptions: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def out_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.output_tokens + self.prompt_tokens) / self.wall_s

    def as_dict(self) -> dict:
        return {**asdict(self), "out_tok_s": self.out_tok_s, "total_tok_s": self.total_tok_s}


def build_model(shape_or_path: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    import torch
    import transformers

    if shape_or_path in SHAPES:
        config = transformers.LlamaConfig(**SHAPES[shape_or_path], max_position_embeddings=MAX_POSITIONS)
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: half the memory and init time
        try:
            with torch.device(device):
                model = transformers.LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(shape_or_path, dtype=dtype).to(device)
    model.eval()
    model.generation_config.eos_token_id = None  # every request generates exactly new_tokens
    model.generation_config.pad_token_id = 0
    return model


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# A GPU that idled (model loading, a warm-up, the previous system's teardown) may take 1-2 s to come back
# to full speed: on one H200 machine the 3-s ContinuousGenerator run of the 1B shape measured 27.7k out
# tok/s right after its warm-up and 46.6k after 5 s of matmuls (benchmarks/gpu_clock_ramp.py; another
# machine showed no ramp). Every system's timed run starts from a busy GPU.
CLOCK_WARMUP_S = 5.0


def ready_for_timing(device: str, seconds: float = CLOCK_WARMUP_S) -> None:
    """Synchronize; on CUDA first keep the GPU busy with matmuls for ``seconds`` (full clocks for the timing)."""
    import torch

    if device.startswith("cuda") and seconds > 0:
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(50):
                a @ a
            torch.cuda.synchronize()
        del a
    _sync(device)


def _measure(device: str, fn: Callable[[], BenchResult]) -> BenchResult:
    import torch

    # The previous system's KV pool must be gone: HF generate_batch sizes its cache from free memory.
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = fn()
    if device.startswith("cuda"):
        result.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    return result


def left_padded(prompts: list[list[int]], device: str) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` of the prompts left padded with id 0 (for stock ``generate``)."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def run_static_generate(model, prompts, new_tokens, batch_size, device, system="hf_static") -> BenchResult:
    """Stock ``generate`` on left-padded batches of ``batch_size`` prompts in arrival order."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(**left_padded(prompts[:2], device), max_new_tokens=2, do_sample=False)  # warm-up
    ready_for_timing(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        model.generate(**left_padded(prompts[i : i + batch_size], device), **kwargs)
    _sync(device)
    wall = time.perf_counter() - start
    return BenchResult(system, len(prompts) * new_tokens, sum(map(len, prompts)), wall, extra={"batch_size": batch_size})


def run_enable_generate(model, prompts, new_tokens, batch_size, device) -> BenchResult:
    from ..integration.enable import disable, enable

    enable(model)
    try:
        result = run_static_generate(model, prompts, new_tokens, batch_size, device, system="enable_generate")
        allocator = model._hf_paged_state.pool.allocator
        result.kv_blocks_peak, result.kv_blocks_total = allocator.peak_used, allocator.num_blocks
    finally:
        disable(model)
    return result


def run_hf_generate_batch(model, prompts, new_tokens, device) -> BenchResult:
    """transformers' own continuous batching with its defaults (one small warm-up call first)."""
    import transformers

    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    model.generate_batch(inputs=prompts[:2], generation_config=config, progress_bar=False)
    ready_for_timing(device)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    _sync(device)
    wall = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in outputs.values())
    return BenchResult("hf_generate_batch", produced, sum(map(len, prompts)), wall)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def warm_up_generator(gen, prompts: list[list[int]], new_tokens: int) -> None:
    """What a timed ``ContinuousGenerator`` run needs first (vLLM does both at startup): a representative
    slice of the prompts (Triton compiles its shape specialisations, compiled layers compile), then every
    decode graph captured at the width the run needs. Empties the prefix cache after."""
    from ..engine.sampling_params import SamplingParams

    gen.generate(prompts[:64], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    gen.reset_prefix_cache()  # the timed run must not find the warm-up's prompts
    gen.runner.prepare(max(map(len, prompts)) + new_tokens)
    gen.runner.capture_graphs()  # every bucket now (on every rank under tensor parallelism), not mid-run


def run_continuous(model, prompts, new_tokens, device, sampling=None, **options) -> BenchResult:
    """ContinuousGenerator on ``prompts`` (greedy, exactly ``new_tokens`` each unless ``sampling`` says otherwise)."""
    from .generator import ContinuousGenerator
    from ..engine.sampling_params import SamplingParams

    params = sampling or SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = ContinuousGenerator(model, progress=False, **options)
    warm_up_generator(gen, prompts, max(p.max_new_tokens for p in (params if isinstance(params, list) else [params])))
    ready_for_timing(device)
    start = time.perf_counter()
    results = gen.generate(prompts, params)
    _sync(device)
    wall = time.perf_counter() - start
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    tpot = [
        (r.latency_s - r.ttft_s) / (len(r.token_ids) - 1)
        for r in results
        if r.ttft_s is not None and r.latency_s is not None and len(r.token_ids) > 1
    ]
    stats = gen.stats
    return BenchResult(
        "continuous",
        sum(len(s.token_ids) for r in results for s in r.samples),
        sum(map(len, prompts)),
        wall,
        ttft_p50_s=statistics.median(ttft) if ttft else None,
        ttft_p99_s=_pct(ttft, 0.99),
        tpot_p50_s=statistics.median(tpot) if tpot else None,
        tpot_p99_s=_pct(tpot, 0.99),
        kv_blocks_peak=stats.kv_blocks_peak,
        kv_blocks_total=stats.kv_blocks_total,
        preemptions=stats.preemptions,
        extra={**options, "profile": stats.profile.render() if stats.profile else None,
               "graph_capture_s": gen.runner.graphs.capture_seconds if gen.runner.graphs else 0.0,
               "prefix_hit_rate": stats.prefix_hit_rate, "forked_samples": stats.forked_samples},
    )


# ---- shared-block workloads ---------------------------------------------------------------------


def shared_prefix_prompts(num_prompts: int, prefix_len: int, unique_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """One system prompt of ``prefix_len`` random tokens followed by ``unique_len`` tokens per request."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab_size, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(3, vocab_size, (unique_len,), generator=g).tolist() for _ in range(num_prompts)]


def run_sharing_suite(model, device, *, num_shared=256, prefix_len=1024, unique_len=64, shared_new=128,
                      workload: Workload, num_parallel=64, n=8, parallel_new=256, repeats=3, **options) -> list[BenchResult]:
    """The three measurements of shared blocks, each on vs off in one process.

    (a) ``num_shared`` requests sharing a ``prefix_len``-token system prompt, prefix caching on vs off;
    (b) ``n`` samples of each of ``num_parallel`` prompts (``SamplingParams(n=n)``, prompt computed once
        and shared) vs ``n`` independent seeded requests per prompt with no sharing at all;
    (c) ``workload`` (no prompt shares a full block with another: 0% hits), prefix caching on vs off,
        ``repeats`` interleaved pairs after one warm-up run.
    """
    from ..engine.sampling_params import SamplingParams

    vocab = model.config.vocab_size
    out: list[BenchResult] = []

    def add(label, fn):
        r = _measure(device, fn)
        r.system = label
        out.append(r)

    shared = shared_prefix_prompts(num_shared, prefix_len, unique_len, vocab)
    for on in (False, True):
        add(f"a:prefix {'on' if on else 'off'}", lambda: run_continuous(model, shared, shared_new, device, prefix_caching=on, **options))

    prompts = Workload(num_parallel, workload.min_len, workload.max_len, parallel_new, seed=1).prompts(vocab)
    sample = dict(max_new_tokens=parallel_new, temperature=1.0, top_p=0.95, ignore_eos=True)
    add(f"b:n={n}", lambda: run_continuous(model, prompts, parallel_new, device,
                                           sampling=SamplingParams(n=n, seed=0, **sample), prefix_caching=False, **options))
    repeated = [p for p in prompts for _ in range(n)]
    seeds = [SamplingParams(seed=k, **sample) for _ in prompts for k in range(n)]
    add(f"b:{n} separate", lambda: run_continuous(model, repeated, parallel_new, device,
                                                  sampling=seeds, prefix_caching=False, **options))

    zero_hit = workload.prompts(vocab)
    runs = [("c:warm-up (off)", False)] + [(f"c:prefix {'on' if on else 'off'}", on) for _ in range(repeats) for on in (True, False)]
    for label, on in runs:  # a first run settles clocks and kernel caches; then interleaved pairs
        add(label, lambda: run_continuous(model, zero_hit, workload.new_tokens, device, prefix_caching=on, **options))
    return out


def mean_out_tok_s(results: list[BenchResult], system: str) -> float:
    values = [r.out_tok_s for r in results if r.system == system]
    return sum(values) / len(values)


def render_table(results: list[BenchResult], extra: tuple[str, ...] = ()) -> str:
    """One line per result; ``extra`` names ``BenchResult.extra`` entries to add as columns."""

    def fmt(x, scale=1.0, digits=1):
        return "-" if x is None else f"{x * scale:.{digits}f}"

    head = f"{'system':<18} {'out tok/s':>10} {'total tok/s':>11} {'wall s':>8} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>16} {'peak GiB':>9} {'KV blocks':>14} {'preempt':>7}"
    head += "".join(f" {name:>16}" for name in extra)
    lines = [head, "-" * len(head)]
    for r in results:
        blocks = "-" if r.kv_blocks_peak is None else f"{r.kv_blocks_peak}/{r.kv_blocks_total}"
        line = (
            f"{r.system:<18} {r.out_tok_s:>10.1f} {r.total_tok_s:>11.1f} {r.wall_s:>8.2f} "
            f"{fmt(r.ttft_p50_s, 1e3):>8}/{fmt(r.ttft_p99_s, 1e3):<8} {fmt(r.tpot_p50_s, 1e3, 2):>7}/{fmt(r.tpot_p99_s, 1e3, 2):<8} "
            f"{fmt(r.peak_mem_gib, 1, 1):>9} {blocks:>14} {fmt(r.preemptions, 1, 0):>7}"
        )
        for name in extra:
            value = r.extra.get(name)
            line += f" {value:>16.3g}" if isinstance(value, float) else f" {str(value):>16}"
        lines.append(line)
    return "\n".join(lines)


def run_all(model, workload: Workload, systems, device, hf_batch_size, cg_options) -> list[BenchResult]:
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {SYSTEMS}")
    prompts = workload.prompts(model.config.vocab_size)
    runners = {
        "continuous": lambda: run_continuous(model, prompts, workload.new_tokens, device, **cg_options),
        "hf_static": lambda: run_static_generate(model, prompts, workload.new_tokens, hf_batch_size, device),
        "hf_generate_batch": lambda: run_hf_generate_batch(model, prompts, workload.new_tokens, device),
        "enable_generate": lambda: run_enable_generate(model, prompts, workload.new_tokens, hf_batch_size, device),
    }
    return [_measure(device, runners[s]) for s in systems]


def main_bench(args) -> int:
    """``hf-paged bench``: ``args`` as parsed and checked by ``hf_paged.entrypoints.cli``."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model = build_model(args.model, device, dtype)
    workload = Workload(args.num_prompts, args.min_len, args.max_len, args.new_tokens)
    cg_options = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "cuda_graphs": not args.no_cuda_graphs,
        "prefix_caching": not args.no_prefix_caching,
        "fuse_elementwise": args.fuse_elementwise,
        "profile": args.profile,
        "compile": args.compile,
        "async_scheduling": not args.no_async_scheduling,
    }
    results = run_all(model, workload, args.systems.split(","), device, args.hf_batch_size, cg_options)
    print(f"model {args.model} ({dtype}) on {device}; {workload}")
    for r in results:
        if r.extra.get("profile"):
            print(f"{r.system} profile (CUDA graph capture {r.extra['graph_capture_s']:.1f} s, not in the timing):")
            print(r.extra["profile"])
    print(render_table(results))
    if args.plot:
        sweep = sweep_concurrency(model, workload, device, cg_options)
        plot_throughput(sweep, results, workload, args.hf_batch_size, args.plot, title=f"{args.model} on {device}")
        print(f"wrote {args.plot}")
    return 0


def concurrency_levels(num_prompts: int, max_num_seqs: int, span: int = 16) -> list[int]:
    """``max_num_seqs`` values worth measuring: powers of two from ``reach / span`` up to ``reach``.

    ``reach = min(num_prompts, max_num_seqs)``: more concurrency than requests cannot happen, so the
    sweep stops there (and includes it).
    """
    reach = min(num_prompts, max_num_seqs)
    return sorted({2**k for k in range(reach.bit_length()) if reach <= span * 2**k < span * reach} | {reach})


def sweep_concurrency(model, workload: Workload, device: str, cg_options: dict) -> list[BenchResult]:
    """ContinuousGenerator on ``workload`` at each of ``concurrency_levels``; ``extra["max_num_seqs"]`` says which."""
    prompts = workload.prompts(model.config.vocab_size)
    out = []
    for level in concurrency_levels(workload.num_prompts, cg_options.get("max_num_seqs", 512)):
        options = {**cg_options, "max_num_seqs": level}
        # _measure: the previous level's pool must be freed first, or this one is sized from what is left.
        r = _measure(device, lambda: run_continuous(model, prompts, workload.new_tokens, device, **options))
        print(f"max_num_seqs {level:>4}: {r.out_tok_s:,.0f} out tok/s")
        out.append(r)
    return out


# Where each system's concurrency comes from: its batch size, or (generate_batch) its own scheduler.
_BATCHED = ("hf_static", "enable_generate")


def plot_throughput(sweep: list[BenchResult], results: list[BenchResult], workload: Workload, hf_batch_size: int,
                    path: str, title: str = ""):
    """PNG of output tok/s against concurrency: the ContinuousGenerator sweep as a line, and every system
    of the main run (``results``) at its own concurrency; the y axis starts at 0. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ticks = {r.extra["max_num_seqs"] for r in sweep}
    if sweep:
        xs = [r.extra["max_num_seqs"] for r in sweep]
        ax.plot(xs, [r.out_tok_s for r in sweep], marker="o", label="continuous (max_num_seqs sweep)")
    for r in results:
        if r.system == "continuous":
            x = min(workload.num_prompts, r.extra.get("max_num_seqs", workload.num_prompts))
            ticks.add(x)
            ax.plot([x], [r.out_tok_s], marker="*", markersize=12, linestyle="none", label="continuous (main run)")
        elif r.system in _BATCHED:
            x = min(workload.num_prompts, hf_batch_size)
            ticks.add(x)
            ax.plot([x], [r.out_tok_s], marker="s", linestyle="none", label=f"{r.system} (batch size {x})")
        else:  # generate_batch picks its own concurrency: a level line
            ax.axhline(r.out_tok_s, linestyle="--", color="gray", label=f"{r.system} (own scheduler)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{title + ', ' if title else ''}{workload.num_prompts} prompts of {workload.min_len}..{workload.max_len} "
                 f"tokens, {workload.new_tokens} new", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
