"""Compiled decoder layers (``ContinuousGenerator(compile=...)``) against the eager engine, one GPU, one process.

    python benchmarks/gpu_compile.py                      # llama-8b shape, bf16: about 4-5 min on one H200
    python benchmarks/gpu_compile.py --shape llama-1b     # the 1B shape (512 prompts, as its RESULTS row)
    python benchmarks/gpu_compile.py --shape tiny --num-prompts 8 --max-len 64 --new-tokens 8   # CPU smoke test

Modes: "off" (eager forward, decode CUDA graphs), "all" (every step runs ``torch.compile`` of the model;
the decode graphs capture the compiled forward), "decode" (prompt steps eager, decode graphs compiled).
A mode with ":sync" (e.g. "all:sync") runs with ``async_scheduling=False``: each step's tokens are read
back before the next step is scheduled (the default queues the next decode step first).

Phases (each logged as it ends; a table comes last):
1. parity: a small float32 Llama (head_dim 64, the Triton kernels' path) with random weights, 16 prompts
   x 32 new tokens, greedy: how many prompts get the eager engine's exact tokens in each compiled mode,
   and the largest logprob difference of the chosen tokens;
2. per mode on the big shape (random weights, bf16): warm-up (64 prompts x 8 new, where the compiled
   modes compile), capture of every decode graph, then the throughput workload (``--num-prompts``
   prompts U[64,1024] -> 256 new, greedy, EOS ignored) and a single stream (one 512-token prompt ->
   256 new: TPOT); compile seconds (the calls that compiled), capture seconds, Dynamo graph breaks and
   graphs compiled. The modes run in the order given; later compiled modes reuse what the first one
   compiled (same model), so its compile time is the one to read.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import dataclasses
import traceback

import torch

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.entrypoints.bench import SHAPES, Workload, build_model, ready_for_timing, warm_up_generator

PROFILE_MODES: set[str] = set()  # --profile
KV_CACHE_DTYPE = "auto"  # --kv-cache-dtype
PARITY_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, vocab_size=4096, tie_word_embeddings=False)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dynamo_counts() -> tuple[int, int]:
    counters = torch._dynamo.utils.counters
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def parity(device: str, modes: list[str]) -> dict:
    """Phase 1: float32 small Llama, eager engine vs each compiled mode (decode graphs on where CUDA)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**PARITY_SHAPE, max_position_embeddings=2048)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).float().eval()
    model.generation_config.eos_token_id = None
    prompts = Workload(16, 8, 200, 32, seed=3).prompts(config.vocab_size)
    params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = {}
    for mode in ["off", *[m for m in modes if m != "off"]]:
        compile_mode, _, variant = mode.partition(":")
        with ContinuousGenerator(model, progress=False, num_blocks=512, max_num_seqs=16, compile=compile_mode,
                                 async_scheduling=variant != "sync") as gen:
            outs[mode] = gen.generate(prompts, params)
    row = {}
    for mode, results in outs.items():
        if mode == "off":
            continue
        same = sum(a.token_ids == b.token_ids for a, b in zip(results, outs["off"]))
        diff = max(abs(x.logprob - y.logprob) for a, b in zip(results, outs["off"]) for x, y in zip(a.logprobs, b.logprobs))
        row[mode] = {"same": f"{same}/{len(prompts)}", "max_logprob_diff": diff}
        log(f"parity fp32 {mode}: {same}/{len(prompts)} prompts token-identical to eager, max |d logprob| {diff:.2e}")
    return row


def triton_variants() -> dict[str, int]:
    """Compiled variants per hf_paged Triton kernel so far (a variant compiles on its first launch)."""
    import importlib

    out = {}
    for mod in ("hf_paged.kernels.paged_attention", "hf_paged.kernels.kv_write"):
        m = importlib.import_module(mod)
        for name, fn in vars(m).items():
            caches = getattr(fn, "device_caches", None)
            if isinstance(caches, dict):
                out[name] = sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values())
    return out


