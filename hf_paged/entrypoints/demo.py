"""The main job: stock ``generate`` vs ``enable()`` + ``generate`` vs ``ContinuousGenerator`` on one model,
checked and measured.

With no model path it builds the embedded default (a small random-weight Llama whose config ships in
the package), so it runs on a fresh machine with no downloads. Each system runs ``repeats`` times,
interleaved, and its best run is reported: one run on a busy machine can be off by several times.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import transformers

from ..engine.sampling_params import SamplingParams
from ..integration.enable import disable, enable


@dataclass(frozen=True, slots=True)
class DemoReport:
    model: str
    device: str
    dtype: str
    batch: int
    prompt_lens: list[int]
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
    def all_identical(self) -> bool:
        return self.rows_identical == self.continuous_identical == self.batch

    def render(self) -> str:
        def agree(n: int) -> str:
            return "yes" if n == self.batch else f"NO ({n}/{self.batch} rows)"

        def speed(name: str, tok_s: float) -> str:
            return f"{name:<28} {tok_s:8.1f} new tok/s  {tok_s / self.stock_tok_s:5.2f}x"

        return "\n".join(
            [
                f"model        {self.model} on {self.device} ({self.dtype})",
                f"workload     {self.batch} prompts of {min(self.prompt_lens)}..{max(self.prompt_lens)} tokens "
                f"(left-padded for generate), {self.new_tokens} new tokens each, greedy",
                f"tokens agree with stock generate: enable() + generate {agree(self.rows_identical)}, "
                f"ContinuousGenerator {agree(self.continuous_identical)}",
                f"speed (best of {self.repeats} interleaved runs each):",
                "  " + speed("stock generate", self.stock_tok_s),
                "  " + speed("enable() + generate", self.paged_tok_s),
                "  " + speed("ContinuousGenerator", self.continuous_tok_s),
                f"KV memory    {self.peak_kv_blocks} blocks x {self.block_size} tokens = "
                f"{self.paged_kv_bytes / 2**20:.2f} MiB at peak under enable(); a padded cache of the same batch holds "
                f"{self.padded_kv_bytes / 2**20:.2f} MiB ({self.paged_kv_bytes / self.padded_kv_bytes:.0%})",
                "(generate computes its batch's padding with or without enable(); ContinuousGenerator computes "
                "only the real tokens, in one packed batch)",
            ]
        )


def load_model(path: str | None, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    if path:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        name = path
    else:
        text = resources.files("hf_paged").joinpath("default_model/config.json").read_text()
        config = transformers.LlamaConfig.from_dict(json.loads(text))
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
        name = "embedded default (random-weight Llama, 4 layers, d 256)"
    model.to(device=device, dtype=dtype).eval()
    # Fixed-length runs: a random model may emit EOS at any point.
    model.generation_config.eos_token_id = None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return model, name


def random_batch(vocab: int, lengths: list[int], device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


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
) -> DemoReport:
    from .generator import ContinuousGenerator

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # float64 on CPU makes the token check exact; bf16 is what a GPU user runs.
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float64")
    model, name = load_model(model_path, device, getattr(torch, dtype))
    lengths = [int(x) for x in torch.linspace(8, 200, batch_size).round().tolist()]
    batch = random_batch(model.config.get_text_config().vocab_size, lengths, device)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = ContinuousGenerator(model, progress=False, block_size=block_size)
    # Warm-ups outside the timing: first-call allocations, lazy imports, kernel compiles.
    first = {k: v[:1] for k, v in batch.items()}
    model.generate(**first, max_new_tokens=2, do_sample=False)
    gen.generate(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True))
    enable(model, block_size=block_size)
    try:
        model.generate(**first, max_new_tokens=2, do_sample=False)
        best = {"stock": float("inf"), "paged": float("inf"), "continuous": float("inf")}
        for _ in range(repeats):
            disable(model)
            stock, seconds = _timed(lambda: model.generate(**batch, **kwargs), device)
            best["stock"] = min(best["stock"], seconds)
            gen.reset_prefix_cache()  # every run computes every prompt
            results, seconds = _timed(lambda: gen.generate(prompts, params), device)
            best["continuous"] = min(best["continuous"], seconds)
            enable(model, block_size=block_size)
            paged, seconds = _timed(lambda: model.generate(**batch, **kwargs), device)
            best["paged"] = min(best["paged"], seconds)
        pool = model._hf_paged_state.pool
        peak = pool.allocator.peak_used
        block_bytes = pool.layout.bytes_per_block(block_size)
        per_token = block_bytes // block_size
    finally:
        disable(model)
        gen.close()
    width = batch["input_ids"].shape[1]
    generated = batch_size * new_tokens
    return DemoReport(
        model=name,
        device=device,
        dtype=dtype,
        batch=batch_size,
        prompt_lens=lengths,
        new_tokens=new_tokens,
        repeats=repeats,
        rows_identical=int((stock == paged).all(dim=1).sum()),
        continuous_identical=sum(r.token_ids == stock[i, width:].tolist() for i, r in enumerate(results)),
        stock_tok_s=generated / best["stock"],
        paged_tok_s=generated / best["paged"],
        continuous_tok_s=generated / best["continuous"],
        peak_kv_blocks=peak,
        block_size=block_size,
        paged_kv_bytes=peak * block_bytes,
        padded_kv_bytes=batch_size * (max(lengths) + new_tokens) * per_token,
    )


def main_demo(args) -> int:
    if args.model and not Path(args.model).is_dir():
        raise SystemExit(f"--model must be a local model folder, got {args.model!r}")
    report = run_demo(args.model, args.device, args.dtype, args.batch_size, args.new_tokens, args.block_size)
    print(report.render())
    return 0 if report.all_identical or report.dtype != "float64" else 1
