"""Memory-limited serving on one GPU: FP8 KV cache, FP8 weights, and preemption by swapping.

Usage (repo root, on a CUDA GPU with FP8 support: Ada, Hopper or newer; the package need not be installed)::

    PYTHONPATH=. python benchmarks/gpu_memory_limited.py --out memory_limited.json

Everything runs on the random-weight Llama-3.1-8B shape (``hf_paged.entrypoints.bench.build_model``), greedy,
EOS ignored, and fits in about six minutes on an H200. Sections (each skipped with ``--skip NAME``):

* ``kv``: the KV pool limited to ``--pool-gib`` GiB, bf16 K/V against FP8 K/V: blocks that fit, the most
  and the mean number of sequences running at once, preemptions, output tokens per second.
* ``kernel``: decode attention alone (32 q / 8 KV heads, head_dim 128, block 16) on bf16 and on FP8
  caches: median time and bytes read per second (FP8 reads 1 byte per element plus a 4-byte scale per
  token and KV head), as ``benchmarks/gpu_kernels.py`` measures it.
* ``weights``: bf16 weights against FP8 e4m3 weights loaded through transformers' own quantization
  config, ``TorchAoConfig`` with torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``
  (one scale per output channel, activations quantized per token at run time, ``torch._scaled_mm``;
  ``--fp8-weights weight-only`` picks ``Float8WeightOnlyConfig`` instead), loaded by ``from_pretrained``
  from the bf16 weights: weight memory, throughput on the same roomy pool, and how far the greedy tokens
  of the two models agree (random weights have near-ties everywhere, so this understates a trained model's
  agreement). ``FineGrainedFP8Config`` is not used: transformers fetches its matmul from the Hugging Face
  ``kernels`` package at load time, which needs a download.
* ``swap``: a pool too small for the batch (``--swap-pool-gib``): ``preemption_mode="recompute"``
  against ``"swap"`` (``--swap-space-gb`` of pinned host memory): throughput, preemptions, recomputed
  tokens, blocks swapped out and in.

The last thing printed is a short table of every row; ``--out`` also writes the rows as JSON.
``--model tiny --device cpu`` runs the same code on a small model without a GPU (a smoke test; there the
FP8 weights are weight-only).

FP8 weights need torchao (0.18 for torch 2.11); with a wheel and no network:
``pip install -q --no-index --no-deps --target /tmp/ao torchao-*.whl`` and ``PYTHONPATH=/tmp/ao:.``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_paged import ContinuousGenerator, SamplingParams  # noqa: E402  (after the sys.path insert)
from hf_paged.entrypoints.bench import SHAPES, Workload, build_model  # noqa: E402
from hf_paged.memory.kv_pool import KVLayout  # noqa: E402

SECTIONS = ("kv", "kernel", "weights", "swap")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def pool_blocks(model, gib: float, kv_cache_dtype: str, block_size: int = 16) -> int:
    """Blocks of ``kv_cache_dtype`` K/V that fit in ``gib`` GiB for this model (the pool's own sizing rule)."""
    config = model.config
    layout = KVLayout(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, model.dtype,
                      torch.device("cpu"))
    return max(1, int(gib * 2**30) // layout.bytes_per_block(block_size, kv_cache_dtype))


def run(model, prompts, new_tokens, device, label, keep_tokens=False, **options) -> dict:
    """One timed ContinuousGenerator run after a warm-up; counts the sequences running after every step."""
    gen = ContinuousGenerator(model, progress=False, **options)
    warm = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    gen.generate(prompts[: min(32, len(prompts))], warm)  # Triton compiles, first graphs
    gen.reset_prefix_cache()
    gen.runner.prepare(max(map(len, prompts)) + new_tokens)
    if gen.runner.graphs is not None:
        gen.runner.graphs.capture_all()
    running: list[int] = []
    core_step = gen.core.step

    def counted_step():
        result = core_step()
        running.append(len(gen.core.scheduler.running))
        return result

    gen.core.step = counted_step  # instance attribute: the generator's loop calls it
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    results = gen.generate(prompts, params)
    sync(device)
    wall = time.perf_counter() - start
    stats = gen.stats
    out_tokens = sum(len(r.token_ids) for r in results)
    row = dict(
        section=label.split(":")[0], label=label, out_tok_s=out_tokens / wall, wall_s=wall, out_tokens=out_tokens,
        kv_blocks=stats.kv_blocks_total, kv_gib=gen.pool.nbytes / 2**30, peak_running=max(running, default=0),
        mean_running=sum(running) / max(1, len(running)), steps=stats.steps, preemptions=stats.preemptions,
        recomputed_tokens=stats.recomputed_tokens, swapped_out_blocks=stats.swapped_out_blocks,
        swapped_in_blocks=stats.swapped_in_blocks, options={k: v for k, v in options.items()},
    )
    if keep_tokens:
        row["tokens"] = [list(r.token_ids) for r in results]
    print(f"  {label:28s} {row['out_tok_s']:9.0f} out tok/s  {wall:6.1f} s  blocks {row['kv_blocks']:6d} "
          f"({row['kv_gib']:.2f} GiB)  running peak {row['peak_running']:4d} mean {row['mean_running']:6.1f}  "
          f"preempt {row['preemptions']:4d} recomputed {row['recomputed_tokens']:7d} "
          f"swap out/in {row['swapped_out_blocks']}/{row['swapped_in_blocks']}", flush=True)
    gen.core.close()
    del gen
    free_memory(device)
    return row


def section_kv(model, args, rows):
    print(f"[kv] pool limited to {args.pool_gib} GiB: bf16 K/V vs FP8 K/V", flush=True)
    prompts = Workload(args.num_prompts, args.min_len, args.max_len, args.new_tokens, seed=0).prompts(model.config.vocab_size)
    for kv in ("auto", "fp8"):
        rows.append(run(model, prompts, args.new_tokens, args.device, f"kv:{'bf16' if kv == 'auto' else 'fp8'} KV",
                        num_blocks=pool_blocks(model, args.pool_gib, kv), kv_cache_dtype=kv,
                        max_num_seqs=args.max_num_seqs))


def section_swap(model, args, rows):
    print(f"[swap] pool of {args.swap_pool_gib} GiB, too small for the batch: recompute vs swap", flush=True)
    prompts = Workload(args.swap_prompts, args.swap_min_len, args.swap_max_len, args.new_tokens, seed=1).prompts(
        model.config.vocab_size)
    blocks = pool_blocks(model, args.swap_pool_gib, "auto")
    for mode in ("recompute", "swap"):
        rows.append(run(model, prompts, args.new_tokens, args.device, f"swap:{mode}", num_blocks=blocks,
                        preemption_mode=mode, swap_space_gb=args.swap_space_gb, max_num_seqs=args.max_num_seqs))


def fp8_weights_config(kind: str):
    """transformers' ``TorchAoConfig`` around torchao's float8 config: ``dynamic`` (FP8 weights per output
    channel and FP8 activations per token, GPUs of compute capability 8.9+) or ``weight-only``."""
    import transformers
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    if kind == "dynamic":
        return transformers.TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return transformers.TorchAoConfig(Float8WeightOnlyConfig())


def load_quantized(model, quantization_config, device: str):
    """``from_pretrained`` of ``model``'s own weights with a quantization config (transformers' loading
    path: the weights are quantized as they are loaded)."""
    load = dict(dtype=model.dtype, device_map=device, quantization_config=quantization_config)
    try:
        return type(model).from_pretrained(None, config=copy.deepcopy(model.config), state_dict=model.state_dict(), **load)
    except (TypeError, ValueError, OSError, AttributeError) as e:  # no state_dict path: a checkpoint on disk
        print(f"  from_pretrained(state_dict=...) failed ({type(e).__name__}: {str(e)[:120]}); saving a checkpoint",
              flush=True)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            return type(model).from_pretrained(folder, **load)


def token_agreement(a: list[list[int]], b: list[list[int]], first: int = 16) -> dict:
    """Per prompt, the greedy tokens of two runs: same first ``first`` tokens, and common prefix length."""
    prefix = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n)
    return dict(first=first, same_first=sum(p >= first for p in prefix) / len(prefix),
                mean_common_prefix=sum(prefix) / len(prefix), first_token_same=sum(p >= 1 for p in prefix) / len(prefix))


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once; torchao tensor subclasses count
    their inner tensors (FP8 payload and scales)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        names = getattr(t, "tensor_data_names", None)
        for inner in [getattr(t, n) for n in names] if names else [t]:
            key = (inner.data_ptr(), inner.numel())
            if key not in seen:
                seen.add(key)
                total += inner.numel() * inner.element_size()
    return total


@torch.no_grad()
def first_step_logprobs(model, prompts: list[list[int]]) -> torch.Tensor:
    """[len(prompts), vocab] float32 log-probabilities of the first generated token (stock forward)."""
    device = next(model.parameters()).device
    return torch.stack([torch.log_softmax(model(torch.tensor([p], device=device)).logits[0, -1].float(), -1)
                        for p in prompts])


def logprob_agreement(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """How far ``other``'s first-step distribution is from ``ref``'s, per prompt then averaged."""
    top1 = ref.argmax(-1)
    rows = torch.arange(ref.shape[0])
    centered = ref - ref.mean(-1, keepdim=True)
    return dict(
        prompts=ref.shape[0],
        top1_same=(other.argmax(-1) == top1).float().mean().item(),
        top1_logprob_diff_mean=(other[rows, top1] - ref[rows, top1]).abs().mean().item(),
        logprob_diff_max=(other - ref).abs().max().item(),
        logit_rel_l2=((other - other.mean(-1, keepdim=True) - centered).norm(dim=-1) / centered.norm(dim=-1)).mean().item(),
    )


def section_weights(model, args, rows):
    on_cuda = args.device.startswith("cuda")
    kind = args.fp8_weights
    if kind == "dynamic" and (not on_cuda or torch.cuda.get_device_capability() < (8, 9)):
        print("[weights] FP8 activations need CUDA compute capability 8.9+: weight-only FP8 instead", flush=True)
        kind = "weight-only"
    print(f"[weights] bf16 weights vs FP8 weights (TorchAoConfig, {kind}), same pool", flush=True)
    prompts = Workload(args.weights_prompts, args.min_len, args.max_len, args.weights_new_tokens, seed=2).prompts(
        model.config.vocab_size)
    blocks = pool_blocks(model, args.weights_pool_gib, "auto")
    bf16_gib = weight_bytes(model) / 2**30
    base = run(model, prompts, args.weights_new_tokens, args.device, f"weights:{str(model.dtype)[6:]}", keep_tokens=True,
               num_blocks=blocks, max_num_seqs=args.max_num_seqs)
    base["weights_gib"] = bf16_gib
    rows.append(base)
    probe = prompts[: args.logprob_prompts]
    ref_lp = first_step_logprobs(model, probe)
    free_memory(args.device)
    before = torch.cuda.memory_allocated() if on_cuda else 0
    t0 = time.perf_counter()
    fp8 = load_quantized(model, fp8_weights_config(kind), args.device).eval()
    load_s = time.perf_counter() - t0
    linear = fp8.model.layers[0].mlp.down_proj
    weight = linear.weight
    stored = getattr(weight, "qdata", weight)
    # what the FP8 model holds (new allocations alone miss tensors shared with the bf16 model, such as
    # the embeddings when from_pretrained reuses the given state dict)
    fp8_gib = weight_bytes(fp8) / 2**30
    new_gib = (torch.cuda.memory_allocated() - before) / 2**30 if on_cuda else None
    fp8.generation_config.eos_token_id = None
    fp8.generation_config.pad_token_id = 0
    print(f"  FP8 model loaded in {load_s:.1f} s: down_proj weight {type(weight).__name__} storing {stored.dtype}, "
          f"{fp8_gib:.2f} GiB vs {bf16_gib:.2f} GiB (new allocations: {new_gib or 0:.2f} GiB)", flush=True)
    row = run(fp8, prompts, args.weights_new_tokens, args.device, f"weights:fp8 ({kind})", keep_tokens=True,
              num_blocks=blocks, max_num_seqs=args.max_num_seqs)
    row.update(weights_gib=fp8_gib, new_alloc_gib=new_gib, load_s=load_s, weight_class=type(weight).__name__, stored_dtype=str(stored.dtype),
               speedup_vs_bf16=row["out_tok_s"] / base["out_tok_s"],
               agreement=token_agreement(base["tokens"], row["tokens"]),
               first_step=logprob_agreement(ref_lp, first_step_logprobs(fp8, probe)))
    print(f"  FP8 / bf16 throughput x{row['speedup_vs_bf16']:.2f}; greedy tokens: first token same in "
          f"{row['agreement']['first_token_same']:.0%} of prompts, first 16 same in {row['agreement']['same_first']:.0%}, "
          f"mean common prefix {row['agreement']['mean_common_prefix']:.1f} of {args.weights_new_tokens}", flush=True)
    fs = row["first_step"]
    print(f"  first generated token, {fs['prompts']} prompts, stock forward: top-1 same {fs['top1_same']:.0%}, "
          f"|logprob diff| of the bf16 top-1 {fs['top1_logprob_diff_mean']:.4f} (mean), max over the vocabulary "
          f"{fs['logprob_diff_max']:.4f}, centred-logit relative L2 error {fs['logit_rel_l2']:.4f}", flush=True)
    rows.append(row)
    del base["tokens"], row["tokens"]
    del fp8
    free_memory(args.device)


def section_kernel(args, rows):
    if not args.device.startswith("cuda"):
        print("[kernel] skipped: needs CUDA", flush=True)
        return
    from triton.testing import do_bench

    from hf_paged.kernels import kv_write, paged_attention as pa

    hq, hkv, d, bs = 32, 8, 128, 16
    print("[kernel] decode attention, bf16 vs FP8 caches (32 q / 8 KV heads, head_dim 128)", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, ctx in ((64, 2048), (256, 2048), (64, 8192), (128, 8192)):
        per_row = math.ceil(ctx / bs)
        num_blocks = batch * per_row + 1
        kv = torch.randn(2, num_blocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        tables = torch.randperm(num_blocks, device="cuda", generator=gen)[: batch * per_row].view(batch, per_row)
        tables = tables.to(torch.int32)
        query = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        k8, ks = kv_write.quantize_fp8_reference(kv[0])
        v8, vs = kv_write.quantize_fp8_reference(kv[1])
        out = torch.empty_like(query)
        meta = (tables, seq_lens, qsl, 1)
        timings = {}
        for name, call in (
            ("bf16", lambda: pa.paged_attention(query, kv[0], kv[1], *meta, scale=d**-0.5, out=out)),
            ("fp8", lambda: pa.paged_attention(query, k8, v8, *meta, scale=d**-0.5, out=out, k_scale=ks, v_scale=vs)),
        ):
            call()
            timings[name] = do_bench(call, warmup=25, rep=100, return_mode="median")
        fp8_out = out.clone()
        pa.paged_attention(query, kv[0], kv[1], *meta, scale=d**-0.5, out=out)
        err = ((fp8_out.float() - out.float()).norm() / out.float().norm()).item()
        for name, ms in timings.items():
            elem = 2 if name == "bf16" else 1
            kv_bytes = 2 * batch * ctx * hkv * (d * elem + (4 if name == "fp8" else 0))
            nbytes = kv_bytes + 2 * query.numel() * 2
            rows.append(dict(section="kernel", label=f"kernel:{name} B={batch} ctx={ctx}", us=ms * 1e3,
                             tbps=nbytes / ms / 1e9, kv_mib=kv_bytes / 2**20,
                             speedup=timings["bf16"] / ms, fp8_vs_bf16_rel_err=err))
            print(f"  {name:4s} B={batch:4d} ctx={ctx:5d}: {ms * 1e3:8.1f} us  {nbytes / ms / 1e9:5.2f} TB/s  "
                  f"K/V {kv_bytes / 2**20:7.0f} MiB  x{timings['bf16'] / ms:.2f} vs bf16  (FP8 output rel. err {err:.3f})",
                  flush=True)
        del kv, k8, v8, ks, vs, query, out
        free_memory(args.device)


def render(rows: list[dict]) -> str:
    lines = [f"{'row':34s} {'out tok/s':>10s} {'peak run':>9s} {'mean run':>9s} {'blocks':>7s} {'preempt':>8s} "
             f"{'recomp tok':>10s} {'swap o/i':>11s} {'weights GiB':>11s} {'kernel us':>10s} {'TB/s':>6s}"]
    for r in rows:
        def g(key, fmt):
            width = int(fmt.rstrip("dfs").split(".")[0])
            return format(r[key], fmt) if r.get(key) is not None else "-".rjust(width)
        swap = f"{r['swapped_out_blocks']}/{r['swapped_in_blocks']}" if "swapped_out_blocks" in r else "-"
        lines.append(f"{r['label']:34s} {g('out_tok_s', '10.0f')} {g('peak_running', '9d')} {g('mean_running', '9.1f')} "
                     f"{g('kv_blocks', '7d')} {g('preemptions', '8d')} {g('recomputed_tokens', '10d')} {swap:>11s} "
                     f"{g('weights_gib', '11.2f')} {g('us', '10.1f')} {g('tbps', '6.2f')}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--max-num-seqs", type=int, default=256)
    # kv: a pool of 4 GiB holds ~32k bf16 tokens of the 8B shape: about 45 of these requests at once
    p.add_argument("--pool-gib", type=float, default=4.0)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=768)
    p.add_argument("--new-tokens", type=int, default=192)
    # weights: a roomy pool, a shorter workload
    p.add_argument("--weights-pool-gib", type=float, default=16.0)
    p.add_argument("--weights-prompts", type=int, default=128)
    p.add_argument("--weights-new-tokens", type=int, default=128)
    p.add_argument("--logprob-prompts", type=int, default=16, help="prompts for the first-step logprob comparison")
    p.add_argument("--fp8-weights", default="dynamic", choices=("dynamic", "weight-only"),
                   help="torchao float8 config: FP8 weights and activations (dynamic) or FP8 weights only")
    # swap: long prompts into a small pool
    p.add_argument("--swap-pool-gib", type=float, default=2.0)
    p.add_argument("--swap-prompts", type=int, default=96)
    p.add_argument("--swap-min-len", type=int, default=512)
    p.add_argument("--swap-max-len", type=int, default=1024)
    p.add_argument("--swap-space-gb", type=float, default=8.0)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device; pass --device cpu --model tiny for a smoke run")
    if args.model == "tiny":  # a CPU smoke run: the same code on minutes-free sizes
        args.pool_gib, args.weights_pool_gib, args.swap_pool_gib, args.swap_space_gb = 2**-9, 2**-7, 2**-10, 2**-8
        args.num_prompts, args.min_len, args.max_len, args.new_tokens = 24, 16, 64, 24
        args.weights_prompts, args.weights_new_tokens = 8, 16
        args.swap_prompts, args.swap_min_len, args.swap_max_len = 16, 40, 80

    t0 = time.perf_counter()
    rows: list[dict] = []
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if "kernel" not in args.skip:
        section_kernel(args, rows)
    model = build_model(args.model, args.device, dtype)
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters on {args.device} "
          f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'})", flush=True)
    for name, fn in (("kv", section_kv), ("swap", section_swap), ("weights", section_weights)):
        if name not in args.skip:
            try:
                fn(model, args, rows)
            except Exception as e:  # one failing section (say, FP8 weights on an older transformers) keeps the rest
                print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
                rows.append(dict(section=name, label=f"{name}:FAILED {type(e).__name__}"))
                free_memory(args.device)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(render(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
