"""Tensor parallelism for the engine: rank 0 schedules, every rank runs the same forward.

The model is loaded on every rank with transformers' own plan (``from_pretrained(path,
tp_plan="auto")`` under ``torchrun --nproc-per-node N``): its weights are DTensor shards and its
layers all-reduce by themselves. What the engine adds is that every rank runs *the same step*::

    rank 0                                    ranks 1..N-1 (run_worker)
    scheduler.schedule()                      .
    send StepInputs  --- gloo broadcast --->  receive StepInputs
    runner.run(step)  <= model all-reduces =>  runner.run(step)
    sampler.sample(logits), scheduler.update  (logits dropped)

Usage (every rank runs the same script)::

    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.bfloat16)
    if torch.distributed.get_rank() == 0:
        with ContinuousGenerator(model, tokenizer) as gen:     # or AsyncEngine(...), hf-paged serve
            results = gen.generate(prompts)
    else:
        hf_paged.run_worker(model)          # follows rank 0's steps until rank 0 closes its generator

Why a broadcast step and not identical replicas of the scheduler on every rank: the workers then need
no scheduler, sampler, tokenizer or request state at all, and nothing has to be proven deterministic
(arrival times of online requests, aborts, stop strings, prefix-cache eviction and preemption all
depend on rank 0's view). A step is plain integers (the tokens to compute, lengths, block tables,
copy-on-write copies): two small CPU broadcasts that rank 0 issues asynchronously before its own
forward. Only rank 0 samples; a sampled token reaches the workers as an input of the next step, so
every rank computes with the same tokens by construction. The ranks also agree on one pool size (the
smallest any rank's free memory holds), so block ids mean the same everywhere.

Failures end every rank with an error instead of a hang:

- rank 0 fails inside a step: it posts a failure notice and broadcasts an error message; the workers
  raise ``TensorParallelError`` naming rank 0's error.
- a worker fails: it posts a notice (rank, error) in a small key-value store that rank 0 hosts, then
  raises. Rank 0's collectives with it fail (gloo: the peer closed its sockets) or its watchdog reads
  the notice; rank 0 raises ``TensorParallelError`` naming the failed rank's error.
- a rank blocked inside a collective with a failed peer cannot be unblocked (NCCL waits for the peer
  forever): its watchdog prints the notice and exits the process after ``grace_s`` seconds.

Under ``torchrun`` a process that exits with an error also makes torchrun stop the others.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import itertools
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..integration.tensor_parallel import tensor_parallel_size
from ..memory.kv_pool import KVLayout, KVPool, resolve_num_blocks
from ..options import EngineOptions
from .model_runner import ModelRunner, StepInputs, kv_layout_from_config
from .scheduler import ScheduledBatch


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed; the others stop with this error."""


# Message kinds of the step channel.
OPEN, STEP, PREPARE, CLOSE, ERROR = 1, 2, 3, 4, 5
_KIND_NAMES = {OPEN: "open", STEP: "step", PREPARE: "prepare", CLOSE: "close", ERROR: "error"}
# The fields of a step, in wire order: every field of StepInputs travels, so a field added to it
# reaches the workers without a change here (it must hold integers, or pairs of integers).
_STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepInputs))
_RAGGED = "block_tables"  # one list per row, of varying length
# Header: kind, payload length, then (steps) (count, width) per field, or (prepare) graph width and
# a capture-all flag.
_HEADER_LEN = 2 + 2 * len(_STEP_FIELDS)
# Collectives of the step channel wait this long at most. Workers wait for rank 0's next step while
# the engine is idle, so this is no failure detector (the failure notices and closed sockets are).
CHANNEL_TIMEOUT = datetime.timedelta(days=7)
# A rank stuck in a collective with a failed peer exits after this many seconds.
GRACE_S = 30.0
_POLL_S = 0.25


# ---- the step on the wire ---------------------------------------------------------------------


