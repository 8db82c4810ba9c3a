"""Runs a function on N CPU processes joined by a gloo process group: tensor parallelism without GPUs.

    results = run_ranks(fn, arg, world_size=2)   # fn(rank, arg) in each process; results[rank]

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so
``from_pretrained(path, tp_plan="auto")`` inside ``fn`` finds the process group initialised and uses it.
A rank's exception comes back as a ``RankError`` value (type name, message, traceback) instead of
being raised, so a test can assert how every rank ended. Ranks still running after ``timeout`` seconds
are killed and the test fails: a hang is a failure, never a stuck CI job.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


@dataclasses.dataclass(frozen=True)
class RankError:
    type_name: str
    message: str
    traceback: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share the machine's cores
    # A short timeout: a collective left waiting by a dead peer fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        value: Any = fn(rank, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts on it
        value = RankError(type(e).__name__, str(e), traceback.format_exc())
    results.put((rank, value))
    # No destroy_process_group: after a failed rank it could wait on the dead peer; exiting frees all.


def run_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 150.0) -> list[Any]:
    """``fn(rank, *args)`` on ``world_size`` spawned processes; the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(got) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                rank, value = results.get(timeout=min(left, 1.0))
                got[rank] = value
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:  # died without reporting (killed, or os._exit): record how
                    for r in dead:
                        got[r] = RankError("exit", f"process exited with code {procs[r].exitcode}", "")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if len(got) < world_size:
        missing = sorted(set(range(world_size)) - set(got))
        pytest.fail(f"rank(s) {missing} did not finish within {timeout:.0f} s (hang); results so far: {got}")
    return [got[r] for r in range(world_size)]


def unwrap(value: Any) -> Any:
    """A rank's result, re-raising its error in the test process (with the rank's traceback)."""
    if isinstance(value, RankError):
        raise AssertionError(f"rank raised {value.type_name}: {value.message}\n{value.traceback}")
    return value
