"""Single-stream ``generate`` on one GPU: stock paths vs ``enable()``, one model, one process.

    PYTHONPATH=. python benchmarks/gpu_single_stream.py [--shape llama-8b] [--prompt 512] [--new 256]

1. Parity (float32 tiny Llama, head_dim 64, CUDA): stock ``generate`` vs ``enable()`` with decode CUDA
   graphs, a left-padded batch greedy and with beams, token for token; the graphs must have been used.
2. Speed (random-weight shape in bfloat16, one request, ``--prompt`` tokens -> ``--new`` new tokens,
   greedy, no EOS): stock dynamic cache; stock static cache + ``torch.compile`` (transformers' automatic
   compile of the decode forward, ``cache_implementation="static"``); ``enable()`` eager
   (``cuda_graphs=False``); ``enable()`` with decode CUDA graphs; ``enable(compile="decode")``: the graphs
   capture ``torch.compile`` of the forward. Each system runs once to warm up (compile, capture) and is
   then timed; its tokens are compared with stock dynamic's.

Prints a table last: tok/s, ms/token, whether the tokens match stock dynamic (else the first position
that differs; bfloat16 near-ties can flip between attention kernels) and ``enable()``'s graph counters.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import hf_paged
from hf_paged.entrypoints.bench import build_model


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().cuda().eval()
    model.generation_config.pad_token_id = 0
    return model


def parity() -> list[str]:
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    lens = [5, 40, 3, 17]
    ids = torch.zeros((len(lens), max(lens)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lens):
        ids[row, -n:] = torch.randint(3, 128, (n,), generator=g)
        mask[row, -n:] = 1
    batch = dict(input_ids=ids.cuda(), attention_mask=mask.cuda())
    lines = []
    cases = [("greedy, 4 left-padded rows", {}, "off"), ("beams=3, 4 rows", dict(num_beams=3), "off"),
             ("greedy, 4 left-padded rows, compile='decode'", {}, "decode")]
    for label, extra, compile_mode in cases:
        kwargs = dict(max_new_tokens=24, do_sample=False, **extra)
        stock = model.generate(**batch, **kwargs)
        hf_paged.enable(model, num_blocks=256, compile=compile_mode)
        graphs = model._hf_paged_state.graphs
        try:
            paged = model.generate(**batch, **kwargs)
            paged2 = model.generate(**batch, **kwargs)  # the second call replays the captured graph
        finally:
            hf_paged.disable(model)
        ok = torch.equal(stock, paged) and torch.equal(stock, paged2)
        lines.append(f"parity fp32 {label}: {'same tokens' if ok else 'DIFFERENT TOKENS'} "
                     f"(graphs captured {graphs.captures}, steps replayed {graphs.replays})")
    return lines


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape == b.shape and torch.equal(a, b):
        return "yes"
    n = min(a.shape[-1], b.shape[-1])
    diff = (a[0, :n] != b[0, :n]).nonzero()
    return f"no (first at {int(diff[0]) if len(diff) else n})"


def timed(model, ids, new, **kwargs) -> tuple[torch.Tensor, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, **kwargs)
    torch.cuda.synchronize()
    return out[:, ids.shape[1]:], time.perf_counter() - start


def replay_ms(graphs) -> str:
    """GPU time of one decode graph replayed back to back (the step without generate's host work). Its
    K/V writes repeat the last step's values into blocks the finished call gave back: harmless here."""
    captured = [g.graph for g in graphs._graphs.values() if g.graph is not None]
    if not captured:
        return "no graph"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    captured[-1].replay()
    start.record()
    for _ in range(50):
        captured[-1].replay()
    end.record()
    end.synchronize()
    return f"GPU {start.elapsed_time(end) / 50:.2f} ms per replay"


def host_us(fn, n: int = 200) -> float:
    """Host microseconds per call of ``fn`` (launch cost: the GPU work of one decode call is shorter)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * host / n


def launch_overhead(model, prompt: int) -> list[str]:
    """What one layer's attention costs the host in an eager decode step (batch 1), paged vs stock: the
    K/V write plus the attention call, each through its attention-interface entry point."""
    from transformers.cache_utils import DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_paged.integration import attention
    from hf_paged.integration.cache import PagedCache
    from hf_paged.memory.metadata import build_step_metadata

    module = model.model.layers[0].self_attn
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype, device = torch.bfloat16, torch.device("cuda")
    q = torch.randn(1, heads, 1, dim, dtype=dtype, device=device)
    k = torch.randn(1, kv_heads, 1, dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    pool = model._hf_paged_state.pool
    blocks = list(range(-(-(prompt + 1) // pool.block_size)))
    meta = lambda: build_step_metadata([1], [prompt + 1], [blocks], pool.block_size, device)  # noqa: E731
    paged = PagedCache.for_external_steps(pool, config.num_hidden_layers)
    paged.set_step(meta())
    scaling = dim**-0.5

    def paged_layer():
        paged.update(k, v, 0)
        with attention.active_cache(paged):
            attention.paged_attention_forward(module, q, k, v, None, scaling=scaling)

    stock = DynamicCache()
    stock.update(torch.randn(1, kv_heads, prompt, dim, dtype=dtype, device=device),
                 torch.randn(1, kv_heads, prompt, dim, dtype=dtype, device=device), 0)

    def stock_layer():
        keys, values = stock.update(k, v, 0)
        sdpa_attention_forward(module, q, keys, values, None, scaling=scaling)
        stock.crop(-1)  # keep the length fixed

    def write_only():
        pool.write(0, k[0].transpose(0, 1), v[0].transpose(0, 1), paged.step.slot_mapping)

    return [
        f"host us per layer, eager decode: paged write+attention {host_us(paged_layer):.0f} "
        f"(write alone {host_us(write_only):.0f}) vs stock DynamicCache update+sdpa {host_us(stock_layer):.0f}; "
        f"paged step metadata (once per step) {host_us(meta):.0f}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--skip-compile", action="store_true", help="leave out both compiled rows")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    lines = parity()
    for line in lines:
        print(line, flush=True)

    model = build_model(args.shape, "cuda", torch.bfloat16)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0)).cuda()
    rows = []  # (system, tokens, seconds, note)

    def run(system, warm_kwargs, note=lambda: "", **kwargs):
        start = time.perf_counter()
        timed(model, ids, args.new, **warm_kwargs, **kwargs)  # warm-up: same shapes (compile, capture)
        warm = time.perf_counter() - start
        tokens, seconds = timed(model, ids, args.new, **kwargs)
        rows.append((system, tokens, seconds, f"warm-up {warm:.1f} s" + note()))
        print(f"{system}: {args.new / seconds:.1f} tok/s", flush=True)

    run("stock, dynamic cache", {})
    if not args.skip_compile:
        run("stock, static cache + compile", {}, cache_implementation="static")
    hf_paged.enable(model, num_blocks=1024, cuda_graphs=False)
    run("enable(), eager", {})
    lines += launch_overhead(model, args.prompt)
    print(lines[-1], flush=True)
    hf_paged.enable(model, num_blocks=1024)  # new options: disable + enable
    graphs = model._hf_paged_state.graphs
    run("enable(), decode CUDA graphs", {},
        note=lambda: f"; graphs captured {graphs.captures} in {graphs.capture_seconds:.1f} s, steps replayed "
                     f"{graphs.replays}; {replay_ms(graphs)}")
    if not args.skip_compile:
        hf_paged.enable(model, num_blocks=1024, compile="decode")
        graphs = model._hf_paged_state.graphs
        run("enable(compile='decode'), decode CUDA graphs", {},
            note=lambda: f"; graphs captured {graphs.captures} in {graphs.capture_seconds:.1f} s (compile included), "
                         f"steps replayed {graphs.replays}; {replay_ms(graphs)}")
    hf_paged.disable(model)

    reference = rows[0][1]
    print()
    for line in lines:
        print(line)
    print(f"\n{args.shape} bf16, one request {args.prompt} -> {args.new} new tokens, greedy\n")
    print("| system | tok/s | ms/token | tokens = stock dynamic | notes |")
    print("|---|---|---|---|---|")
    for system, tokens, seconds, note in rows:
        print(f"| {system} | {args.new / seconds:.1f} | {1e3 * seconds / args.new:.2f} | "
              f"{first_difference(tokens, reference)} | {note} |")


if __name__ == "__main__":
    main()
