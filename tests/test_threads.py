"""What the README says about threads: ``generate`` on one enabled model from several threads at once
gives each thread the tokens it gets alone. (ContinuousGenerator's one-run-at-a-time check is tested
with its API.)"""

from __future__ import annotations

import threading

import torch
from models import make_model

import hf_paged

PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42], list(range(20, 47)), [3, 90, 4, 80]]


def test_concurrent_generate_on_one_enabled_model():
    model = make_model("llama")
    stock = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0].tolist() for p in PROMPTS]
    hf_paged.enable(model, num_blocks=64)
    try:
        start = threading.Barrier(len(PROMPTS))
        out: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                start.wait()  # every thread enters generate together
                for _ in range(2):
                    out[i] = model.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=12, do_sample=False)[0].tolist()
            except BaseException as e:  # surfaced in the main thread below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [out[i] for i in range(len(PROMPTS))] == stock
        state = model._hf_paged_state
        assert state.pool.allocator.is_whole()  # every thread's blocks went back
        assert model.config._attn_implementation != hf_paged.ATTENTION_NAME  # switch restored after the last one
    finally:
        hf_paged.disable(model)
