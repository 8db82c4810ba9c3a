"""``hf-paged serve``: load a model, start the engine, serve the OpenAI API with uvicorn.

The engine's step loop runs in a child process of its own by default (``AsyncEngine.from_spec``): the
HTTP server's Python (requests, SSE chunks, text for every stream) then never holds up a step.
``--no-engine-process`` runs it in a thread of the server's process instead; so does tensor parallelism
(rank 0 serves HTTP and schedules in one process).

Shutdown (SIGTERM or Ctrl-C): the listening socket closes, ``/health`` and new requests answer 503,
requests in flight finish (up to ``--shutdown-timeout`` seconds; then they are aborted), the engine
frees its pool (its process exits), and the server exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

from ..engine.model_spec import EMBEDDED_NAME  # a light module: --help stays fast
from ..options import COMPILE_MODES


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options (kept here so the CLI imports nothing heavy)."""
    parser.add_argument("model_path", nargs="?", help="local model folder (model + tokenizer); default: the embedded "
                        "random-weight Llama with its built-in tokenizer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at startup)")
    parser.add_argument("--api-key", action="append", default=[], help="require 'Authorization: Bearer KEY' on /v1/* "
                        "(repeat for several keys; /health and /metrics stay open)")
    parser.add_argument("--served-model-name", help="the name clients send as 'model' (default: the model path, "
                        f"or {EMBEDDED_NAME!r})")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", help="bfloat16 (CUDA default), float16, float32 (CPU default), float64")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the model folder's own code (models not built into transformers)")
    parser.add_argument("--no-engine-process", action="store_true",
                        help="run the engine's step loop in a thread of the server's process; by default it runs "
                        "in a process of its own, so that HTTP, SSE and text for many streams never slow a step "
                        "down (tensor parallelism always runs it in rank 0's process)")
    parser.add_argument("--max-queued-requests", type=int, help="answer 429 once this many requests wait (default: no bound)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--switch-interval-ms", type=float, default=1.0,
                        help="Python's thread switch interval in the server's process (default 1 ms; Python's is "
                             "5 ms): bounds how long a thread waits for the interpreter lock while the HTTP event "
                             "loop is busy streaming (the step loop's thread with --no-engine-process, else the "
                             "thread that reads the engine process's outputs)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the model over N GPUs with transformers' tensor-parallel plan: starts N "
                        "processes (rank 0 serves HTTP; or launch with torchrun --nproc-per-node N); N must divide "
                        "the model's KV heads")
    engine = parser.add_argument_group("engine options")
    engine.add_argument("--max-num-seqs", type=int)
    engine.add_argument("--max-num-batched-tokens", type=int)
    engine.add_argument("--block-size", type=int)
    engine.add_argument("--num-blocks", type=int)
    engine.add_argument("--memory-fraction", type=float, help="share of free CUDA memory for the KV pool")
    engine.add_argument("--cpu-memory-bytes", type=int, help="KV pool size on CPU")
    engine.add_argument("--backend", choices=["auto", "torch", "triton"])
    engine.add_argument("--no-cuda-graphs", action="store_true")
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--fuse-elementwise", action="store_true")
    engine.add_argument("--no-async-scheduling", action="store_true",
                        help="read each step's tokens back before scheduling the next one (default: the next decode "
                             "step is queued first, overlapping the host's work with the GPU's)")
    engine.add_argument("--compile", choices=COMPILE_MODES,
                        help="torch.compile the decoder layers: auto (default: all on one CUDA GPU for supported "
                             "models), off, decode or all")
    engine.add_argument("--kv-cache-dtype", choices=["auto", "fp8"],
                        help="fp8: K/V stored as float8 e4m3 with a scale per token and KV head (~1.9x the tokens)")
    engine.add_argument("--preemption-mode", choices=["recompute", "swap"],
                        help="swap: preempted requests' K/V go to host memory and back instead of being recomputed")
    engine.add_argument("--swap-space-gb", type=float, help="host memory for swapped-out K/V (default 4)")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks", "memory_fraction",
             "cpu_memory_bytes", "backend", "kv_cache_dtype", "preemption_mode", "swap_space_gb", "compile")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.no_cuda_graphs:
        options["cuda_graphs"] = False
    if args.no_prefix_caching:
        options["prefix_caching"] = False
    if args.fuse_elementwise:
        options["fuse_elementwise"] = True
    if args.no_async_scheduling:
        options["async_scheduling"] = False
    return options


def model_spec(args: argparse.Namespace) -> Any:
    """The ``ModelSpec`` the arguments describe (a one-line error for a bad one)."""
    from ..engine.model_spec import ModelSpec

    try:
        return ModelSpec(args.model_path, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"hf-paged serve: {err}") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {err}") from None
    return sock


