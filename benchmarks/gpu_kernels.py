"""GPU run of the kernels: check against the reference, then time decode and prefill against SDPA.

Usage (repo root, on a CUDA machine; the package need not be installed)::

    python benchmarks/gpu_kernels.py             # heuristic configs, final table
    python benchmarks/gpu_kernels.py --sweep     # also time launch-config variants (tuning)

Decode: Llama-3-8B attention heads (32 q / 8 kv heads, head_dim 128, bf16, block 16), one query token per
row, every row at the same context; bandwidth = (K + V + Q + O bytes) / median time, against a measured
device copy (bytes read + written). SDPA runs on contiguous K/V of the same shape (enable_gqa=True).
Prefill: one row, a chunk of N new tokens on top of C cached ones, against SDPA with a lower-right causal
mask on contiguous K/V. Times are `triton.testing.do_bench` medians (it flushes L2 between calls).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))




from hf_paged.kernels import paged_attention as pa  # noqa: E402  (after the sys.path insert)

HQ, HKV, D, BS, DTYPE = 32, 8, 128, 16, torch.bfloat16
SCALE = D**-0.5
DECODE_BATCHES = (1, 16, 64, 256)
DECODE_CONTEXTS = (512, 2048, 8192)
PREFILL_CASES = ((512, 0), (512, 4096), (2048, 0), (2048, 4096))  # (new tokens, cached tokens)

# Tuning sweep (--sweep). Decode: (tile, num_warps, num_stages, heads_first); prefill: (block_m, tile,
# num_warps, num_stages, heads_first); each crossed with the split counts below.
DECODE_VARIANTS = [(64, 4, 2, True), (64, 4, 2, False), (64, 2, 3, True), (32, 4, 2, True), (128, 4, 2, True),
                   (64, 4, 3, True), (64, 4, 4, True), (128, 4, 3, True), (128, 8, 2, True), (64, 2, 4, True)]
DECODE_SPLITS = {1: (8, 16, 32, 64), 16: (1, 2, 4, 8), 64: (1, 2), 256: (1, 2), 512: (1,)}
PREFILL_VARIANTS = [(128, 64, 8, 3, True), (128, 64, 4, 3, True), (64, 64, 4, 3, True), (128, 128, 8, 2, True)]
PREFILL_SPLITS = (1, 2)


def bench(fn, quick=False) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def paged_problem(num_seqs: int, seq_len: int, num_q: int, gen: torch.Generator):
    """num_seqs rows of seq_len keys each (num_q of them new), blocks scattered at random in the pool."""
    blocks_per_row = math.ceil(seq_len / BS)
    num_blocks = num_seqs * blocks_per_row + 1
    pool = torch.randn(2, num_blocks, BS, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    block_tables = torch.randperm(num_blocks, device="cuda", generator=gen)[: num_seqs * blocks_per_row]
    block_tables = block_tables.view(num_seqs, blocks_per_row).to(torch.int32)
    query = torch.randn(num_seqs * num_q, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda")
    qsl = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * num_q
    return (query, pool[0], pool[1], block_tables, seq_lens, qsl, num_q)


def contiguous_kv(args):
    """[B, HKV, seq_len, D] K and V gathered through the block table (the SDPA baseline's layout)."""
    query, k_cache, v_cache, block_tables, seq_lens, qsl, num_q = args
    seq_len = int(seq_lens[0])
    k = k_cache[block_tables.long()].flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()
    v = v_cache[block_tables.long()].flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()
    return k, v


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_decode(bw_copy: float, sweep: bool, deadline: float, rows: list, sweeps: list) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            args = paged_problem(batch, ctx, 1, gen)
            query = args[0]
            out = pa.paged_attention(*args, scale=SCALE)
            ref = pa.paged_attention_reference(*args, scale=SCALE)
            err = rel_err(out, ref)
            cfg = pa._choose_config(batch, batch, 1, HKV, HQ // HKV, D, 2, args[3].shape[1] * BS,
                                    pa._num_sms(query.device), None)
            ms = bench(lambda: pa.paged_attention(*args, scale=SCALE, out=out))
            kv_bytes = 2 * batch * ctx * HKV * D * 2
            nbytes = kv_bytes + 2 * query.numel() * 2
            k, v = contiguous_kv(args)
            q4 = query.view(batch, 1, HQ, D).transpose(1, 2)  # [B, HQ, 1, D]
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, scale=SCALE, enable_gqa=True)
            sdpa_err = rel_err(sdpa().transpose(1, 2).reshape_as(out), out)
            ms_sdpa = bench(sdpa)
            row = dict(kind="decode", batch=batch, ctx=ctx, ms=ms, tbps=nbytes / ms / 1e9, frac_copy=nbytes / ms / 1e-3 / bw_copy,
                       sdpa_ms=ms_sdpa, sdpa_tbps=nbytes / ms_sdpa / 1e9, speedup=ms_sdpa / ms, err=err, sdpa_vs_kernel=sdpa_err,
                       cfg=dict(tile=cfg.tile, warps=cfg.num_warps, stages=cfg.num_stages, splits=cfg.num_splits))
            rows.append(row)
            print(f"decode B={batch:4d} ctx={ctx:5d}: {ms*1e3:8.1f} us {row['tbps']:.2f} TB/s ({row['frac_copy']:.0%} of copy)"
                  f"  sdpa {ms_sdpa*1e3:8.1f} us  x{row['speedup']:.2f}  err {err:.1e} cfg {row['cfg']}", flush=True)
            if sweep and time.time() < deadline:
                best = (ms, "heuristic")
                for tile, warps, stages, heads_first in DECODE_VARIANTS:
                    for splits in DECODE_SPLITS[batch]:
                        if time.time() > deadline:
                            break
                        c = pa._Config(16, tile, warps, stages, splits, heads_first)
                        fn = lambda: pa._launch(*args, SCALE, None, None, None, out, c)
                        try:
                            fn()
                            e = rel_err(out, ref)
                            t = bench(fn, quick=True)
                        except Exception as exc:  # a config that does not compile (shared memory, ...)
                            print(f"   sweep {c}: failed {type(exc).__name__}: {str(exc)[:100]}")
                            continue
                        sweeps.append(dict(kind="decode", batch=batch, ctx=ctx, tile=tile, warps=warps, stages=stages,
                                           heads_first=heads_first, splits=splits, ms=t,
                                           tbps=nbytes / t / 1e9, err=e))
                        if t < best[0]:
                            best = (t, f"{c}")
                print(f"   best: {best[0]*1e3:.1f} us {nbytes / best[0] / 1e9:.2f} TB/s with {best[1]}", flush=True)
            del args, k, v, out
            torch.cuda.empty_cache()