def encode_step(step: StepInputs) -> tuple[np.ndarray, np.ndarray]:
    """A step as ``(header, payload)`` int64 arrays."""
    header, parts = [STEP, 0], []
    for name in _STEP_FIELDS:
        value = getattr(step, name)
        if name == _RAGGED:
            parts.append(np.fromiter((len(t) for t in value), dtype=np.int64, count=len(value)))
            parts.append(np.array(list(itertools.chain.from_iterable(value)), dtype=np.int64))
            header += [len(value), -1]
            continue
        if not len(value):
            header += [0, 0]
            continue
        array = np.asarray(value)
        if array.dtype.kind not in "biu":
            raise TypeError(f"StepInputs.{name} holds {array.dtype} values; only integers travel to the other ranks")
        array = array.astype(np.int64).reshape(len(value), -1)
        parts.append(array.reshape(-1))
        header += [len(value), array.shape[1]]
    payload = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    header[1] = payload.size
    return np.array(header, dtype=np.int64), payload


def decode_step(header: np.ndarray, payload: np.ndarray) -> StepInputs:
    """``encode_step``'s inverse (bools come back as 0/1)."""
    values, at = {}, 0
    for i, name in enumerate(_STEP_FIELDS):
        count, width = int(header[2 + 2 * i]), int(header[3 + 2 * i])
        if width == -1:
            lens = payload[at : at + count].tolist()
            flat = payload[at + count : at + count + sum(lens)].tolist()
            at += count + len(flat)
            tables, start = [], 0
            for n in lens:
                tables.append(flat[start : start + n])
                start += n
            values[name] = tables
        elif width == 0:
            values[name] = []
        elif width == 1:
            values[name] = payload[at : at + count].tolist()
            at += count
        else:
            values[name] = [tuple(row) for row in payload[at : at + count * width].reshape(count, width).tolist()]
            at += count * width
    return StepInputs(**values)


# ---- the link between ranks ---------------------------------------------------------------------

_CHANNEL: tuple[Any, Any] | None = None


def _channel() -> tuple[Any, Any]:
    """The process's gloo group over all ranks and the failure-notice store (created once, collectively).

    A group of its own, so the step traffic never interleaves with the model's collectives. The store
    is a TCPStore that rank 0 hosts on a free port, announced to the others over the new group.
    """
    global _CHANNEL
    if _CHANNEL is None:
        group = dist.new_group(backend="gloo", timeout=CHANNEL_TIMEOUT)
        rank = dist.get_rank()
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        timeout = datetime.timedelta(seconds=60)
        store = dist.TCPStore(host, 0, None, True, timeout=timeout, wait_for_workers=False) if rank == 0 else None
        port = torch.tensor([store.port if store is not None else 0], dtype=torch.int64)
        dist.broadcast(port, src=0, group=group)
        if store is None:
            store = dist.TCPStore(host, int(port.item()), None, False, timeout=timeout)
        _CHANNEL = (group, store)
    return _CHANNEL