def main_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import build_app
    except ImportError as err:
        raise SystemExit(f"hf-paged serve needs the server extra: pip install 'hf_paged[serve]' ({err})") from None
    from .. import AsyncEngine

    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        raise SystemExit(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}")
    if args.shutdown_timeout < 0:
        raise SystemExit(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    tp = args.tensor_parallel_size
    if tp < 1:
        raise SystemExit(f"--tensor-parallel-size must be >= 1, got {tp}")
    if tp > 1 and "LOCAL_RANK" not in os.environ:  # started by hand: start one process per rank
        return _launch_ranks(tp)
    rank = int(os.environ.get("RANK", "0")) if tp > 1 else 0
    if tp > 1 and int(os.environ.get("WORLD_SIZE", "1")) != tp:
        raise SystemExit(f"--tensor-parallel-size {tp} but torchrun started {os.environ.get('WORLD_SIZE')} processes")
    import prometheus_client

    # Only the series the metrics list names (no "_created" timestamp per histogram and counter).
    prometheus_client.disable_created_metrics()
    if not args.switch_interval_ms > 0:
        raise SystemExit(f"--switch-interval-ms must be > 0, got {args.switch_interval_ms}")
    options = engine_options(args)
    spec = model_spec(args)
    if rank != 0:  # a tensor-parallel worker: runs the steps rank 0's engine schedules, serves nothing
        model, _ = spec.load(tensor_parallel=True)
        # Rank 0 drains its requests on SIGTERM / Ctrl-C and then releases this rank; dying first
        # would fail the requests it is draining.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from .. import run_worker

        run_worker(model)
        return 0
    sock = _bind(args.host, args.port)  # before the model loads: a taken port fails fast
    name = args.served_model_name or spec.served_name
    if tp > 1 or args.no_engine_process:
        model, tokenizer = spec.load(tensor_parallel=tp > 1)
        engine = AsyncEngine(model, tokenizer, max_queued_requests=args.max_queued_requests, **options)
    else:
        from .. import EngineProcessError

        try:
            engine = AsyncEngine.from_spec(spec, max_queued_requests=args.max_queued_requests, **options)
        except EngineProcessError as err:
            sock.close()
            raise SystemExit(f"hf-paged serve: {err}") from None
    sys.setswitchinterval(args.switch_interval_ms / 1000)  # after the engine, which sets its own default
    try:
        app = build_app(engine, name, tuple(args.api_key))
        config = uvicorn.Config(app, log_level=args.log_level, access_log=False,
                                timeout_graceful_shutdown=args.shutdown_timeout)
        host, port = sock.getsockname()[:2]
        server = _make_server(config, app.state.server, f"http://{host}:{port}", name)
        # uvicorn re-raises the signal that stopped it once it is done; with this handler in place that
        # is a no-op, so a SIGTERM after a clean drain exits 0 rather than dying of the signal.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        engine.shutdown(timeout=max(args.shutdown_timeout, 1.0))
        sock.close()
    return 0 if server.started else 1


def _launch_ranks(n: int) -> int:
    """Run this same command as ``n`` processes, one per GPU, with torchrun's environment (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``): rank 0 serves HTTP, the others run
    their shard of every step. Returns when they are all done.

    SIGTERM goes to rank 0, which drains its requests and then releases the other ranks. When any
    process fails, the others are stopped and its exit code is returned.
    """
    import subprocess
    import time

    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = sys.argv[1:] if sys.argv[1:2] == ["serve"] else ["serve", *sys.argv[1:]]  # hf-paged serve / main.py
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n))
    procs = [
        subprocess.Popen([sys.executable, "-m", "hf_paged", *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        for r in range(n)
    ]
    # Ctrl-C reaches every process of the terminal's group by itself; rank 0 handles it, the others ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: procs[0].poll() is None and procs[0].send_signal(signal.SIGTERM))
    while True:
        codes = [p.poll() for p in procs]
        failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None:
            print(f"hf-paged serve: rank {failed} exited with code {codes[failed]}; stopping the other ranks",
                  file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return codes[failed]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _make_server(config: Any, state: Any, url: str, name: str) -> Any:
    """uvicorn's Server, plus: print the address once listening, and mark the app as draining at shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                print(f"hf-paged serve: {name!r} ready on {url}", flush=True)

        def handle_exit(self, sig, frame) -> None:
            state.draining = True  # /health and new requests answer 503 from now on
            super().handle_exit(sig, frame)

    return Server(config)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="hf-paged serve")
    add_serve_arguments(parser)
    sys.exit(main_serve(parser.parse_args()))
