"""The tensor-parallel step channel: steps, options and errors from rank 0 to the workers over gloo,
and the failure notices that end every rank (2 CPU processes, no model)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tp_harness import RankError, run_ranks, unwrap

from hf_paged.engine.distributed import CLOSE, ERROR, OPEN, STEP, Link, decode_step, encode_step, message_text
from hf_paged.engine.model_runner import StepInputs


class FakeTPModel(torch.nn.Module):
    """What Link reads off a model loaded with a TP plan over 2 ranks."""

    _tp_size = 2


STEPS = [
    StepInputs(input_ids=[5, 6, 7, 8, 9], query_lens=[3, 1, 1], seq_lens=[3, 40, 17], samples=[True, True, False],
               block_tables=[[4], [0, 1, 2], [9, 10]], block_copies=[(2, 11)], swap_out=[(5, 0), (6, 1)],
               extra_logit_rows=[0, 1]),
    StepInputs(input_ids=[3], query_lens=[1], seq_lens=[1], samples=[True], block_tables=[[]], swap_in=[(1, 7)]),
    StepInputs(input_ids=[], query_lens=[], seq_lens=[], samples=[], block_tables=[]),
]


def as_lists(step: StepInputs) -> tuple:
    return (list(step.input_ids), list(step.query_lens), list(step.seq_lens), [bool(x) for x in step.samples],
            [list(t) for t in step.block_tables], [tuple(c) for c in step.block_copies],
            [tuple(c) for c in step.swap_out], [tuple(c) for c in step.swap_in], list(step.extra_logit_rows))


def test_step_round_trip():
    for step in STEPS:
        header, payload = encode_step(step)
        assert header.dtype == payload.dtype == np.int64 and header[0] == STEP
        assert as_lists(decode_step(header, payload)) == as_lists(step)


def _messages_rank(rank: int) -> dict:
    link = Link(FakeTPModel())
    got: dict = {"min": link.min_over_ranks(100 + 7 * rank)}
    if rank == 0:
        link.send(OPEN, b'{"block_size": 16}')
        for step in STEPS:
            link.send_step(step)
        link.send(ERROR, "rank 0 failed: ValueError: bad".encode())
        link.send(CLOSE)
        link.report_failure(RuntimeError("boom on 0"))
    else:
        kind, _, payload = link.recv()
        got["open"] = (kind, message_text(payload))
        got["steps"] = []
        for _ in STEPS:
            kind, header, payload = link.recv()
            assert kind == STEP
            got["steps"].append(as_lists(decode_step(header, payload)))
        kind, _, payload = link.recv()
        got["error"] = (kind, message_text(payload))
        got["close"] = link.recv()[0]
        got["notice"] = link.peer_failure(wait_s=10)
    link.close()
    return got


@pytest.mark.slow
def test_steps_options_and_errors_reach_the_workers():
    r0, r1 = (unwrap(r) for r in run_ranks(_messages_rank))
    assert r0["min"] == r1["min"] == 100
    assert r1["open"] == (OPEN, '{"block_size": 16}')
    assert r1["steps"] == [as_lists(step) for step in STEPS]
    assert r1["error"] == (ERROR, "rank 0 failed: ValueError: bad")
    assert r1["close"] == CLOSE
    assert r1["notice"] == "rank 0 failed: RuntimeError: boom on 0"


def _stuck_rank(rank: int) -> str:
    import torch.distributed as dist

    link = Link(FakeTPModel(), grace_s=1.0)
    link.blocking = True  # as during a step
    if rank == 1:
        link.report_failure(RuntimeError("injected on rank 1"))
        link.close()  # what a failing worker does before it raises
        time.sleep(8)  # alive, but never joins rank 0's collective
        return "rank 1 done"
    dist.barrier()  # waits for rank 1 (60 s timeout): only the watchdog can end it sooner
    return "rank 0 passed a barrier rank 1 never entered"


@pytest.mark.slow
def test_a_rank_stuck_with_a_failed_peer_exits():
    r0, r1 = run_ranks(_stuck_rank)
    assert isinstance(r0, RankError) and r0.message == "process exited with code 1", r0
    assert r1 == "rank 1 done"