class Link:
    """One rank's end of the step channel between rank 0 and the workers, plus the failure watchdog.

    Args:
        model: a model loaded with a tensor-parallel plan; the world must be exactly its TP group.
        grace_s: how long this rank may stay blocked in a collective with a failed peer before the
            watchdog exits the process.
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
        self._pending: list[Any] = []  # rank 0's sends in flight, with their tensors (kept alive)
        self.grace_s = GRACE_S if grace_s is None else grace_s
        self.failure: str | None = None  # another rank's failure notice, once the watchdog read one
        # Inside a collective that a failed peer never joins (workers: always, rank 0: during a step).
        self.blocking = self.rank != 0
        self._acknowledged = threading.Event()  # the main thread raises the failure itself
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"hf_paged-tp-watchdog-{self.rank}", daemon=True)
        self._watchdog.start()

    # ---- messages -----------------------------------------------------------------------------
    def send(self, kind: int, payload: np.ndarray | bytes = b"", header: np.ndarray | None = None) -> None:
        """Rank 0: broadcast one message asynchronously (the previous one has left by then)."""
        self._drain()
        if isinstance(payload, bytes):
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
        else:
            data = torch.from_numpy(payload)
        if header is None:
            header = np.array([kind, data.numel()] + [0] * (_HEADER_LEN - 2), dtype=np.int64)
        head = torch.from_numpy(header)
        works = [dist.broadcast(head, src=0, group=self.group, async_op=True)]
        if data.numel():
            works.append(dist.broadcast(data, src=0, group=self.group, async_op=True))
        self._pending = [head, data, *works]

    def send_step(self, step: StepInputs) -> None:
        header, payload = encode_step(step)
        self.send(STEP, payload, header)

    def _drain(self) -> None:
        for work in self._pending[2:]:
            work.wait()
        self._pending = []

    def recv(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Workers: the next message as ``(kind, header, payload)`` (payload int64 for steps, else bytes)."""
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
        """Post this rank's failure for every other rank (best effort: the store's host may be gone)."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            with self._store_lock:
                self._store.set(f"hf_paged/failed/{self.rank}", text)
                self._store.add("hf_paged/failures", 1)
        except Exception:  # noqa: BLE001 - rank 0 (the store's host) is gone; its exit tells the others
            pass

    def peer_failure(self, wait_s: float = 0.0) -> str | None:
        """Another rank's failure notice, waiting up to ``wait_s`` for one to arrive."""
        deadline = time.monotonic() + wait_s
        while True:
            notice = self.failure or self._read_notice()
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
        """The main thread raises the failure itself: the watchdog must not exit the process."""
        self._acknowledged.set()

    def _watch(self) -> None:
        while not self._stop.wait(_POLL_S):
            notice = self._read_notice()
            if notice is None:
                continue
            self.failure = notice
            # Give the main thread time to see the failure in its own collective and raise it.
            if self._acknowledged.wait(self.grace_s) or self._stop.is_set() or not self.blocking:
                return
            print(
                f"hf_paged: rank {self.rank}: {notice}; this rank is blocked in a collective with it and exits",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)

    def fail(self, error: BaseException | None) -> None:
        """Rank 0: a step failed, ``error`` here (None: a peer's failure caused it). Tell every worker:
        one waiting for a step gets an error message, one stuck in a collective the notice."""
        if error is not None and not isinstance(error, TensorParallelError):
            self.report_failure(error)
            text = f"rank 0 failed: {type(error).__name__}: {error}"
        else:
            text = self.failure or (str(error) if error is not None else "rank 0 failed")
        self.acknowledge()
        self._pending = []  # never wait on sends to a dead peer
        try:
            self.send(ERROR, text.encode())
        except Exception:  # noqa: BLE001 - the channel itself is broken: the notice and our exit remain
            pass
        self.close(wait=False)

    def close(self, wait: bool = True) -> None:
        self._stop.set()
        self._acknowledged.set()
        if wait:
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - a peer already gone; nothing left to tell it
                pass


def message_text(payload: np.ndarray) -> str:
    return bytes(payload).decode()


def kind_name(kind: int) -> str:
    return _KIND_NAMES.get(kind, f"unknown message kind {kind}")


# ---- the engine's seam --------------------------------------------------------------------------


