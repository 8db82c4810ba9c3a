"""Tensor parallelism for the engine: rank 0 schedules, every rank runs the same forward.

The model is loaded on every rank with transformers' own plan (``from_pretrained(path,
tp_plan="auto")`` under ``torchrun --nproc-per-node N``): its weights are DTensor shards and its
layers all-reduce by themselves. What the engine adds is that every rank runs *the same step*::

    rank 0                                    ranks 1..N-1 (run_worker)
    scheduler.schedule()                      .
    send StepPlan  ---- gloo broadcast ---->  receive StepPlan
    runner.run(plan)  <== model all-reduces ==>  runner.run(plan)
    sampler.sample(logits), scheduler.update  (logits dropped)

Why a broadcast plan and not identical replicas of the scheduler on every rank: the workers then need
no scheduler, sampler, tokenizer or request state at all, and nothing has to be proven deterministic
(arrival times of online requests, aborts, stop strings, prefix-cache eviction and preemption all
depend on rank 0's view). The plan is plain integers (the tokens to compute, lengths, block tables,
copy-on-write copies), two small CPU broadcasts per step that rank 0 issues asynchronously before its
own forward. Sampling happens on rank 0 only; a sampled token reaches the workers as an input of the
next step's plan, so every rank computes with the same tokens by construction.

Failures end every rank with an error instead of a hang:

- rank 0 fails (in a step, or a peer's notice arrives): it broadcasts an error plan; the workers raise
  ``TensorParallelError`` naming rank 0's error.
- a worker fails: it posts a notice (rank, error) in a small key-value store that rank 0 hosts, then
  raises. Rank 0's next collective fails (gloo: the peer closed its sockets) or its watchdog thread
  reads the notice; rank 0 raises ``TensorParallelError`` naming the failed rank's error.
- a rank blocked inside a collective with a failed peer cannot be unblocked (NCCL waits for the
  peer): its watchdog prints the notice and exits the process after ``grace_s`` seconds.

Under ``torchrun`` a process that exits with an error also makes torchrun stop the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..integration.tensor_parallel import tensor_parallel_size


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed; the others stop with this error."""


