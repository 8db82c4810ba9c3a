"""``enable`` on CUDA: the Triton kernels inside stock ``generate`` (run on the H200; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

import hf_paged
from models import left_padded_batch, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "qwen3", "gpt2", "opt", "falcon"])
def test_triton_path_matches_stock_fp32(name):
    model = make_model(name, dtype=torch.float32, head_dim=64).cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch([5, 40, 3, 17], seed=2).items()}
    kwargs = dict(max_new_tokens=24, do_sample=False, return_dict_in_generate=True, output_logits=True)
    stock = model.generate(**batch, **kwargs)
    hf_paged.enable(model, block_size=16)
    try:
        paged = model.generate(**batch, **kwargs)
        paged.past_key_values.release()  # a returned cache keeps its blocks for its reader until released
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)
    stock_logits = torch.stack(stock.logits, 1)
    paged_logits = torch.stack(paged.logits, 1)
    rows = torch.isfinite(stock_logits).flatten(1).all(1)  # stock Gemma2 eager: NaN on padded rows
    assert rows.any()
    assert torch.equal(paged.sequences[rows], stock.sequences[rows])
    torch.testing.assert_close(paged_logits[rows], stock_logits[rows], rtol=1e-3, atol=1e-3)


def test_bf16_llama_close_to_stock():
    model = make_model("llama", dtype=torch.bfloat16, head_dim=64).cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch([9, 33], seed=4).items()}
    stock = model(**batch).logits
    hf_paged.enable(model)
    try:
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
    finally:
        hf_paged.disable(model)
    torch.testing.assert_close(out.logits[0].float(), stock[:, -1].float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mode", ["beams", "return_sequences"])
def test_shared_prompt_rows_match_stock_fp32(mode):
    """Rows generate expands from one prompt share its blocks (written once) through the Triton path."""
    model = make_model("llama", dtype=torch.float32, head_dim=64).cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch([40, 35], seed=4).items()}
    kw = dict(max_new_tokens=16, num_beams=4, do_sample=False) if mode == "beams" else \
        dict(max_new_tokens=16, do_sample=True, top_k=20, num_return_sequences=4)
    torch.manual_seed(3)
    stock = model.generate(**batch, **kw)
    hf_paged.enable(model, block_size=16)
    try:
        torch.manual_seed(3)
        paged = model.generate(**batch, **kw)
        allocator = model._hf_paged_state.pool.allocator
        assert allocator.peak_used < 8 * 4 and allocator.is_whole()  # 8 rows x 4 blocks if nothing were shared
    finally:
        hf_paged.disable(model)
    assert torch.equal(stock, paged)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "falcon"])
@pytest.mark.parametrize("kind", ["right", "gappy"])
def test_other_masks_match_stock_fp32(name, kind):
    """Right padding and holes on CUDA: the prompt step takes the explicit-mask path, decode steps the
    Triton kernel (or, for windowed rows with holes, the explicit-mask path again)."""
    from test_enable_dropin import gappy_batch, right_padded_batch

    model = make_model(name, dtype=torch.float32, head_dim=64).cuda()
    batch = right_padded_batch([5, 30, 12, 17], seed=2) if kind == "right" else gappy_batch(4, 30, seed=2)
    batch = {k: v.cuda() for k, v in batch.items()}
    kwargs = dict(max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_logits=True)
    stock = model.generate(**batch, **kwargs)
    hf_paged.enable(model, block_size=16)
    try:
        paged = model.generate(**batch, **kwargs)
        paged.past_key_values.release()
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)
    assert torch.equal(paged.sequences, stock.sequences)
    torch.testing.assert_close(torch.stack(paged.logits, 1), torch.stack(stock.logits, 1), rtol=1e-3, atol=1e-3)


def test_output_attentions_on_cuda():
    model = make_model("llama", dtype=torch.float32, head_dim=64, attn_implementation="eager").cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch([9, 9], seed=5).items()}
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_attentions=True)
    stock = model.generate(**batch, **kwargs)
    hf_paged.enable(model)
    try:
        paged = model.generate(**batch, **kwargs)
        paged.past_key_values.release()
    finally:
        hf_paged.disable(model)
    assert torch.equal(paged.sequences, stock.sequences)
    for step_stock, step_paged in zip(stock.attentions, paged.attentions):
        for a, b in zip(step_stock, step_paged):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
