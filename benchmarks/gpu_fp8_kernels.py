"""FP8 (e4m3) KV decode on one GPU: every kernel variant against the reference, then decode timings, bf16
against FP8, with a small launch-config sweep of the FP8 kernel.

Usage (repo root, on a CUDA GPU with FP8 support: Ada, Hopper or newer; the package need not be installed)::

    python benchmarks/gpu_fp8_kernels.py [--out fp8_kernels.json] [--budget 170]

Variants (all through ``paged_attention._launch`` with the launcher's own config, ``_choose_config``):

* ``bf16``: bf16 K/V.
* ``fp8``: FP8 K/V, fp16 dots, the value tile converted by inline PTX before its layout change (the
  default, ``_Config.fp8_ptx_cvt=1``).
* ``fp8-kv``: key tile converted by inline PTX too (``fp8_ptx_cvt=2``).
* ``fp8-plain``: Triton's own conversions, in the MMA operand layout (``fp8_ptx_cvt=0``).

Check: each variant against ``paged_attention_reference`` on the same cache (mixed prefill/decode rows,
window + softcap + sinks, forced splits, bf16 queries of size ~2^17, fp16 queries). Timing: 8B heads
(32 q / 8 KV heads, head_dim 128, block 16), batch 16/64/256 x context 512/2048/8192, one query token per
row. GPU time per call from CUDA graph replay (20 calls per graph, each after a 256 MiB write that evicts
L2, minus a graph of the writes alone; median of 5 replays): no host launch time, which dominated small
batches under ``do_bench`` (decode runs in CUDA graphs in the library too). GB/s counts the K/V bytes
actually read: 2 bytes per element for bf16; 1 byte per element plus the 4-byte scale per token and KV
head for FP8. The sweep times other tiles / warps / stages (and split counts at batch 16) while
``--budget`` seconds last. Prefill (one row, 512 new tokens on 4096 cached, 2048 on none): bf16 vs FP8
with the launcher's configs, same timing. The decode table comes last.

``--smoke`` runs the same code on the CPU under the Triton interpreter with tiny shapes and fp16 queries
(a test of the script, not of speed: the interpreter's bf16 dots are wrong, so bf16 variants FAIL there).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before triton is imported
    import os

    os.environ["TRITON_INTERPRET"] = "1"

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_paged.kernels import kv_write as kvw  # noqa: E402  (after the sys.path insert)
from hf_paged.kernels import paged_attention as pa  # noqa: E402

DEVICE, DTYPE = "cuda", torch.bfloat16
HQ, HKV, D, BS = 32, 8, 128, 16
SCALE = D**-0.5
BATCHES = (16, 64, 256)
CONTEXTS = (512, 2048, 8192)
# name -> _Config overrides on top of the heuristic config
VARIANTS = {
    "bf16": {},
    "fp8": {},
    "fp8-kv": dict(fp8_ptx_cvt=2),
    "fp8-plain": dict(fp8_ptx_cvt=0),
}
FP8_NAMES = [n for n in VARIANTS if n != "bf16"]
# (variant, tile, num_warps, num_stages) timed besides the heuristic config (FP8: t64 w2 s2)
SWEEP = [("fp8", 64, 2, 3), ("fp8", 32, 2, 2), ("fp8", 32, 1, 2), ("fp8", 128, 4, 2), ("fp8", 64, 4, 2),
         ("fp8-kv", 64, 2, 3), ("fp8-kv", 32, 1, 2), ("fp8-kv", 128, 4, 2), ("bf16", 64, 2, 2), ("bf16", 32, 2, 2)]
PREFILL = ((512, 4096), (2048, 0))  # (new tokens, cached tokens), one row
SWEEP_SPLITS_B16 = (2, 8, 16)  # the heuristic picks 4 at batch 16 (fp8 and fp8-kv)
CHECK_TOL = 1e-2  # relative Frobenius error against the fp32 reference on the same cache (bf16 outputs)


_FLUSH = None


def bench(fn, calls: int = 20) -> float:
    """GPU milliseconds per call of ``fn`` with a cold L2 and no host time (see the module docstring)."""
    global _FLUSH
    if DEVICE == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    if _FLUSH is None:
        _FLUSH = torch.empty(2**26, dtype=torch.int32, device="cuda")  # 256 MiB, larger than L2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compiles, allocator)
        fn()
        _FLUSH.zero_()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                _FLUSH.zero_()
                if with_fn:
                    fn()
        graphs.append(g)
    times = []
    for g in graphs:
        g.replay()
        torch.cuda.synchronize()
        runs = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end))
        times.append(sorted(runs)[2])
    return max(times[0] - times[1], 1e-6) / calls


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def make_problem(rows, gen, q_gain=1.0, dtype=None):
    """rows = [(seq_len, num_q)]: a bf16 pool with scattered blocks, its FP8 copy, queries, metadata."""
    per_row = [max(1, math.ceil(s / BS)) for s, _ in rows]
    width = max(per_row)
    num_blocks = sum(per_row) + 1
    dtype = dtype or DTYPE
    pool = torch.randn(2, num_blocks, BS, HKV, D, device=DEVICE, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, device=DEVICE, generator=gen)
    tables = torch.zeros(len(rows), width, dtype=torch.int32, device=DEVICE)
    at = 0
    for r, n in enumerate(per_row):
        tables[r, :n] = perm[at : at + n].to(torch.int32)
        at += n
    num_tokens = sum(q for _, q in rows)
    query = (torch.randn(num_tokens, HQ, D, device=DEVICE, generator=gen) * q_gain).to(dtype)
    seq_lens = torch.tensor([s for s, _ in rows], dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0] + [q for _, q in rows], device=DEVICE).cumsum(0).to(torch.int32)
    k8, ks = kvw.quantize_fp8_reference(pool[0])
    v8, vs = kvw.quantize_fp8_reference(pool[1])
    return dict(query=query, bf16=(pool[0], pool[1]), fp8=(k8, v8, ks, vs), meta=(tables, seq_lens, qsl),
                max_q=max(1, max(q for _, q in rows)))


def launch(name, prob, out, cfg, features):
    """One variant through the internal launcher (no asserts, explicit config)."""
    cfg = pa._Config(cfg.block_m, cfg.tile, cfg.num_warps, cfg.num_stages, cfg.num_splits, cfg.heads_first,
                     **VARIANTS.get(name, {}))
    tables, seq_lens, qsl = prob["meta"]
    window, softcap, sinks = features
    if name == "bf16":
        k, v = prob["bf16"]
        ks = vs = None
    else:
        k, v, ks, vs = prob["fp8"]
    pa._launch(prob["query"], k, v, tables, seq_lens, qsl, prob["max_q"], SCALE, window, softcap, sinks, out, cfg,
               ks, vs)


def heuristic(prob, name, num_kv_splits=None):
    """The public launcher's config for this problem and cache dtype."""
    tables, seq_lens, _ = prob["meta"]
    q = prob["query"]
    return pa._choose_config(q.shape[0], seq_lens.shape[0], prob["max_q"], HKV, HQ // HKV, D, q.element_size(),
                             tables.shape[1] * BS, pa._num_sms(q.device), num_kv_splits, name != "bf16")