def replay_floor_ms(gen, device: str, sizes=(1, 64, 256)) -> dict:
    """GPU milliseconds per decode-graph replay with nothing between replays, per captured batch size."""
    graphs = gen.runner.graphs
    out = {}
    if graphs is None or not device.startswith("cuda"):
        return out
    for size in sizes:
        b = graphs._buckets.get(graphs.bucket_for(size))
        if b is None or b.graph is None:
            continue
        b.graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            b.graph.replay()
        end.record()
        torch.cuda.synchronize()
        out[b.size] = round(start.elapsed_time(end) / 20, 3)
    return out


def replay_kernels(gen, device: str, size: int, replays: int = 10) -> str:
    """Kernel time of one decode-graph replay of batch ``size``, top kernels (torch profiler, CUDA only)."""
    graphs = gen.runner.graphs
    b = graphs._buckets.get(graphs.bucket_for(size)) if graphs is not None else None
    if b is None or b.graph is None or not device.startswith("cuda"):
        return "(no graph)"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            b.graph.replay()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows) / replays / 1e3
    lines = [f"  all kernels {total:.3f} ms per replay (bucket {b.size})"]
    for e in rows[:14]:
        lines.append(f"  {e.device_time_total / replays / 1e3:7.3f} ms {e.count // replays:4d}x  {e.key[:90]}")
    return "\n".join(lines)


