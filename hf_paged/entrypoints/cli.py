"""``hf-paged`` command line: ``demo`` (the main job), ``bench`` (throughput comparison) and ``serve``
(an OpenAI-compatible HTTP server).

Arguments are checked before anything heavy is imported: ``hf-paged --help`` and a bad argument answer
at once with argparse's one-line error; torch and transformers load only when a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..options import COMPILE_MODES

# Accepted --dtype spellings -> torch dtype names.
DTYPES = {
    "float64": "float64", "double": "float64", "fp64": "float64",
    "float32": "float32", "float": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "half": "float16", "fp16": "float16",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-paged`` parser. A subcommand is one ``_add_*`` function calling ``_subcommand``: the
    subparser's command (a "module:function", imported when it runs) and, optionally, checks that need
    more than argparse's types (functions of ``args`` that return an error message or None)."""
    parser = argparse.ArgumentParser(
        prog="hf-paged",
        description="PagedAttention and continuous batching for Hugging Face models. "
        "With no command, runs the demo; `hf-paged COMMAND --help` lists a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # plain `hf-paged` runs the demo with its defaults
        args = parser.parse_args(["demo"])
    for check in args.checks:
        error = check(args)
        if error:
            args.subparser.error(error)  # usage + one "error:" line, exit status 2
    return args.run(args)


# ---- subcommands ---------------------------------------------------------------------------------


def _subcommand(sub, name: str, run: str, *checks: Callable, **kwargs) -> argparse.ArgumentParser:
    """A subparser whose command is ``run`` ("module:function", imported when it runs)."""
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(run=_lazy(run), checks=checks, subparser=parser)
    return parser


def _lazy(target: str) -> Callable:
    module, function = target.split(":")

    def run(args):
        return getattr(importlib.import_module(module, __package__), function)(args)

    return run


def _add_demo(sub) -> None:
    demo = _subcommand(
        sub, "demo", ".demo:main_demo", _check_device, _check_demo_model,
        help="stock generate vs enable()+generate: check tokens agree, report speed and KV memory",
    )  # fmt: skip
    demo.add_argument("--model", help="local model folder (default: the embedded random-weight Llama)")
    _add_device_dtype(demo, "float64 on CPU (exact token check), bfloat16 on CUDA")
    demo.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per batch (default 8)")
    demo.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens generated per prompt (default 32)")
    demo.add_argument("--block-size", type=_block_size, default=16, help="tokens per KV block, a multiple of 16 (default 16)")


def _add_bench(sub) -> None:
    bench = _subcommand(
        sub, "bench", ".bench:main_bench", _check_device, _check_bench_model, _check_bench_workload, _check_systems,
        _check_plot, help="ContinuousGenerator vs HF generate vs HF generate_batch, side by side",
    )  # fmt: skip
    bench.add_argument("--model", default="tiny",
                       help="tiny | llama-1b | llama-8b (random weights, no download) or a local model folder")  # fmt: skip
    _add_device_dtype(bench, "float32 on CPU, bfloat16 on CUDA")
    bench.add_argument("--num-prompts", type=_positive_int, default=32)
    bench.add_argument("--min-len", type=_positive_int, default=16, help="shortest prompt, tokens")
    bench.add_argument("--max-len", type=_positive_int, default=128, help="longest prompt, tokens")
    bench.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens generated per prompt")
    bench.add_argument("--hf-batch-size", type=_positive_int, default=16, help="batch size of the static generate systems")
    bench.add_argument("--max-num-seqs", type=_positive_int, default=512)
    bench.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192)
    bench.add_argument("--systems", default="continuous,hf_static,hf_generate_batch,enable_generate",
                       help="comma-separated, from: continuous, hf_static, hf_generate_batch, enable_generate")  # fmt: skip
    bench.add_argument("--profile", action="store_true", help="print where each ContinuousGenerator step's time goes")
    bench.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    bench.add_argument("--no-prefix-caching", action="store_true", help="turn ContinuousGenerator's prefix cache off")
    bench.add_argument("--fuse-elementwise", action="store_true", help="torch.compile the model's norms and MLPs (CUDA)")
    bench.add_argument("--no-async-scheduling", action="store_true",
                       help="ContinuousGenerator reads each step's tokens back before scheduling the next one")
    bench.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                       help="torch.compile ContinuousGenerator's decoder layers: auto (all on one CUDA GPU for "
                            "supported models), off, decode or all")  # fmt: skip
    bench.add_argument("--plot", metavar="PNG",
                       help='also sweep ContinuousGenerator over concurrency and plot every system to this PNG '
                            '(needs matplotlib: pip install "hf_paged[plot]")')  # fmt: skip


