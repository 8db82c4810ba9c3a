"""``compile="auto"`` on CUDA: every model type it compiles gives stock ``generate``'s greedy tokens (run on
the H200; float32 models with 64-wide heads, the Triton kernels' path, decode CUDA graphs on)."""

from __future__ import annotations

import pytest
import torch
from models import make_model

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.engine.fusion import AUTO_COMPILE_MODEL_TYPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", sorted(AUTO_COMPILE_MODEL_TYPES))
def test_auto_compiles_and_matches_stock_per_prompt(name):
    model = make_model(name, dtype=torch.float32, head_dim=64).cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 70, 17, 33, 5, 48)]
    new = 20
    stock = [
        model.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)[0, len(p):].tolist()
        for p in prompts
    ]
    # max_num_seqs=4: prompts are admitted while others decode, so prompt and decode steps mix.
    gen = ContinuousGenerator(model, progress=False, num_blocks=64, max_num_seqs=4)
    assert gen.runner.compile_mode == "all"
    out = gen.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
    assert [r.token_ids for r in out] == stock
    assert gen.runner.compile_seconds > 0 and gen.runner.compile_mode == "all"  # it compiled, no fallback
    assert any(b.graph is not None for b in gen.runner.graphs._buckets.values())
    one = gen.generate(prompts[1:2], SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))[0]
    assert one.token_ids == stock[1]  # a batch of one: the padded two-row graph
    assert gen.pool.allocator.is_whole()
