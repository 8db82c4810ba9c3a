"""ContinuousGenerator on CUDA with Triton kernels and decode CUDA graphs (run on the H200)."""

from __future__ import annotations

import pytest
import torch

from hf_paged import ContinuousGenerator, SamplingParams
from models import make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def model_prompts_and_stock(name: str, new: int = 20):
    """A float32 model of ``name`` with 64-wide heads on CUDA, six prompts, and stock greedy ``generate``'s
    ``new`` tokens for each prompt run alone."""
    model = make_model(name, dtype=torch.float32, head_dim=64).cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 70, 17, 33, 5, 48)]
    stock = [
        model.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)[0, len(p):].tolist()
        for p in prompts
    ]
    return model, prompts, stock


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt2"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_greedy_matches_stock_per_prompt(name, cuda_graphs):
    new = 20
    model, prompts, stock = model_prompts_and_stock(name, new)
    gen = ContinuousGenerator(model, progress=False, num_blocks=64, max_num_seqs=4, cuda_graphs=cuda_graphs)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
    assert [r.token_ids for r in out] == stock
    assert gen.pool.allocator.is_whole()
    if cuda_graphs:
        assert gen.runner.graphs is not None and any(b.graph is not None for b in gen.runner.graphs._buckets.values())


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_shared_blocks_on_gpu(name):
    """Prefix hits, forked samples and their copy-on-write run through the Triton kernels and the graphs."""
    model = make_model(name, dtype=torch.float32, head_dim=64).cuda()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 96, (37,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 20, 9, 31)]
    new = 24
    stock = [
        model.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)[0, len(p):].tolist()
        for p in prompts
    ]
    gen = ContinuousGenerator(model, progress=False, num_blocks=64, max_num_seqs=2)
    greedy = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in gen.generate(prompts, greedy)] == stock
    assert gen.stats.prefix_hit_tokens > 0
    sample = dict(max_new_tokens=new, temperature=1.0, top_k=30, ignore_eos=True)
    (forked,) = gen.generate([prompts[1]], SamplingParams(n=4, seed=5, **sample))
    assert gen.stats.forked_samples == 3
    separate = ContinuousGenerator(model, progress=False, num_blocks=64, prefix_caching=False)
    singles = separate.generate([prompts[1]] * 4, [SamplingParams(seed=5 + k, **sample) for k in range(4)])
    assert [s.token_ids for s in forked.samples] == [r.token_ids for r in singles]
    assert gen.pool.allocator.is_whole() and separate.pool.allocator.is_whole()


def test_fused_elementwise_matches_stock():
    """torch.compile'd norms and MLPs inside paged steps (eager prefill and captured decode graphs)."""
    model = make_model("llama", dtype=torch.float32, head_dim=64).cuda()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 70, 17, 33)]
    new = 20
    stock = [
        model.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)[0, len(p):].tolist()
        for p in prompts
    ]
    gen = ContinuousGenerator(model, progress=False, num_blocks=64, fuse_elementwise=True)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
    assert [r.token_ids for r in out] == stock
    assert all("forward" not in m.__dict__ for m in gen.runner.fusion.modules)  # restored after each step


@pytest.mark.parametrize("compile", ["off", "auto"])
def test_async_scheduling_changes_no_output_on_gpu(compile):
    """Decode steps queued ahead take their ids from the device (graph replays and the eager/compiled
    forward), their sampled tokens come back through pinned memory: greedy equals stock, and every
    sampling feature gives what the synchronous loop gives."""
    from test_async_scheduling import mixed_params
    from test_generator import char_tokenizer

    new = 20
    model, prompts, stock = model_prompts_and_stock("llama", new)
    greedy = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    runs = {}
    for async_scheduling in (False, True):
        gen = ContinuousGenerator(model, char_tokenizer(), progress=False, num_blocks=64, max_num_seqs=4,
                                  compile=compile, async_scheduling=async_scheduling)
        assert [r.token_ids for r in gen.generate(prompts, greedy)] == stock
        out = gen.generate(prompts, mixed_params())
        runs[async_scheduling] = [(r.token_ids, r.finish_reason, r.text, [s.token_ids for s in r.samples]) for r in out]
        assert (gen.stats.steps_scheduled_ahead > 0) == async_scheduling
        assert gen.pool.allocator.is_whole()
    assert runs[True] == runs[False]