def make_pool_and_runner(model: torch.nn.Module, options: EngineOptions, layout: KVLayout) -> tuple[KVPool, Any]:
    """The engine core's KV pool and model runner: plain ones for a model in one process; for a
    tensor-parallel model (on rank 0) a runner that sends every step to the other ranks first.

    The workers build theirs through the same ``_build`` from the options rank 0 sends, so every rank
    runs an identical runner over an identically sized pool.
    """
    if tensor_parallel_size(model) == 1:
        return _build(model, options, layout, None)
    link = Link(model)
    if link.rank != 0:
        link.close()
        raise RuntimeError(
            f"this is rank {link.rank} of a tensor-parallel model: only rank 0 runs the generator or engine; "
            "the other ranks call hf_paged.run_worker(model), which runs the steps rank 0 schedules"
        )
    link.blocking = True
    try:
        link.send(OPEN, json.dumps(dataclasses.asdict(options)).encode())
        pool, runner = _build(model, options, layout, link)
    except BaseException as e:
        link.fail(e)
        raise
    link.blocking = False
    return pool, DriverRunner(runner, link)


def _build(model: torch.nn.Module, options: EngineOptions, layout: KVLayout, link: Link | None) -> tuple[KVPool, ModelRunner]:
    pool_options = options.pool()
    if link is not None:
        pool_options = dataclasses.replace(pool_options, num_blocks=_agreed_num_blocks(link, pool_options, layout))
    pool = KVPool.create(pool_options, layout)
    if options.preemption_mode == "swap":  # host memory for preempted requests' blocks
        num = int(options.swap_space_gb * 2**30) // pool.bytes_per_block
        if num < 1:
            raise ValueError(f"swap_space_gb={options.swap_space_gb} holds no KV block of {pool.bytes_per_block} bytes")
        pool.allocate_swap(num)
    runner = ModelRunner(
        model,
        pool,
        options.backend,
        cuda_graphs=options.cuda_graphs,
        max_num_seqs=options.max_num_seqs,
        fuse_elementwise=options.fuse_elementwise,
        compile=options.compile,
    )
    return pool, runner


def _agreed_num_blocks(link: Link, options: Any, layout: KVLayout) -> int:
    """The smallest block count any rank's budget holds (a rank that cannot size its pool sends -1,
    so every rank leaves the agreement together, with an error)."""
    error = None
    try:
        mine = resolve_num_blocks(options, layout)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others learnt of it
        mine, error = -1, e
    agreed = link.min_over_ranks(mine)
    if error is not None:
        raise error
    if agreed < 0:
        raise TensorParallelError(link.peer_failure(wait_s=5.0) or "another rank could not size its KV pool")
    return agreed


class DriverRunner:
    """Rank 0's model runner under tensor parallelism: each step goes to the workers, then runs here.

    ``prepare`` and ``capture_graphs`` are sent too: a decode-graph capture runs the model's
    collectives, so every rank captures at the same point.
    """

    takes_device_ids = False  # the workers read each step's token ids from the message: no step ahead

    def __init__(self, runner: ModelRunner, link: Link) -> None:
        self.runner = runner
        self.link = link
        self.cache = runner.cache
        self.pool = runner.pool
        self.device = runner.device
        self._ended: str | None = None  # why the workers are gone (closed, or a failure)
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def graphs(self) -> Any:
        return self.runner.graphs

    def prepare(self, max_seq_len: int) -> None:
        self._mirrored(PREPARE, max_seq_len, 0, lambda: self.runner.prepare(max_seq_len))

    def capture_graphs(self) -> None:
        self._mirrored(PREPARE, 0, 1, self.runner.capture_graphs)

    def execute(self, batch: ScheduledBatch, extra_logit_rows: Sequence[int] = ()) -> torch.Tensor:
        step = StepInputs.of(batch, extra_logit_rows)
        return self._mirrored(STEP, step, 0, lambda: self.runner.run(step))

    def _mirrored(self, kind: int, what: Any, flag: int, run_here: Any) -> Any:
        """Send one message to the workers, then do the same here; failures end the group."""
        if self._ended is not None:
            raise TensorParallelError(f"the tensor-parallel workers are gone: {self._ended}")
        if self.link.failure is not None:  # a worker failed while rank 0 was between steps
            self._fail(None)
            raise TensorParallelError(self.link.failure)
        self.link.blocking = True
        try:
            if kind == STEP:
                self.link.send_step(what)
            else:
                self.link.send(kind, header=np.array([kind, 0, what, flag] + [0] * (_HEADER_LEN - 4), dtype=np.int64))
            result = run_here()
        except BaseException as e:
            # A peer that failed makes our collectives fail: name it rather than the symptom.
            notice = self.link.peer_failure(wait_s=2.0)
            self._fail(None if notice is not None else e)
            if notice is None:
                raise
            raise TensorParallelError(notice) from e
        self.link.blocking = False
        return result

    def _fail(self, error: BaseException | None) -> None:
        self._ended = self.link.failure if error is None else f"rank 0 failed: {type(error).__name__}: {error}"
        self.link.fail(error)

    def close(self) -> None:
        """Release the workers (their ``run_worker`` returns) and drop the graphs."""
        if self._ended is None:
            self._ended = "rank 0 closed its generator / engine"
            try:
                self.link.send(CLOSE)
            except Exception:  # noqa: BLE001 - the workers are gone already
                pass
        self.link.close()
        self.runner.close()


