"""``hf-paged`` command line: ``demo`` (the main job), ``bench`` (throughput comparison) and ``serve`` (OpenAI-compatible server)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-paged", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="stock generate vs enable()+generate: check tokens agree, report speed and KV memory")
    demo.add_argument("--model", help="local model folder (default: the embedded random-weight Llama)")
    demo.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--dtype", help="float64 (CPU default), float32, bfloat16 (CUDA default), float16")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--new-tokens", type=int, default=32)
    demo.add_argument("--block-size", type=int, default=16)
    bench = sub.add_parser("bench", help="ContinuousGenerator vs HF generate vs HF generate_batch, side by side")
    bench.add_argument("--model", default="tiny", help="tiny | llama-1b | llama-8b (random weights) or a local model folder")
    bench.add_argument("--device")
    bench.add_argument("--dtype")
    bench.add_argument("--num-prompts", type=int, default=32)
    bench.add_argument("--min-len", type=int, default=16)
    bench.add_argument("--max-len", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--hf-batch-size", type=int, default=16)
    bench.add_argument("--max-num-seqs", type=int, default=512)
    bench.add_argument("--max-num-batched-tokens", type=int, default=8192)
    bench.add_argument("--systems", default="continuous,hf_static,hf_generate_batch,enable_generate")
    bench.add_argument("--profile", action="store_true", help="print where each ContinuousGenerator step's time goes")
    bench.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    bench.add_argument("--no-prefix-caching", action="store_true", help="turn ContinuousGenerator's prefix cache off")
    bench.add_argument("--fuse-elementwise", action="store_true", help="torch.compile the model's norms and MLPs (CUDA)")
    bench.add_argument("--plot", help="write a PNG of throughput vs concurrency to this path")
    from ..server.main import add_serve_arguments  # argparse only; the server itself is imported when run

    add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs hf_paged[serve])"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main_demo

        if args.command is None:
            args = build_parser().parse_args(["demo"])
        return main_demo(args)
    if args.command == "bench":
        from .bench import main_bench

        return main_bench(args)
    if args.command == "serve":
        from ..server.main import main_serve

        return main_serve(args)
    raise SystemExit(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
