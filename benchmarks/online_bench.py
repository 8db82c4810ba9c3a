"""Online serving in one process: Poisson arrivals into ``AsyncEngine``, side by side with offline
``ContinuousGenerator`` on the same requests and transformers' own ``ContinuousBatchingManager`` on the
same arrivals.

    python benchmarks/online_bench.py --model llama-8b --rates 2,8,16,32,inf \\
        --num-prompts 256 --min-len 64 --max-len 1024 --new-tokens 256 --hf-rates 4,inf --hf-num-prompts 64

Each rate draws exponential inter-arrival gaps (fixed seed) for the first N requests of one fixed list
of random prompts; N is capped so that arrivals span at most ``--max-arrival-s`` seconds. Every request
generates exactly ``--new-tokens`` tokens (the random model's EOS is off). Reported per system and rate:
request and output throughput (finished tokens over first arrival -> last finish), TTFT, TPOT (per
request: (e2e - TTFT) / (tokens - 1)), ITL (every gap between tokens) and end-to-end latency, p50 / p99.
The engine row at rate ``inf`` against the offline row is the "online costs nothing" check.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_paged import AsyncEngine, ContinuousGenerator, SamplingParams  # noqa: E402
from hf_paged.entrypoints.bench import Workload, build_model  # noqa: E402


@dataclass
class RequestRecord:
    send: float
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    system: str
    rate: float
    records: list[RequestRecord]
    wall_s: float

    def row(self) -> dict:
        done = [r for r in self.records if r.e2e is not None]
        out = sum(r.tokens for r in done)
        tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in done if r.ttft is not None and r.tokens > 1]
        itl = [x for r in done for x in r.itl]

        def pct(xs, q):
            if not xs:
                return float("nan")
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3

        return {
            "system": self.system,
            "rate": "inf" if math.isinf(self.rate) else f"{self.rate:g}",
            "n": len(done),
            "req/s": len(done) / self.wall_s,
            "out tok/s": out / self.wall_s,
            "ttft p50": pct([r.ttft for r in done if r.ttft is not None], 0.5),
            "ttft p99": pct([r.ttft for r in done if r.ttft is not None], 0.99),
            "tpot p50": pct(tpot, 0.5),
            "tpot p99": pct(tpot, 0.99),
            "itl p50": pct(itl, 0.5),
            "itl p99": pct(itl, 0.99),
            "e2e p50": pct([r.e2e for r in done], 0.5),
            "e2e p99": pct([r.e2e for r in done], 0.99),
        }


def longest(prompts, k: int = 8):
    """The k longest prompts: a warm-up with them captures decode graphs wide enough for every request."""
    return sorted(prompts, key=len)[-k:]


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def count_for(rate: float, num_prompts: int, max_arrival_s: float) -> int:
    return num_prompts if math.isinf(rate) else max(1, min(num_prompts, int(rate * max_arrival_s)))


async def drive_engine(engine: AsyncEngine, prompts, offsets, params) -> RunResult:
    records = [RequestRecord(0.0) for _ in prompts]
    start = time.perf_counter() + 0.05

    async def one(i):
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = records[i]
        rec.send = last = time.perf_counter()
        async for event in engine.generate(prompts[i], params):
            if event.token_ids:
                now = time.perf_counter()
                if rec.ttft is None:
                    rec.ttft = now - rec.send
                else:
                    rec.itl.append(now - last)
                last = now
                rec.tokens += len(event.token_ids)
        rec.e2e = time.perf_counter() - rec.send

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    end = max(r.send + r.e2e for r in records)
    return RunResult("hf_paged AsyncEngine", 0.0, records, end - min(r.send for r in records))


def run_offline(model, prompts, params, options) -> RunResult:
    gen = ContinuousGenerator(model, progress=False, **options)
    gen.generate(longest(prompts), params)  # warm-up: kernels, and graphs as wide as the real run's
    # Two timed runs, the second reported: the first still pays one-off costs (Triton compiles of step
    # shapes the warm-up did not meet), which the engine runs, measured after it, no longer pay.
    for _ in range(2):
        gen.reset_prefix_cache()
        t0 = time.perf_counter()
        results = gen.generate(prompts, params)
        wall = time.perf_counter() - t0
        print(f"offline run: {sum(len(r.token_ids) for r in results) / wall:,.0f} out tok/s", flush=True)
    records = [RequestRecord(0.0, r.ttft_s, r.latency_s, len(r.token_ids)) for r in results]
    gen.close()  # the engine runs next and sizes its own pool from the free memory
    return RunResult("hf_paged ContinuousGenerator (offline)", math.inf, records, wall)


def run_hf_manager(model, prompts, offsets, new_tokens) -> RunResult:
    """transformers' ContinuousBatchingManager (public API) fed the same arrivals from a thread."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    records = [RequestRecord(0.0) for _ in prompts]
    ids = {}
    try:
        start = time.perf_counter() + 0.05

        def feeder():
            for i, p in enumerate(prompts):
                delay = start + offsets[i] - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                records[i].send = time.perf_counter()
                rid = f"bench-{i}"
                ids[rid] = i
                try:
                    manager.add_request(p, request_id=rid, max_new_tokens=new_tokens, record_timestamps=True)
                except TypeError:  # older transformers: no per-token timestamps
                    manager.add_request(p, request_id=rid, max_new_tokens=new_tokens)

        thread = threading.Thread(target=feeder, daemon=True)
        thread.start()
        finished = 0
        deadline = time.perf_counter() + 900
        while finished < len(prompts) and time.perf_counter() < deadline:
            result = manager.get_result(timeout=1.0)
            if result is None or not result.is_finished():
                continue
            now = time.perf_counter()
            rec = records[ids[result.request_id]]
            rec.tokens = len(result.generated_tokens)
            rec.e2e = now - rec.send
            stamps = getattr(result, "timestamps", None)
            if stamps:
                rec.ttft = stamps[0] - rec.send
                rec.itl = [b - a for a, b in zip(stamps, stamps[1:])]
            finished += 1
        thread.join()
    finally:
        manager.stop(block=True)
    done = [r for r in records if r.e2e is not None]
    end = max(r.send + r.e2e for r in done)
    return RunResult("transformers ContinuousBatchingManager", 0.0, records, end - min(r.send for r in records))