def _add_serve(sub) -> None:
    from ..server.main import add_serve_arguments  # argparse only: the server loads when the command runs

    serve = _subcommand(sub, "serve", "..server.main:main_serve",
                        help='OpenAI-compatible HTTP server (needs: pip install "hf_paged[serve]")',
                        description="OpenAI-compatible HTTP server over the online engine. The engine's step loop "
                                    "runs in a process of its own (loading the model there), so that the server's "
                                    "HTTP, SSE and text work never slows a step; --no-engine-process keeps it in "
                                    "the server's process.")  # fmt: skip
    add_serve_arguments(serve)


def _add_device_dtype(parser: argparse.ArgumentParser, dtype_default: str) -> None:
    parser.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", type=_dtype, help=f"float64, float32, bfloat16 or float16 (default: {dtype_default})")


# ---- argument types (argparse turns their ArgumentTypeError into a one-line error) --------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _block_size(text: str) -> int:
    value = _positive_int(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 (the kernels' tile), got {text!r}")
    return value


def _dtype(text: str) -> str:
    name = DTYPES.get(text.lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from float64, float32, bfloat16, float16")
    return name


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
    return text


# ---- checks that need more than one argument or the machine ------------------------------------------


def _check_device(args) -> str | None:
    if args.device is None or not args.device.startswith("cuda"):
        return None
    import torch  # only now: asking about CUDA needs torch (but not transformers)

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return f"--device {args.device}: torch {torch.__version__} ({build}) sees no CUDA device; use --device cpu"
    index = int(args.device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


def _check_demo_model(args) -> str | None:
    if args.model is None:
        return None
    folder, error = _local_model(args.model, "the embedded default (no --model)")
    args.model = folder
    return error


def _check_bench_model(args) -> str | None:
    from .bench import SHAPES

    if args.model in SHAPES:
        return None
    folder, error = _local_model(args.model, f"one of the random-weight shapes ({', '.join(SHAPES)})")
    args.model = folder
    return error


def _local_model(name: str, alternative: str) -> tuple[str, str | None]:
    """A model folder for ``name``: the folder itself, or its snapshot in the Hugging Face cache.

    Nothing is downloaded: a benchmark or demo that first spends minutes on the network (or times out
    on an offline machine) is worse than an immediate answer.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return name, f"--model {name}: the folder has no config.json (not a saved transformers model)"
        return str(path), None
    cached = _cached_snapshot(name)
    if cached is not None:
        return cached, None
    return name, (
        f"--model {name!r} is not a local folder (nor in the Hugging Face cache); only local folders and "
        f"{alternative} work offline: download it first (hf download {name} --local-dir DIR) and pass DIR"
    )


def _cached_snapshot(repo_id: str) -> str | None:
    """The cached snapshot folder of a Hub model id, if its config.json is in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id, or no huggingface_hub: not cached either way
        return None
    return str(Path(hit).parent) if isinstance(hit, str) else None


def _check_bench_workload(args) -> str | None:
    if args.min_len > args.max_len:
        return f"--min-len {args.min_len} is larger than --max-len {args.max_len}"
    limit = _max_positions(args.model)
    if limit is not None and args.max_len + args.new_tokens > limit:
        return (f"--max-len {args.max_len} + --new-tokens {args.new_tokens} = {args.max_len + args.new_tokens} "
                f"tokens, more than the model's {limit} positions")  # fmt: skip
    return None


def _max_positions(model: str) -> int | None:
    from .bench import MAX_POSITIONS, SHAPES

    if model in SHAPES:
        return MAX_POSITIONS
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings", config.get("text_config", {}).get("max_position_embeddings"))
    return value if isinstance(value, int) else None


def _check_systems(args) -> str | None:
    from .bench import SYSTEMS

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names:
        return f"--systems: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(SYSTEMS)}"
    args.systems = ",".join(dict.fromkeys(names))
    return None


def _check_plot(args) -> str | None:
    if not args.plot:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return '--plot needs matplotlib, which is not installed: pip install "hf_paged[plot]"'
    folder = Path(args.plot).expanduser().resolve().parent
    if not folder.is_dir():
        return f"--plot {args.plot}: the folder {folder} does not exist"
    return None


if __name__ == "__main__":
    sys.exit(main())
