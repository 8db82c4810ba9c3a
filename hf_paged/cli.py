"""``hf-paged`` command line: ``demo`` (the main job) and ``bench`` (throughput comparison)."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main_demo

        if args.command is None:
            args = build_parser().parse_args(["demo"])
        return main_demo(args)
    raise SystemExit(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
