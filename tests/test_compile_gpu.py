"""``compile="auto"`` on CUDA: every model type it compiles gives stock ``generate``'s greedy tokens (run on
the H200; float32 models with 64-wide heads, the Triton kernels' path, decode CUDA graphs on)."""

from __future__ import annotations

import pytest
import torch
from test_generator_gpu import model_prompts_and_stock

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.engine.fusion import AUTO_COMPILE_MODEL_TYPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", sorted(AUTO_COMPILE_MODEL_TYPES))
def test_auto_compiles_and_matches_stock_per_prompt(name):
    new = 20
    model, prompts, stock = model_prompts_and_stock(name, new)
    # max_num_seqs=4: prompts are admitted while others decode, so prompt and decode steps mix.
    gen = ContinuousGenerator(model, progress=False, num_blocks=64, max_num_seqs=4)
    assert gen.runner.compile_mode == "all"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = gen.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
    assert [r.token_ids for r in out] == stock
    # It ran compiled (a model class compiled earlier in this process adds no new graph) and did not fall back.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0 and gen.runner.compile_mode == "all"
    assert gen.runner.compile_seconds > 0 or graphs > 0
    assert any(b.graph is not None for b in gen.runner.graphs._buckets.values())
    one = gen.generate(prompts[1:2], SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))[0]
    assert one.token_ids == stock[1]  # a batch of one: the padded two-row graph
    assert gen.pool.allocator.is_whole()