# Message kinds of the plan channel.
OPEN, STEP, CLOSE, ERROR = 1, 2, 3, 4
_KIND_NAMES = {OPEN: "open", STEP: "step", CLOSE: "close", ERROR: "error"}
# Header: kind, payload length, and (steps) B, T, table entries, block copies, graph width.
_HEADER_LEN = 7
# Collectives of the plan channel wait this long at most. Workers wait for rank 0's next plan while
# the engine is idle, so this is no failure detector (the failure notices and closed sockets are).
CHANNEL_TIMEOUT = datetime.timedelta(days=7)
# A rank stuck in a collective with a failed peer exits after this many seconds.
GRACE_S = 30.0
_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Everything a rank needs to run one step's forward exactly as rank 0 does (plain integers).

    Row ``b`` computes ``query_lens[b]`` tokens (its slice of ``input_ids``) ending at
    ``seq_lens[b]``, through its ``block_tables[b]``; ``samples[b]``: its last logits row is kept.
    """

    input_ids: Sequence[int]  # [T] packed, row after row
    query_lens: Sequence[int]  # [B]
    seq_lens: Sequence[int]  # [B]
    samples: Sequence[bool]  # [B]
    block_tables: Sequence[Sequence[int]]  # [B][blocks of row b]
    block_copies: Sequence[tuple[int, int]] = ()  # copy-on-write (src, dst), before the forward
    graph_width: int = 0  # longest sequence the decode graphs must cover from now on (0: unchanged)

    def encode(self) -> tuple[np.ndarray, np.ndarray]:
        """``(header, payload)`` int64 arrays."""
        lens = np.fromiter((len(t) for t in self.block_tables), dtype=np.int64, count=len(self.block_tables))
        parts = [
            np.asarray(self.input_ids, dtype=np.int64),
            np.asarray(self.query_lens, dtype=np.int64),
            np.asarray(self.seq_lens, dtype=np.int64),
            np.asarray(self.samples, dtype=np.int64),
            lens,
            np.concatenate([np.asarray(t, dtype=np.int64) for t in self.block_tables]) if int(lens.sum()) else lens[:0],
            np.asarray(self.block_copies, dtype=np.int64).reshape(-1),
        ]
        payload = np.concatenate(parts)
        header = np.array(
            [STEP, payload.size, len(self.query_lens), len(self.input_ids), int(lens.sum()), len(self.block_copies), self.graph_width],
            dtype=np.int64,
        )
        return header, payload

    @classmethod
    def decode(cls, header: np.ndarray, payload: np.ndarray) -> "StepPlan":
        _kind, _n, b, t, n_tables, n_copies, width = (int(x) for x in header)
        cuts = np.cumsum([t, b, b, b, b, n_tables, 2 * n_copies])
        ids, q, s, samples, lens, tables, copies = np.split(payload, cuts[:-1])
        ends = np.cumsum(lens)
        starts = ends - lens
        return cls(
            input_ids=ids.tolist(),
            query_lens=q.tolist(),
            seq_lens=s.tolist(),
            samples=[bool(x) for x in samples],
            block_tables=[tables[a:e].tolist() for a, e in zip(starts.tolist(), ends.tolist())],
            block_copies=[tuple(c) for c in copies.reshape(-1, 2).tolist()],
            graph_width=width,
        )


_GROUP: Any = None
_STORE: Any = None


def _channel() -> tuple[Any, Any]:
    """The process's gloo group over all ranks and the failure-notice store (created once, collectively).

    A group of its own: the plan traffic never interleaves with the model's collectives. The store is
    a TCPStore that rank 0 hosts on a free port, announced to the others over the new group.
    """
    global _GROUP, _STORE
    if _GROUP is None:
        group = dist.new_group(backend="gloo", timeout=CHANNEL_TIMEOUT)
        rank = dist.get_rank()
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if rank == 0:
            store = dist.TCPStore(host, 0, None, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
            port = torch.tensor([store.port], dtype=torch.int64)
        else:
            port = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(port, src=0, group=group)
        if rank != 0:
            store = dist.TCPStore(host, int(port.item()), None, False, timeout=datetime.timedelta(seconds=60))
        _GROUP, _STORE = group, store
    return _GROUP, _STORE


class Link:
    """One rank's end of the plan channel between rank 0 and the workers, plus the failure watchdog.

    Args:
        model: a model loaded with a tensor-parallel plan; the world must be exactly its TP group.
        grace_s: how long a rank whose peer failed waits to be unblocked before it exits the process.
    """

    def __init__(self, model: torch.nn.Module, *, grace_s: float | None = None) -> None:
        tp = tensor_parallel_size(model)
        if tp == 1 or not dist.is_initialized():
            raise ValueError("the model is not tensor parallel (load it with tp_plan='auto' under torchrun)")
        world = dist.get_world_size()
        if world != tp:
            raise ValueError(
                f"the model is sharded over {tp} ranks but the process group has {world}; hf_paged runs tensor "
                "parallelism alone (one model over all ranks), not combined with data or pipeline parallelism"
            )
        self.rank = dist.get_rank()
        self.world_size = world
        self.group, self._store = _channel()
        self._store_lock = threading.Lock()
        self._pending: list[Any] = []  # rank 0's in-flight async sends (their tensors stay alive)
        self.grace_s = GRACE_S if grace_s is None else grace_s
        self.failure: str | None = None  # a peer's failure notice, once the watchdog read one
        self._acknowledged = threading.Event()  # the main thread raised the failure: no forced exit
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"hf_paged-tp-watchdog-{self.rank}", daemon=True)
        self._watchdog.start()

    # ---- the plan channel ---------------------------------------------------------------------
    def send(self, kind: int, payload: np.ndarray | bytes = b"", header: np.ndarray | None = None) -> None:
        """Rank 0: broadcast one message (asynchronously; the previous one must have left first)."""
        self._drain()
        if isinstance(payload, bytes):
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
        else:
            data = torch.from_numpy(payload)
        if header is None:
            header = np.array([kind, data.numel()] + [0] * (_HEADER_LEN - 2), dtype=np.int64)
        head = torch.from_numpy(header)
        self._pending = [head, data, dist.broadcast(head, src=0, group=self.group, async_op=True)]
        if data.numel():
            self._pending.append(dist.broadcast(data, src=0, group=self.group, async_op=True))

    def send_step(self, plan: StepPlan) -> None:
        header, payload = plan.encode()
        self.send(STEP, payload, header)

    def _drain(self) -> None:
        for work in self._pending[2:]:
            work.wait()
        self._pending = []

    def recv(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Workers: the next message as ``(kind, header, payload)`` (payload int64 for steps, else uint8)."""
        head = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        dist.broadcast(head, src=0, group=self.group)
        kind, n = int(head[0]), int(head[1])
        data = torch.empty(n, dtype=torch.int64 if kind == STEP else torch.uint8)
        if n:
            dist.broadcast(data, src=0, group=self.group)
        return kind, head.numpy(), data.numpy()

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    # ---- failures -----------------------------------------------------------------------------
    def report_failure(self, error: BaseException | str) -> None:
        """Post this rank's failure for every other rank's watchdog (best effort: the store may be gone)."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            with self._store_lock:
                self._store.set(f"hf_paged/failed/{self.rank}", text)
                self._store.add("hf_paged/failures", 1)
        except Exception:  # noqa: BLE001 - rank 0 (the store's host) is gone: its exit tells the others
            pass

    def peer_failure(self, wait_s: float = 0.0) -> str | None:
        """The first failure notice of another rank, waiting up to ``wait_s`` for one to arrive."""
        deadline = time.monotonic() + wait_s
        while True:
            notice = self._read_notice()
            if notice is not None or time.monotonic() >= deadline:
                return notice
            time.sleep(_POLL_S)

    def _read_notice(self) -> str | None:
        try:
            with self._store_lock:
                if self._store.add("hf_paged/failures", 0) == 0:
                    return None
                for r in range(self.world_size):
                    key = f"hf_paged/failed/{r}"
                    if r != self.rank and self._store.check([key]):
                        return f"rank {r} failed: {self._store.get(key).decode()}"
        except Exception as e:  # noqa: BLE001
            if self.rank != 0:
                return f"rank 0 went away (its failure-notice store is unreachable: {type(e).__name__})"
        return None

    def acknowledge(self) -> None:
        """The main thread is raising the failure itself: the watchdog must not exit the process."""
        self._acknowledged.set()

    def _watch(self) -> None:
        while not self._stop.wait(_POLL_S):
            notice = self._read_notice()
            if notice is None:
                continue
            self.failure = notice
            if self._acknowledged.wait(self.grace_s) or self._stop.is_set():
                return
            print(
                f"hf_paged: rank {self.rank}: {notice}; this rank is blocked in a collective with it and exits",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)

    def error(self, cause: BaseException | None = None) -> TensorParallelError:
        """The error to raise on this rank after a collective failed (or ``cause`` happened): names the
        failed peer when a notice arrives within a few seconds."""
        notice = self.failure or self.peer_failure(wait_s=5.0)
        self.acknowledge()
        if notice is None:
            notice = f"a collective failed on rank {self.rank} ({type(cause).__name__}: {cause})"
        return TensorParallelError(notice)

    def close(self) -> None:
        self._stop.set()
        self._acknowledged.set()
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - a peer already gone; nothing left to tell it
            pass


def options_payload(options: Any) -> bytes:
    """An options dataclass as the JSON the workers rebuild it from."""
    return json.dumps(dataclasses.asdict(options)).encode()


def message_text(payload: np.ndarray) -> str:
    return bytes(payload).decode()


def kind_name(kind: int) -> str:
    return _KIND_NAMES.get(kind, f"unknown message kind {kind}")