def _close_at_exit(ref: "weakref.ref[DriverRunner]") -> None:
    # A script that never closed its generator must still release the workers (they would only learn
    # of rank 0's exit from broken sockets, as an error).
    runner = ref()
    if runner is not None and runner._ended is None:
        runner.close()


def run_worker(model: torch.nn.Module, *, grace_s: float | None = None) -> None:
    """Run the forward steps of a tensor-parallel model that rank 0's generator or engine schedules.

    Call it on every rank but 0, with the same model (loaded with the same TP plan): it builds this
    rank's share of the KV pool from the options rank 0 sends, runs each step rank 0 sends, and returns
    when rank 0 closes its generator / shuts its engine down. Raises ``TensorParallelError`` when
    another rank fails; when this rank fails it tells the others first. ``grace_s``: how long this rank
    may stay blocked in a collective with a failed rank before it exits the process (default 30 s).
    """
    link = Link(model, grace_s=grace_s)
    if link.rank == 0:
        link.close()
        raise RuntimeError("run_worker runs on ranks 1..N-1; rank 0 runs the generator or engine")
    runner: ModelRunner | None = None
    try:
        kind, header, payload = link.recv()
        if kind == ERROR:
            raise TensorParallelError(message_text(payload))
        if kind != OPEN:
            raise TensorParallelError(f"rank 0 sent a {kind_name(kind)} message before opening a generator")
        options = EngineOptions(**json.loads(message_text(payload)))
        _, runner = _build(model, options, _layout(model), link)
        while True:
            kind, header, payload = link.recv()
            if kind == STEP:
                with torch.inference_mode():
                    runner.run(decode_step(header, payload))
            elif kind == PREPARE:
                width, capture = int(header[2]), int(header[3])
                if width:
                    runner.prepare(width)
                if capture:
                    runner.capture_graphs()
            elif kind == CLOSE:
                return
            elif kind == ERROR:
                raise TensorParallelError(message_text(payload))
            else:
                raise TensorParallelError(f"rank 0 sent an unexpected {kind_name(kind)} message")
    except TensorParallelError:
        link.acknowledge()
        raise
    except BaseException as e:
        notice = link.peer_failure(wait_s=2.0)
        if notice is not None:  # our collective failed because a peer did
            link.acknowledge()
            raise TensorParallelError(notice) from e
        link.report_failure(e)
        raise
    finally:
        link.close(wait=False)
        if runner is not None:
            runner.close()
            runner.pool.kv = torch.empty(0, device=runner.pool.kv.device)


def _layout(model: torch.nn.Module) -> KVLayout:
    """The layout the engine core computes on rank 0 (same dtype and device rules)."""
    param = next(model.parameters())
    dtype, device = getattr(model, "dtype", param.dtype), getattr(model, "device", param.device)
    return kv_layout_from_config(model, dtype, device)
