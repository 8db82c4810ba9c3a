"""The main job: stock ``generate`` vs ``enable()`` + ``generate`` vs ``ContinuousGenerator`` on one model,
checked and measured.

With no model path it builds the embedded default (a small random-weight Llama whose config ships in
the package), so it runs on a fresh machine with no downloads. The workload is a set of prompts larger
than one batch, as in any offline job: ``generate`` (stock, and with ``enable()``) takes them in
left-padded batches of ``batch_size``, ``ContinuousGenerator`` takes them all at once. Each system runs
``repeats`` times, interleaved, and its best run is reported: one run on a busy machine can be off by
several times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from ..engine.model_spec import default_model
from ..engine.sampling_params import SamplingParams
from ..integration.enable import disable, enable
from .bench import left_padded


@dataclass(frozen=True, slots=True)
class DemoReport:
    model: str
    device: str
    dtype: str
    batch: int  # prompts per generate call
    prompt_lens: list[int]  # every prompt's length, in the order the batches take them
    new_tokens: int
    repeats: int
    rows_identical: int  # enable() + generate rows equal to stock generate's
    continuous_identical: int  # ContinuousGenerator requests equal to stock generate's rows
    stock_tok_s: float
    paged_tok_s: float
    continuous_tok_s: float
    peak_kv_blocks: int
    block_size: int
    paged_kv_bytes: int
    padded_kv_bytes: int

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_lens)

    @property
    def all_identical(self) -> bool:
        return self.rows_identical == self.continuous_identical == self.num_prompts

    def render(self) -> str:
        def agree(n: int) -> str:
            return "yes" if n == self.num_prompts else f"NO ({n}/{self.num_prompts} prompts)"

        def speed(name: str, tok_s: float) -> str:
            return f"{name:<28} {tok_s:8.1f} new tok/s  {tok_s / self.stock_tok_s:5.2f}x"

        return "\n".join(
            [
                f"model        {self.model} on {self.device} ({self.dtype})",
                f"workload     {self.num_prompts} prompts of {min(self.prompt_lens)}..{max(self.prompt_lens)} tokens, "
                f"{self.new_tokens} new tokens each, greedy; generate runs them in left-padded batches of {self.batch}, "
                "ContinuousGenerator all at once",
                "             (earlier versions of this demo ran a single batch: one generate call is not what "
                "batching serves)",
                f"tokens agree with stock generate: enable() + generate {agree(self.rows_identical)}, "
                f"ContinuousGenerator {agree(self.continuous_identical)}",
                f"speed (best of {self.repeats} interleaved runs each):",
                "  " + speed("stock generate", self.stock_tok_s),
                "  " + speed("enable() + generate", self.paged_tok_s),
                "  " + speed("ContinuousGenerator", self.continuous_tok_s),
                f"KV memory    {self.peak_kv_blocks} blocks x {self.block_size} tokens = "
                f"{self.paged_kv_bytes / 2**20:.2f} MiB at peak under enable(); a padded cache of the largest batch "
                f"holds {self.padded_kv_bytes / 2**20:.2f} MiB ({self.paged_kv_bytes / self.padded_kv_bytes:.0%})",
                "(generate computes each batch's padding with or without enable(), so enable() + generate runs at "
                "about stock speed and saves memory; ContinuousGenerator computes only real tokens, and new "
                "requests join the running batch instead of waiting for the next generate call)",
            ]
        )


def load_model(path: str | None, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    if path:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        name = path
    else:
        model = default_model(device, dtype)
        name = "embedded default (random-weight Llama, 4 layers, d 256)"
    model.to(device=device, dtype=dtype).eval()
    # Fixed-length runs: a random model may emit EOS at any point.
    model.generation_config.eos_token_id = None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return model, name


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """One random token list per length (ids >= 3: clear of the usual pad / BOS / EOS ids)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def run_demo(
    model_path: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 8,
    new_tokens: int = 32,
    block_size: int = 16,
    repeats: int = 3,
    num_batches: int = 4,
) -> DemoReport:
    from .generator import ContinuousGenerator

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # float64 on CPU makes the token check exact; bf16 is what a GPU user runs.
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float64")
    model, name = load_model(model_path, device, getattr(torch, dtype))
    # Lengths 8..200 in a shuffled (fixed) order, as a dataset comes: every batch mixes short and long prompts.
    num_prompts = batch_size * num_batches
    lengths = torch.linspace(8, 200, num_prompts).round().long()
    lengths = lengths[torch.randperm(num_prompts, generator=torch.Generator().manual_seed(0))].tolist()
    prompts = random_prompts(model.config.get_text_config().vocab_size, lengths)
    batches = [left_padded(prompts[i : i + batch_size], device) for i in range(0, num_prompts, batch_size)]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def run_generate() -> list[list[int]]:
        outs = []
        for batch in batches:
            out = model.generate(**batch, **kwargs)
            outs += out[:, batch["input_ids"].shape[1] :].tolist()
        return outs

    gen = ContinuousGenerator(model, progress=False, block_size=block_size)
    # Warm-ups outside the timing: first-call allocations, lazy imports, kernel compiles.
    first = left_padded(prompts[:1], device)
    model.generate(**first, max_new_tokens=2, do_sample=False)
    gen.generate(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True))
    enable(model, block_size=block_size)
    try:
        model.generate(**first, max_new_tokens=2, do_sample=False)
        best = {"stock": float("inf"), "paged": float("inf"), "continuous": float("inf")}
        for _ in range(repeats):
            disable(model)
            stock, seconds = _timed(run_generate, device)
            best["stock"] = min(best["stock"], seconds)
            gen.reset_prefix_cache()  # every run computes every prompt
            results, seconds = _timed(lambda: gen.generate(prompts, params), device)
            best["continuous"] = min(best["continuous"], seconds)
            enable(model, block_size=block_size)
            paged, seconds = _timed(run_generate, device)
            best["paged"] = min(best["paged"], seconds)
        pool = model._hf_paged_state.pool
        peak = pool.allocator.peak_used
        block_bytes = pool.layout.bytes_per_block(block_size)
        per_token = block_bytes // block_size
    finally:
        disable(model)
        gen.close()
    generated = num_prompts * new_tokens
    padded_tokens = max(b["input_ids"].numel() + b["input_ids"].shape[0] * new_tokens for b in batches)
    return DemoReport(
        model=name,
        device=device,
        dtype=dtype,
        batch=batch_size,
        prompt_lens=lengths,
        new_tokens=new_tokens,
        repeats=repeats,
        rows_identical=sum(a == b for a, b in zip(stock, paged)),
        continuous_identical=sum(r.token_ids == row for r, row in zip(results, stock)),
        stock_tok_s=generated / best["stock"],
        paged_tok_s=generated / best["paged"],
        continuous_tok_s=generated / best["continuous"],
        peak_kv_blocks=peak,
        block_size=block_size,
        paged_kv_bytes=peak * block_bytes,
        padded_kv_bytes=padded_tokens * per_token,
    )


def main_demo(args) -> int:
    if args.model and not Path(args.model).is_dir():
        raise SystemExit(f"--model must be a local model folder, got {args.model!r}")
    report = run_demo(args.model, args.device, args.dtype, args.batch_size, args.new_tokens, args.block_size)
    print(report.render())
    return 0 if report.all_identical or report.dtype != "float64" else 1