def render(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:,.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rates", default="4,16,inf", help="requests/s, comma separated; inf = all at once")
    p.add_argument("--max-arrival-s", type=float, default=20.0)
    p.add_argument("--hf-rates", default="", help="rates at which to run transformers' manager too")
    p.add_argument("--hf-num-prompts", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--no-offline", action="store_true")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    model = build_model(args.model, args.device, dtype)
    vocab = model.config.vocab_size
    prompts = Workload(args.num_prompts, args.min_len, args.max_len, args.new_tokens).prompts(vocab)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    options = dict(max_num_seqs=args.max_num_seqs)
    rates = [float(r) for r in args.rates.split(",") if r]
    hf_rates = [float(r) for r in args.hf_rates.split(",") if r]
    rows = []
    print(f"torch {torch.__version__}, device {args.device}, model {args.model}, {len(prompts)} prompts "
          f"U[{args.min_len},{args.max_len}] -> {args.new_tokens}", flush=True)

    if not args.no_offline:
        rows.append(run_offline(model, prompts, params, options).row())
        print(render(rows[-1:]), flush=True)

    async def engine_runs():
        out = []
        async with AsyncEngine(model, **options) as engine:
            warm = await drive_engine(engine, longest(prompts), [0.0] * 8, params)  # kernels, full-width graphs
            del warm
            for rate in rates:
                engine.core.pool.allocator.clear_cache()  # no prefix hits across rates
                n = count_for(rate, len(prompts), args.max_arrival_s)
                res = await drive_engine(engine, prompts[:n], arrivals(n, rate, seed=1), params)
                res.rate = rate
                out.append(res.row())
                print(render(out[-1:]), flush=True)
            for rate in hf_rates:  # the same subset the manager runs, for a like-for-like row
                n = min(args.hf_num_prompts, count_for(rate, len(prompts), args.max_arrival_s))
                engine.core.pool.allocator.clear_cache()
                res = await drive_engine(engine, prompts[:n], arrivals(n, rate, seed=1), params)
                res.rate = rate
                res.system += f" (first {n})"
                out.append(res.row())
                print(render(out[-1:]), flush=True)
        return out

    rows += asyncio.run(engine_runs())
    torch.cuda.empty_cache() if args.device == "cuda" else None
    for rate in hf_rates:
        n = min(args.hf_num_prompts, count_for(rate, len(prompts), args.max_arrival_s))
        res = run_hf_manager(model, prompts[:n], arrivals(n, rate, seed=1), args.new_tokens)
        res.rate = rate
        res.system += f" (first {n})"
        rows.append(res.row())
        print(render(rows[-1:]), flush=True)

    print("\n" + render(rows))
    offline = next((r for r in rows if r["system"].startswith("hf_paged ContinuousGenerator")), None)
    online = next((r for r in rows if r["system"] == "hf_paged AsyncEngine" and r["rate"] == "inf"), None)
    if offline and online:
        print(f"\nonline at saturation / offline: {online['out tok/s'] / offline['out tok/s']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