def check(gen) -> list[dict]:
    """Every variant against the reference on the same cache; returns one row per case."""
    mixed = [(1000, 1), (2049, 1), (513, 200), (300, 300), (7, 0), (5, 20), (4096, 1), (17, 1), (256, 64)]
    decode = [(1, 1), (16, 1), (17, 1), (255, 1), (257, 1), (1024, 1), (4097, 1), (3000, 1)]
    if DEVICE == "cpu":
        mixed, decode = [(40, 7), (17, 1), (5, 0), (3, 6)], [(1, 1), (17, 1), (70, 1)]
    sinks = torch.randn(HQ, device=DEVICE, generator=gen)
    none = (None, None, None)
    cases = [("mixed", mixed, none, None, 1.0, DTYPE), ("mixed+window+softcap+sinks", mixed, (100, 30.0, sinks), 3, 1.0, DTYPE),
             ("decode", decode, none, None, 1.0, DTYPE), ("decode split 5", decode, none, 5, 1.0, DTYPE),
             ("decode q~2^17", decode, none, None, 2.0**17 if DTYPE == torch.bfloat16 else 2.0**10, DTYPE),
             ("decode fp16 queries", decode, none, None, 1.0, torch.float16)]
    results = []
    for label, rows, features, splits, gain, dtype in cases:
        prob = make_problem(rows, gen, q_gain=gain, dtype=dtype)
        scale = SCALE / gain
        tables, seq_lens, qsl = prob["meta"]
        n = int(qsl[-1])
        window, softcap, sink = features
        kw = dict(sliding_window=window, softcap=softcap, sinks=sink)
        ref_fp8 = pa.paged_attention_reference(prob["query"], *prob["fp8"][:2], tables, seq_lens, qsl, prob["max_q"],
                                               scale=scale, k_scale=prob["fp8"][2], v_scale=prob["fp8"][3], **kw)
        ref_bf16 = pa.paged_attention_reference(prob["query"], *prob["bf16"], tables, seq_lens, qsl, prob["max_q"],
                                                scale=scale, **kw)
        for name in VARIANTS:
            out = torch.full_like(prob["query"], float("nan"))
            cfg = heuristic(prob, name, splits)
            tables_, seq_lens_, qsl_ = prob["meta"]
            k, v, ks, vs = (*prob["bf16"], None, None) if name == "bf16" else prob["fp8"]
            c = pa._Config(cfg.block_m, cfg.tile, cfg.num_warps, cfg.num_stages, cfg.num_splits, cfg.heads_first,
                           **VARIANTS[name])
            try:
                pa._launch(prob["query"], k, v, tables_, seq_lens_, qsl_, prob["max_q"], scale, window, softcap, sink,
                           out, c, ks, vs)
                ref = ref_bf16 if name == "bf16" else ref_fp8
                err = rel_err(out[:n], ref[:n]) if torch.isfinite(out[:n]).all() else float("inf")
                msg = ""
            except Exception as exc:  # report, keep checking the others
                err, msg = float("inf"), f"{type(exc).__name__}: {str(exc)[:200]}"
            ok = err < CHECK_TOL
            results.append(dict(case=label, variant=name, err=err, ok=ok, error=msg))
            print(f"check {label:30s} {name:8s} rel err {err:.2e} {'ok' if ok else 'FAIL'} {msg}", flush=True)
        fp8_cost = rel_err(ref_fp8[:n], ref_bf16[:n])
        print(f"check {label:30s} (FP8 cache vs bf16 cache, both references: rel diff {fp8_cost:.3f})", flush=True)
        del prob
    return results


