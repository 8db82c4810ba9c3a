"""Tensor-parallel throughput: ContinuousGenerator on a model loaded with transformers' TP plan.

One configuration per launch; every rank runs this script (rank 0 schedules and measures, the others
run ``hf_paged.run_worker`` for each engine phase and join HF ``generate`` in lockstep)::

    # 2 GPUs, Llama-3.1-8B shape: TP=1, then TP=2 (the second run prints both side by side)
    torchrun --nproc-per-node 1 benchmarks/gpu_tp.py --shape llama-8b --out /tmp/tp1.json
    torchrun --nproc-per-node 2 benchmarks/gpu_tp.py --shape llama-8b --out /tmp/tp2.json --compare /tmp/tp1.json

    # 4 GPUs, Llama-70B shape (does not fit one GPU), against HF static generate under the same plan
    # (HF on the first 128 prompts: its eager 80-layer decode would take most of the time budget)
    torchrun --nproc-per-node 4 benchmarks/gpu_tp.py --shape llama-70b --hf --hf-num-prompts 128 --out /tmp/tp4_70b.json

    # CPU smoke test of the script itself (gloo, tiny shape)
    torchrun --nproc-per-node 2 benchmarks/gpu_tp.py --shape tiny --num-prompts 8 --max-len 64 --new-tokens 8 --hf

Random weights, built sharded: rank 0 writes a checkpoint folder holding the config and a single
tensor, and ``from_pretrained(folder, tp_plan="auto")`` initialises every missing weight on its own
rank's shard, so no rank ever holds the whole model (checked: the script stops if a rank's weights
take more than 1.5x its share). Same seed on every rank: replicated weights agree.

Phases (each printed as it ends; the table comes last):
1. graph check: 16 prompts x 32 new with decode CUDA graphs off, then on (the model's all-reduces
   captured in the graphs): how many prompts get identical greedy tokens, and both times;
2. throughput: the workload (256 prompts U[64,1024] -> 256 new, greedy, EOS ignored), after a warm-up
   and a capture of every decode graph;
3. single stream: one 512-token prompt -> 256 new: TPOT;
4. with ``--hf``: HF static ``generate`` under the same TP plan, left-padded batches of
   ``--hf-batch-size`` (the first ``--hf-num-prompts`` prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from hf_paged.entrypoints.bench import SHAPES as BENCH_SHAPES

# The single-GPU benchmark's shapes (the tiny one untied: each rank then owns its own LM-head shard),
# plus the Llama-3.1-70B layer shape, which needs several GPUs.
SHAPES = {
    "tiny": {**BENCH_SHAPES["tiny"], "tie_word_embeddings": False},
    "llama-8b": BENCH_SHAPES["llama-8b"],
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}


def log(msg: str) -> None:
    if RANK == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def init() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 or "RANK" in os.environ:
        if torch.cuda.is_available():
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=CPU_GROUP)


def build(shape: str, world: int, device: torch.device, dtype: torch.dtype, path: str | None = None):
    """The random-weight model (or the checkpoint at ``path``), loaded sharded over the ranks (whole on
    one GPU when world == 1)."""
    import transformers
    from safetensors.torch import save_file

    folder = path or f"/tmp/hf_paged_gpu_tp_{shape}"
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0)
    if RANK == 0 and path is None:
        os.makedirs(folder, exist_ok=True)
        config.save_pretrained(folder)
        # One tensor present, every other weight missing: from_pretrained initialises those on each
        # rank's own shard (a full checkpoint of the 70B shape would be 140 GB of random numbers).
        save_file({"model.norm.weight": torch.ones(config.hidden_size, dtype=dtype)}, f"{folder}/model.safetensors",
                  metadata={"format": "pt"})
    barrier()
    torch.manual_seed(0)  # the same on every rank: replicated weights (embeddings, norms) agree
    start = time.perf_counter()
    if world > 1:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=str(device))
    model.eval()
    model.generation_config.eos_token_id = None  # every request generates exactly new_tokens
    model.generation_config.pad_token_id = 0
    load_s = time.perf_counter() - start

    full = sum(_numel_full(p) for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    local = sum(_numel_local(p) for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    share = full / world
    shares = _gather_float(local / share)
    log(f"loaded in {load_s:.0f} s: {full / 2**30:.1f} GiB of weights, per rank {local / 2**30:.1f} GiB "
        f"({', '.join(f'{s:.2f}' for s in shares)} x its share)")
    if max(shares) > 1.5:
        raise SystemExit(
            "a rank holds far more than its share of the weights: this transformers version did not shard the "
            "weights it initialised. Write a real checkpoint (save_pretrained) and load that instead."
        )
    return model, load_s, full


def _numel_full(p: torch.Tensor) -> int:
    return p.numel()  # a DTensor reports its global shape


def _numel_local(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _gather_float(x: float) -> list[float]:
    if not dist.is_initialized():
        return [x]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x, group=CPU_GROUP)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument("--model-path", help="load this checkpoint folder instead of random weights of --shape")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--hf", action="store_true", help="also run HF static generate under the same TP plan")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--hf-num-prompts", type=int, default=None, help="prompts for HF (default: all)")
    p.add_argument("--no-graph-check", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true", help="phases 2-3 without decode CUDA graphs")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--compare", default=None, help="a JSON written by another run: printed side by side")
    args = p.parse_args()

    global RANK, CPU_GROUP
    RANK, world, device = init()
    CPU_GROUP = dist.new_group(backend="gloo") if dist.is_initialized() else None
    import hf_paged
    from hf_paged import ContinuousGenerator, SamplingParams
    from hf_paged.entrypoints.bench import Workload, left_padded

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, load_s, weight_bytes = build(args.shape, world, device, dtype, args.model_path)
    vocab = model.config.vocab_size
    workload = Workload(args.num_prompts, args.min_len, args.max_len, args.new_tokens)
    prompts = workload.prompts(vocab)
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    opts = dict(progress=False, max_num_seqs=args.max_num_seqs)
    main_opts = dict(opts, cuda_graphs=not args.no_cuda_graphs)
    row: dict = {"shape": args.model_path or args.shape, "tp": world, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "load_s": load_s, "weights_gib": weight_bytes / 2**30}
    run_worker = hf_paged.run_worker  # ranks > 0: one call per generator rank 0 opens

    # 1. graph check: graphs off, then on, same prompts
    if not args.no_graph_check:
        check = prompts[:16]
        check_params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
        outs, times = {}, {}
        for graphs in (False, True):
            if RANK != 0:
                run_worker(model)
                continue
            with ContinuousGenerator(model, cuda_graphs=graphs, **opts) as gen:
                gen.generate(check[:2], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))
                sync(device)
                t = time.perf_counter()
                outs[graphs] = [r.token_ids for r in gen.generate(check, check_params)]
                sync(device)
                times[graphs] = time.perf_counter() - t
        if RANK == 0:
            same = sum(a == b for a, b in zip(outs[False], outs[True]))
            row["graph_check"] = {"same_tokens": f"{same}/{len(check)}", "eager_s": times[False], "graphs_s": times[True]}
            log(f"graph check: {same}/{len(check)} prompts with identical greedy tokens; 16x32 tokens in "
                f"{times[False]:.2f} s eager, {times[True]:.2f} s with graphs")

    # 2. throughput and 3. single stream, in one generator (one session)
    if RANK != 0:
        run_worker(model)
    else:
        with ContinuousGenerator(model, **main_opts) as gen:
            gen.generate(prompts[:64], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
            gen.reset_prefix_cache()
            gen.runner.prepare(max(map(len, prompts)) + args.new_tokens)
            t = time.perf_counter()
            gen.runner.capture_graphs()  # every bucket now, on every rank, not mid-run
            sync(device)
            row["graph_capture_s"] = time.perf_counter() - t
            t = time.perf_counter()
            results = gen.generate(prompts, greedy)
            sync(device)
            wall = time.perf_counter() - t
            out_tokens = sum(len(r.token_ids) for r in results)
            tpot = [(r.latency_s - r.ttft_s) / (len(r.token_ids) - 1) for r in results if len(r.token_ids) > 1]
            stats = gen.stats
            row["throughput"] = {
                "out_tok_s": out_tokens / wall, "wall_s": wall, "out_tokens": out_tokens,
                "prompt_tokens": sum(map(len, prompts)), "tpot_p50_ms": 1e3 * statistics.median(tpot),
                "ttft_p50_s": statistics.median(r.ttft_s for r in results), "preemptions": stats.preemptions,
                "kv_blocks_total": stats.kv_blocks_total, "kv_blocks_peak": stats.kv_blocks_peak,
            }
            log(f"throughput: {out_tokens / wall:,.0f} out tok/s ({wall:.1f} s), KV pool {stats.kv_blocks_total} "
                f"blocks, peak {stats.kv_blocks_peak}, {stats.preemptions} preemptions")
            one = [(prompts[0] * (512 // len(prompts[0]) + 1))[:512]]  # a 512-token prompt
            gen.generate(one, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
            t = time.perf_counter()
            r = gen.generate(one, greedy)[0]
            sync(device)
            row["single_stream"] = {"tpot_ms": 1e3 * (r.latency_s - r.ttft_s) / (len(r.token_ids) - 1),
                                    "ttft_ms": 1e3 * r.ttft_s}
            log(f"single stream: TPOT {row['single_stream']['tpot_ms']:.2f} ms, TTFT {row['single_stream']['ttft_ms']:.1f} ms")
        if device.type == "cuda":
            row["peak_mem_gib_rank0"] = torch.cuda.max_memory_allocated() / 2**30

    # 4. HF static generate, every rank in lockstep (transformers' TP contract)
    if args.hf:
        hf_prompts = prompts[: args.hf_num_prompts or len(prompts)]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        model.generate(**left_padded(hf_prompts[:2], device), max_new_tokens=2, do_sample=False)  # warm-up
        sync(device)
        barrier()
        t = time.perf_counter()
        for i in range(0, len(hf_prompts), args.hf_batch_size):
            with torch.inference_mode():
                model.generate(**left_padded(hf_prompts[i : i + args.hf_batch_size], device), **kwargs)
        sync(device)
        wall = time.perf_counter() - t
        out_tokens = len(hf_prompts) * args.new_tokens
        row["hf_static"] = {"out_tok_s": out_tokens / wall, "wall_s": wall, "num_prompts": len(hf_prompts),
                            "batch_size": args.hf_batch_size}
        log(f"HF static generate: {out_tokens / wall:,.0f} out tok/s ({wall:.1f} s, {len(hf_prompts)} prompts)")

    if RANK == 0:
        rows = [row]
        if args.compare:
            with open(args.compare) as f:
                rows.insert(0, json.load(f))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(row, f, indent=1)
        print(render(rows, args), flush=True)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def render(rows: list[dict], args) -> str:
    lines = [
        f"\n{args.num_prompts} prompts U[{args.min_len},{args.max_len}] -> {args.new_tokens} new, greedy, random weights",
        "| shape | TP | GPU | out tok/s | TPOT p50 (batch) ms | single-stream TPOT ms | HF static out tok/s | x HF "
        "| graph check (eager/graphs) | capture s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        thr, one, hf, gc = r.get("throughput", {}), r.get("single_stream", {}), r.get("hf_static"), r.get("graph_check", {})
        ours = thr.get("out_tok_s", float("nan"))
        hf_tok = f"{hf['out_tok_s']:,.0f}" if hf else "-"
        ratio = f"{ours / hf['out_tok_s']:.1f}x" if hf else "-"
        check = f"{gc['same_tokens']} same, {gc['eager_s']:.2f}/{gc['graphs_s']:.2f} s" if gc else "-"
        lines.append(
            f"| {r['shape']} | {r['tp']} | {r['gpu']} | {ours:,.0f} | {thr.get('tpot_p50_ms', float('nan')):.1f} | "
            f"{one.get('tpot_ms', float('nan')):.2f} | {hf_tok} | {ratio} | {check} | {r.get('graph_capture_s', 0):.0f} |"
        )
    if len(rows) == 2 and rows[0].get("throughput") and rows[1].get("throughput"):
        a, b = rows[0], rows[1]
        lines.append(
            f"TP={b['tp']} vs TP={a['tp']}: throughput {b['throughput']['out_tok_s'] / a['throughput']['out_tok_s']:.2f}x, "
            f"single-stream TPOT {b['single_stream']['tpot_ms'] / a['single_stream']['tpot_ms']:.2f}x"
        )
    return "\n".join(lines)


RANK = 0
CPU_GROUP = None

if __name__ == "__main__":
    sys.exit(main())
