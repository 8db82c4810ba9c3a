"""FP8 KV and swap preemption on CUDA: Triton kernels, decode CUDA graphs, pinned swap space (run on a GPU)."""

from __future__ import annotations

import pytest
import torch

import hf_paged
from hf_paged import ContinuousGenerator, SamplingParams
from models import left_padded_batch, make_model
from test_kv_fp8 import FP8, LOGPROB_TOL, _compare_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LENGTHS = (3, 70, 17, 33, 5, 48)


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_generator_fp8_on_gpu_against_full_precision(name, cuda_graphs):
    model = make_model(name, dtype=torch.float32, head_dim=64).cuda()
    gen = ContinuousGenerator(model, kv_cache_dtype="fp8", num_blocks=64, cuda_graphs=cuda_graphs, progress=False)
    assert gen.pool.kv.dtype == FP8
    prompts = _prompts()
    results = gen.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, logprobs=0, ignore_eos=True))
    for p, res in zip(prompts, results):
        with torch.no_grad():
            ids = torch.tensor([p + res.token_ids], device="cuda")
            lp = model(ids).logits[0, len(p) - 1 : -1].double().log_softmax(-1).cpu()
        for i, (tok, entry) in enumerate(zip(res.token_ids, res.logprobs)):
            assert abs(entry.logprob - lp[i, tok].item()) < LOGPROB_TOL
            top2 = lp[i].topk(2).values
            assert tok == lp[i].argmax() or top2[0] - top2[1] < 2 * LOGPROB_TOL
    if cuda_graphs:
        assert any(b.graph is not None for b in gen.runner.graphs._buckets.values())
    assert gen.pool.allocator.is_whole()


def test_enable_fp8_on_gpu():
    model = make_model("llama", dtype=torch.float32, head_dim=64).cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch([5, 40, 20, 9], seed=1).items()}
    kw = dict(max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(**batch, **kw)
    hf_paged.enable(model, kv_cache_dtype="fp8", num_blocks=64)
    try:
        out = model.generate(**batch, **kw)
    finally:
        hf_paged.disable(model)
    width = batch["input_ids"].shape[1]
    worst, bad_flips, _ = _compare_steps(out.scores, ref.scores, out.sequences[:, width:], ref.sequences[:, width:])
    assert worst < LOGPROB_TOL and not bad_flips


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_swap_on_gpu_matches_no_preemption(kv_cache_dtype):
    model = make_model("llama", dtype=torch.float32, head_dim=64).cuda()
    prompts = _prompts(1)
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, top_k=20, seed=i, ignore_eos=True) for i in range(6)]
    roomy = ContinuousGenerator(model, num_blocks=64, kv_cache_dtype=kv_cache_dtype, progress=False)
    expected = [r.token_ids for r in roomy.generate(prompts, params)]
    gen = ContinuousGenerator(model, num_blocks=7, kv_cache_dtype=kv_cache_dtype, preemption_mode="swap",
                              swap_space_gb=2**-8, progress=False)
    assert gen.pool.swap_kv.is_pinned()
    assert [r.token_ids for r in gen.generate(prompts, params)] == expected
    stats = gen.stats
    assert stats.swapped_out_blocks > 0 and stats.swapped_in_blocks == stats.swapped_out_blocks
    assert stats.recomputed_tokens == 0
    assert gen.pool.allocator.is_whole() and gen.core.scheduler.num_swap_slots_used == 0


def check_logprobs_against_stock_forward(model, prompts, results, tol: float) -> None:
    """The engine's logprobs equal a stock forward's over its own outputs (within ``tol``), and each greedy
    token is the stock argmax or within a near tie of it."""
    for p, res in zip(prompts, results):
        with torch.no_grad():
            lp = model(torch.tensor([p + res.token_ids], device="cuda")).logits[0, len(p) - 1 : -1].double().log_softmax(-1)
        for i, (tok, entry) in enumerate(zip(res.token_ids, res.logprobs)):
            assert abs(entry.logprob - lp[i, tok].item()) < tol
            top2 = lp[i].topk(2).values
            assert tok == lp[i].argmax() or top2[0] - top2[1] < 2 * tol


def test_fine_grained_fp8_weights_under_the_engine():
    """A model quantized by transformers' FineGrainedFP8Config (FP8 weights, 128x128 block scales) runs
    under enable() and ContinuousGenerator: greedy tokens equal stock generate on the same quantized model
    until the first near tie, and the engine's logprobs match a stock forward over its own outputs."""
    import copy

    import transformers

    base = make_model("llama", dtype=torch.bfloat16, head_dim=64).cuda()
    model = type(base).from_pretrained(
        None, config=copy.deepcopy(base.config), state_dict=base.state_dict(), dtype=torch.bfloat16, device_map="cuda",
        quantization_config=transformers.FineGrainedFP8Config(),
    ).eval()
    model.generation_config.pad_token_id = 0
    assert model.model.layers[0].mlp.up_proj.weight.dtype == FP8
    try:
        model(torch.tensor([[5, 6, 7]], device="cuda"))
    except ImportError as e:  # some transformers versions load the FP8 matmul from the `kernels` package
        pytest.skip(f"stock transformers cannot run FP8 weights here: {e}")
    prompts = _prompts(2)
    gen = ContinuousGenerator(model, num_blocks=64, progress=False)
    results = gen.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0, logprobs=0, ignore_eos=True))
    tol = 0.1  # bf16 activations: the packed forward and stock generate round differently
    check_logprobs_against_stock_forward(model, prompts, results, tol)
    hf_paged.enable(model, num_blocks=64)
    try:
        for p in prompts[:3]:
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
            hf_paged.disable(model)
            ref = model.generate(ids, max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
            hf_paged.enable(model, num_blocks=64)
            worst, bad, _ = _compare_steps(out.scores, ref.scores, out.sequences[:, len(p):], ref.sequences[:, len(p):])
            assert worst < tol and not bad
    finally:
        hf_paged.disable(model)