def timings(gen, deadline: float) -> tuple[list[dict], list[dict]]:
    rows, sweeps = [], []
    for batch in BATCHES:
        for ctx in CONTEXTS:
            prob = make_problem([(ctx, 1)] * batch, gen)
            out = torch.empty_like(prob["query"])
            nbytes = dict(bf16=2 * batch * ctx * HKV * D * 2, fp8=2 * batch * ctx * HKV * (D + 4))
            row = dict(batch=batch, ctx=ctx)
            best = {}  # "bf16" / "fp8" -> (us, tag)
            for name in VARIANTS:
                cfg = heuristic(prob, name)
                fn = lambda name=name, cfg=cfg: launch(name, prob, out, cfg, (None, None, None))  # noqa: E731
                ms = bench(fn)
                kind = "bf16" if name == "bf16" else "fp8"
                tag = f"{name} t{cfg.tile} w{cfg.num_warps} s{cfg.num_stages} x{cfg.num_splits}"
                row.update({f"{name}_us": ms * 1e3, f"{name}_gbs": nbytes[kind] / ms / 1e6, f"{name}_config": tag})
                best[kind] = min(best.get(kind, (float("inf"), "")), (ms * 1e3, tag))
            for name in FP8_NAMES:
                row[f"{name}_ratio"] = row[f"{name}_us"] / row["bf16_us"]
            fp8_cfg = heuristic(prob, "fp8")
            candidates = [(n, pa._Config(fp8_cfg.block_m, t, w, st, fp8_cfg.num_splits)) for n, t, w, st in SWEEP]
            if batch == 16:
                candidates += [(n, pa._Config(fp8_cfg.block_m, fp8_cfg.tile, fp8_cfg.num_warps, fp8_cfg.num_stages, sp))
                               for n in ("fp8", "fp8-kv") for sp in SWEEP_SPLITS_B16]
            for name, c in candidates:
                if time.time() > deadline:
                    break
                fn = lambda name=name, c=c: launch(name, prob, out, c, (None, None, None))  # noqa: E731
                try:
                    ms = bench(fn)
                except Exception as exc:  # a config that does not compile (registers, shared memory)
                    print(f"   sweep {name} {c}: failed {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                    continue
                kind = "bf16" if name == "bf16" else "fp8"
                tag = f"{name} t{c.tile} w{c.num_warps} s{c.num_stages} x{c.num_splits}"
                sweeps.append(dict(batch=batch, ctx=ctx, config=tag, us=ms * 1e3, gbs=nbytes[kind] / ms / 1e6))
                best[kind] = min(best[kind], (ms * 1e3, tag))
            for kind in ("bf16", "fp8"):
                row[f"best_{kind}_us"], row[f"best_{kind}_config"] = best[kind]
            row["best_ratio"] = best["fp8"][0] / best["bf16"][0]
            rows.append(row)
            print(f"B={batch:4d} ctx={ctx:5d}: bf16 {row['bf16_us']:8.1f} us {row['bf16_gbs']:6.0f} GB/s | "
                  + " | ".join(f"{n} {row[n + '_us']:8.1f} us {row[n + '_gbs']:6.0f} GB/s x{row[n + '_ratio']:.2f}"
                               for n in FP8_NAMES)
                  + f" | best fp8 {best['fp8'][0]:.1f} us ({best['fp8'][1]}), best bf16 {best['bf16'][0]:.1f} us "
                  f"({best['bf16'][1]})", flush=True)
            del prob, out
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return rows, sweeps


def prefill_timings() -> list[dict]:
    """One row, a chunk of ``new`` tokens on ``cached`` ones: bf16 vs FP8 K/V (launcher configs)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    out_rows = []
    for new, cached in PREFILL if DEVICE == "cuda" else ((16, 48),):
        prob = make_problem([(cached + new, new)], gen)
        out = torch.empty_like(prob["query"])
        row = dict(new=new, cached=cached)
        for name in ("bf16", "fp8"):
            cfg = heuristic(prob, name)
            row[f"{name}_us"] = bench(lambda: launch(name, prob, out, cfg, (None, None, None))) * 1e3  # noqa: B023
        row["ratio"] = row["fp8_us"] / row["bf16_us"]
        out_rows.append(row)
        print(f"prefill {new} on {cached}: bf16 {row['bf16_us']:.1f} us, fp8 {row['fp8_us']:.1f} us "
              f"(x{row['ratio']:.2f})", flush=True)
    return out_rows


def render(rows) -> str:
    """us, GB/s and time / bf16 time per variant (launcher configs), then the best of the sweep."""
    head = f"{'batch':>5s} {'ctx':>5s} {'bf16 us':>8s} {'GB/s':>5s}"
    for n in FP8_NAMES:
        head += f" | {n + ' us':>12s} {'GB/s':>5s} {'/bf16':>5s}"
    lines = [head + " | best fp8 us / best bf16 us = ratio (configs)"]
    for r in rows:
        line = f"{r['batch']:5d} {r['ctx']:5d} {r['bf16_us']:8.1f} {r['bf16_gbs']:5.0f}"
        for n in FP8_NAMES:
            line += f" | {r[n + '_us']:12.1f} {r[n + '_gbs']:5.0f} {r[n + '_ratio']:5.2f}"
        lines.append(line + f" | {r['best_fp8_us']:.1f} / {r['best_bf16_us']:.1f} = {r['best_ratio']:.2f} "
                     f"({r['best_fp8_config']}; {r['best_bf16_config']})")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write checks, rows and sweep as JSON here")
    p.add_argument("--budget", type=float, default=170.0, help="seconds after which the sweep stops")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: tests the script")
    args = p.parse_args()
    global DEVICE, DTYPE, BATCHES, CONTEXTS, SWEEP, SWEEP_SPLITS_B16
    if args.smoke:
        DEVICE, DTYPE, BATCHES, CONTEXTS, SWEEP, SWEEP_SPLITS_B16 = "cpu", torch.float16, (16,), (64,), SWEEP[:1], (2,)
    elif not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        p.error("needs a CUDA GPU with float8 e4m3 (compute capability 8.9+)")
    t0 = time.time()
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    checks = check(gen)
    prefill = prefill_timings()
    rows, sweeps = timings(gen, t0 + args.budget)
    failed = [c for c in checks if not c["ok"]]
    print(f"total {time.time() - t0:.0f} s; checks: {len(checks) - len(failed)} ok, {len(failed)} FAILED "
          + ", ".join(f"{c['case']}/{c['variant']}" for c in failed), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(checks=checks, rows=rows, sweep=sweeps, prefill=prefill), indent=1))
    print(render(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