def run_mode(model, mode: str, prompts: list[list[int]], new_tokens: int, device: str, max_num_seqs: int,
             max_num_batched_tokens: int = 8192) -> dict:
    """Phase 2 for one mode: warm-up (compiles), graph capture, throughput, single stream."""
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    breaks0, graphs0 = dynamo_counts()
    row: dict = {"mode": mode}
    compile_mode, _, variant = mode.partition(":")
    with ContinuousGenerator(model, progress=False, max_num_seqs=max_num_seqs, compile=compile_mode, kv_cache_dtype=KV_CACHE_DTYPE,
                             max_num_batched_tokens=max_num_batched_tokens, async_scheduling=variant != "sync") as gen:
        t = time.perf_counter()
        warm_up_generator(gen, prompts, new_tokens)  # compiled modes compile and capture the compiled forward
        sync(device)
        row["startup_s"] = time.perf_counter() - t
        row["capture_s"] = gen.runner.graphs.capture_seconds if gen.runner.graphs else 0.0
        jit0, compile0 = triton_variants(), gen.runner.compile_seconds
        ready_for_timing(device)  # full GPU clocks (see hf_paged.entrypoints.bench.CLOCK_WARMUP_S)
        t = time.perf_counter()
        results = gen.generate(prompts, greedy)
        sync(device)
        wall = time.perf_counter() - t
        row["first_run_jit"] = {k: v - jit0.get(k, 0) for k, v in triton_variants().items() if v != jit0.get(k, 0)}
        row["first_run_compile_s"] = gen.runner.compile_seconds - compile0
        log(f"{mode}: compiled during the timed run: Triton variants {row['first_run_jit']}, "
            f"torch.compile {row['first_run_compile_s']:.1f} s")
        out_tokens = sum(len(r.token_ids) for r in results)
        tpot = [(r.latency_s - r.ttft_s) / (len(r.token_ids) - 1) for r in results if len(r.token_ids) > 1]
        row.update(out_tok_s=out_tokens / wall, wall_s=wall, tpot_p50_ms=1e3 * statistics.median(tpot),
                   ttft_p50_ms=1e3 * statistics.median(r.ttft_s for r in results),
                   preemptions=gen.stats.preemptions, steps=gen.stats.steps, steps_ahead=gen.stats.steps_scheduled_ahead)
        log(f"{mode}: {out_tokens / wall:,.0f} out tok/s ({wall:.1f} s, {len(prompts)} prompts), batch TPOT p50 "
            f"{row['tpot_p50_ms']:.1f} ms, TTFT p50 {row['ttft_p50_ms']:.0f} ms, {gen.stats.preemptions} preemptions, {row['steps']} steps "
            f"({row['steps_ahead']} scheduled ahead)")
        if mode in PROFILE_MODES:
            # The same workload once more with the engine's step profile (host stages, GPU time per kind
            # of step): where the remaining time goes. Not timed for the table.
            gen.reset_prefix_cache()
            gen.options = dataclasses.replace(gen.options, profile=True)
            t = time.perf_counter()
            gen.generate(prompts, greedy)
            sync(device)
            whole = time.perf_counter() - t
            gen.options = dataclasses.replace(gen.options, profile=False)
            row["profile"] = gen.stats.profile.render()
            log(f"{mode}: step profile of the same workload (generate() took {whole:.2f} s, "
                f"{whole - gen.stats.profile.wall_s:.2f} s of it outside steps)\n{row['profile']}")
            gen.reset_prefix_cache()
            t = time.perf_counter()
            again = gen.generate(prompts, greedy)
            sync(device)
            wall2 = time.perf_counter() - t
            row["out_tok_s_run2"] = sum(len(r.token_ids) for r in again) / wall2
            log(f"{mode}: the timed workload once more: {row['out_tok_s_run2']:,.0f} out tok/s ({wall2:.2f} s)")
        one = [(prompts[0] * (512 // len(prompts[0]) + 1))[:512]]  # a 512-token prompt
        gen.generate(one, warm)
        gen.reset_prefix_cache()
        ready_for_timing(device)
        r = gen.generate(one, greedy)[0]
        sync(device)
        row["single_tpot_ms"] = 1e3 * (r.latency_s - r.ttft_s) / (len(r.token_ids) - 1)
        row["single_ttft_ms"] = 1e3 * r.ttft_s
        if mode in PROFILE_MODES:
            # The single stream again with the step profile, then the GPU floor of its decode step: the
            # one-row graph replayed back to back (no host work between replays).
            gen.reset_prefix_cache()
            gen.options = dataclasses.replace(gen.options, profile=True)
            gen.generate(one, greedy)
            gen.options = dataclasses.replace(gen.options, profile=False)
            row["single_profile"] = gen.stats.profile.render()
            log(f"{mode}: step profile of the single stream\n{row['single_profile']}")
            row["replay_floor_ms"] = replay_floor_ms(gen, device)
            log(f"{mode}: GPU floor of a decode step (graph replays back to back, ms): {row['replay_floor_ms']}")
            for size in (1, 256):
                log(f"{mode}: kernels of one decode-graph replay, batch {size}:\n{replay_kernels(gen, device, size)}")
        row["compile_s"] = gen.runner.compile_seconds
        log(f"{mode}: single stream 512 -> {new_tokens}: TPOT {row['single_tpot_ms']:.2f} ms, TTFT "
            f"{row['single_ttft_ms']:.1f} ms; compile {row['compile_s']:.0f} s, startup {row['startup_s']:.0f} s "
            f"(capture {row['capture_s']:.0f} s)")
    breaks1, graphs1 = dynamo_counts()
    row["graph_breaks"], row["graphs_compiled"] = breaks1 - breaks0, graphs1 - graphs0
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument("--num-prompts", type=int, default=None, help="default: 256 (llama-8b), 512 (llama-1b), 8 (tiny)")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--modes", default="off,all,decode",
                   help="comma-separated subset of off,decode,all, run in order; ':sync' after one turns async scheduling off")
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"), help="the engine's KV cache in every mode")
    p.add_argument("--profile", default="", help="comma-separated modes whose throughput run is repeated with the "
                   "engine's step profile (printed, not timed)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="skip a mode whose start plus the previous mode's duration would pass this many seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    PROFILE_MODES.update(filter(None, args.profile.split(",")))
    global KV_CACHE_DTYPE
    KV_CACHE_DTYPE = args.kv_cache_dtype
    modes = args.modes.split(",")
    if not {m.removesuffix(":sync") for m in modes} <= {"off", "decode", "all"}:
        p.error(f"--modes: unknown mode in {modes}")
    num_prompts = args.num_prompts or {"llama-8b": 256, "llama-1b": 512}.get(args.shape, 8)

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # a CPU smoke run without Triton
        triton_version = "-"
    env = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "triton": triton_version}
    log(f"{env}")
    report: dict = {"env": env, "shape": args.shape, "num_prompts": num_prompts}

    if not args.no_parity:
        try:
            report["parity"] = parity(device, modes)
        except Exception:  # keep going: the speed phases still say something
            traceback.print_exc()
            report["parity"] = {"error": traceback.format_exc(limit=3)}
        torch._dynamo.reset()  # the big model compiles from scratch: its compile time is measured whole
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    t = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    log(f"built {args.shape} ({dtype}) in {time.perf_counter() - t:.0f} s")
    prompts = Workload(num_prompts, args.min_len, args.max_len, args.new_tokens).prompts(model.config.vocab_size)
    rows = []
    last = 0.0
    for mode in modes:
        elapsed = time.perf_counter() - started
        if rows and elapsed + last > args.budget_s:
            log(f"{mode}: skipped, {elapsed:.0f} s gone and the previous mode took {last:.0f} s (--budget-s {args.budget_s:.0f})")
            rows.append({"mode": mode, "error": "skipped for the time budget"})
            continue
        t = time.perf_counter()
        try:
            rows.append(run_mode(model, mode, prompts, args.new_tokens, device, args.max_num_seqs,
                                 args.max_num_batched_tokens))
        except Exception:
            traceback.print_exc()
            rows.append({"mode": mode, "error": traceback.format_exc(limit=3).strip().splitlines()[-1]})
        last = time.perf_counter() - t
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    report["modes"] = rows
    report["total_s"] = time.perf_counter() - started
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(render(report, args, num_prompts), flush=True)
    return 0


def render(report: dict, args, num_prompts: int) -> str:
    env = report["env"]
    lines = [
        f"\n{report['shape']} random weights, {num_prompts} prompts U[{args.min_len},{args.max_len}] -> {args.new_tokens} "
        f"new, greedy, KV cache {args.kv_cache_dtype}; single stream 512 -> {args.new_tokens}; {env['gpu']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, triton {env['triton']}; whole script {report['total_s']:.0f} s",
        "| compile | out tok/s | x eager | batch TPOT p50 ms | single TPOT ms | single TTFT ms | compile s | startup s "
        "(capture s) | graph breaks | graphs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r for r in report["modes"] if r["mode"] == "off" and "error" not in r), None)
    for r in report["modes"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error']} |")
            continue
        ratio = f"{r['out_tok_s'] / base['out_tok_s']:.3f}" if base else "-"
        lines.append(
            f"| {r['mode']} | {r['out_tok_s']:,.0f} | {ratio} | {r['tpot_p50_ms']:.2f} | {r['single_tpot_ms']:.2f} | "
            f"{r['single_ttft_ms']:.1f} | {r['compile_s']:.0f} | {r['startup_s']:.0f} ({r['capture_s']:.0f}) | "
            f"{r['graph_breaks']} | {r['graphs_compiled']} |"
        )
    par = report.get("parity")
    if par:
        if "error" in par:
            lines.append(f"parity (fp32 small Llama): error {par['error'].strip().splitlines()[-1]}")
        for mode, v in par.items():
            if mode != "error":
                lines.append(f"parity (fp32 small Llama, 16 prompts x 32 new) {mode}: {v['same']} token-identical to "
                             f"eager, max |d logprob| {v['max_logprob_diff']:.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