def sdpa_prefill(q4, k, v, cached: int):
    """SDPA with queries aligned to the end of the keys (lower-right causal); returns (fn, how)."""
    from torch.nn.attention.bias import causal_lower_right

    n, total = q4.shape[2], k.shape[2]
    if cached == 0:
        return (lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=SCALE,
                                                                         enable_gqa=True)), "is_causal"
    bias = causal_lower_right(n, total)
    try:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, attn_mask=bias, scale=SCALE,
                                                                      enable_gqa=True)
        fn()
        return fn, "causal_lower_right+gqa"
    except Exception:
        ke = k.repeat_interleave(HQ // HKV, dim=1)
        ve = v.repeat_interleave(HQ // HKV, dim=1)
        return (lambda: torch.nn.functional.scaled_dot_product_attention(q4, ke, ve, attn_mask=bias,
                                                                          scale=SCALE)), "causal_lower_right+expanded"


def run_prefill(sweep: bool, deadline: float, rows: list, sweeps: list) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    for n, cached in PREFILL_CASES:
        args = paged_problem(1, n + cached, n, gen)
        query = args[0]
        out = pa.paged_attention(*args, scale=SCALE)
        ref = pa.paged_attention_reference(*args, scale=SCALE)
        err = rel_err(out, ref)
        ms = bench(lambda: pa.paged_attention(*args, scale=SCALE, out=out))
        flops = 4 * HQ * D * (n * cached + n * (n + 1) / 2)
        k, v = contiguous_kv(args)
        q4 = query.view(1, n, HQ, D).transpose(1, 2)
        sdpa, how = sdpa_prefill(q4, k, v, cached)
        sdpa_err = rel_err(sdpa().transpose(1, 2).reshape_as(out), out)
        ms_sdpa = bench(sdpa)
        cfg = pa._choose_config(n, 1, n, HKV, HQ // HKV, D, 2, args[3].shape[1] * BS, pa._num_sms(query.device), None)
        row = dict(kind="prefill", new=n, cached=cached, ms=ms, tflops=flops / ms / 1e9, sdpa_ms=ms_sdpa,
                   sdpa_tflops=flops / ms_sdpa / 1e9, ratio=ms / ms_sdpa, err=err, sdpa_vs_kernel=sdpa_err, sdpa_how=how,
                   cfg=dict(block_m=cfg.block_m, tile=cfg.tile, warps=cfg.num_warps, stages=cfg.num_stages,
                            splits=cfg.num_splits))
        rows.append(row)
        print(f"prefill new={n:5d} cached={cached:5d}: {ms*1e3:8.1f} us {row['tflops']:.0f} TFLOP/s  sdpa {ms_sdpa*1e3:8.1f} us"
              f" ({how}, vs kernel {sdpa_err:.1e})  ratio {row['ratio']:.2f}  err {err:.1e} cfg {row['cfg']}", flush=True)
        if sweep and time.time() < deadline:
            best = (ms, "heuristic")
            for block_m, tile, warps, stages, heads_first in PREFILL_VARIANTS:
                for splits in PREFILL_SPLITS:
                    if time.time() > deadline:
                        break
                    c = pa._Config(block_m, tile, warps, stages, splits, heads_first)
                    fn = lambda: pa._launch(*args, SCALE, None, None, None, out, c)
                    try:
                        fn()
                        e = rel_err(out, ref)
                        t = bench(fn, quick=True)
                    except Exception as exc:
                        print(f"   sweep {c}: failed {type(exc).__name__}: {str(exc)[:100]}")
                        continue
                    sweeps.append(dict(kind="prefill", new=n, cached=cached, block_m=block_m, tile=tile, warps=warps,
                                       stages=stages, heads_first=heads_first, splits=splits, ms=t,
                                       tflops=flops / t / 1e9, err=e))
                    if t < best[0]:
                        best = (t, f"{c}")
            print(f"   best: {best[0]*1e3:.1f} us {flops / best[0] / 1e9:.0f} TFLOP/s with {best[1]}", flush=True)
        del args, k, v, out
        torch.cuda.empty_cache()


def profile() -> None:
    """One launch per decode case between cudaProfilerStart/Stop, for `ncu --profile-from-start off`."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    cases = [(1, 8192), (16, 2048), (64, 2048)]
    problems = [paged_problem(batch, ctx, 1, gen) for batch, ctx in cases]
    for args in problems:  # compile outside the profiled region
        pa.paged_attention(*args, scale=SCALE)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for args in problems:
        pa.paged_attention(*args, scale=SCALE)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch-config variants")
    parser.add_argument("--profile", action="store_true", help="only launch a few decode cases for ncu")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop sweeping after this many seconds")
    parser.add_argument("--head-dim", type=int, default=128, help="64: the Llama-3.2-1B heads (32 q / 8 kv as well)")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill cases")
    parser.add_argument("--batches", default=None, help="decode batch sizes, comma-separated (default 1,16,64,256)")
    parser.add_argument("--contexts", default=None, help="decode context lengths, comma-separated (default 512,2048,8192)")
    args = parser.parse_args()
    global D, SCALE, DECODE_BATCHES, DECODE_CONTEXTS
    D, SCALE = args.head_dim, args.head_dim**-0.5
    if args.batches:
        DECODE_BATCHES = tuple(int(b) for b in args.batches.split(","))
    if args.contexts:
        DECODE_CONTEXTS = tuple(int(c) for c in args.contexts.split(","))
    assert torch.cuda.is_available(), "this script needs a CUDA device"
    if args.profile:
        return profile()
    start = time.time()
    deadline = start + args.budget_s
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth()
    print(f"device copy bandwidth (read + write): {bw / 1e12:.2f} TB/s", flush=True)
    rows: list = []
    sweeps: list = []
    run_decode(bw, args.sweep, deadline, rows, sweeps)
    if not args.decode_only:
        run_prefill(args.sweep, deadline, rows, sweeps)

    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(Path(out_dir) / "gpu_kernels.json", "w") as f:
            json.dump(dict(device=props.name, torch=torch.__version__, triton=triton.__version__, copy_bw=bw,
                           rows=rows, sweeps=sweeps), f, indent=1)

    print(f"\n=== {props.name}, torch {torch.__version__}, triton {triton.__version__}, copy {bw/1e12:.2f} TB/s "
          f"({time.time() - start:.0f} s) ===")
    print(f"decode, 32q/8kv heads, d{D}, bf16, block 16: kernel | SDPA contiguous")
    print("  B   ctx  |   us    TB/s  %copy | sdpa us  TB/s | speedup  err")
    for r in rows:
        if r["kind"] == "decode":
            print(f"{r['batch']:4d} {r['ctx']:5d} | {r['ms']*1e3:7.1f} {r['tbps']:5.2f} {r['frac_copy']:5.0%} |"
                  f" {r['sdpa_ms']*1e3:7.1f} {r['sdpa_tbps']:5.2f} | {r['speedup']:5.2f}x  {r['err']:.0e}")
    print("prefill, one row: kernel | SDPA (lower-right causal)")
    print("  new cached |   us   TFLOP/s | sdpa us TFLOP/s | kernel/sdpa  err")
    for r in rows:
        if r["kind"] == "prefill":
            print(f"{r['new']:5d} {r['cached']:5d} | {r['ms']*1e3:7.1f} {r['tflops']:5.0f} | {r['sdpa_ms']*1e3:7.1f}"
                  f" {r['sdpa_tflops']:5.0f} | {r['ratio']:5.2f}  {r['err']:.0e}")


if __name__ == "__main__":
    main()
