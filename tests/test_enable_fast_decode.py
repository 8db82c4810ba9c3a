"""``enable()``'s decode steps run from static buffers (the CUDA-graph path), checked on CPU.

On CUDA those buffers are captured once and replayed; here the same path runs eagerly (``capture=False``):
the cache plans each step on the host only, the step's lengths, block table, slots and position go into
the graph's buffers, and the forward reads nothing else. Tokens must equal stock ``generate`` on each
prompt alone, and every step the path cannot express must take the ordinary eager path.
"""

from __future__ import annotations

import pytest
import torch

import hf_paged
from hf_paged.integration.decode_graphs import GRAPH_MODEL_TYPES, DecodeGraphs, table_width
from models import left_padded_batch, make_model

LENGTHS = [5, 19, 3]
NEW = 20


def _static_path(model, **options) -> DecodeGraphs:
    hf_paged.enable(model, **options)
    graphs = model._hf_paged_state.graphs = DecodeGraphs(model, capture=False)
    return graphs


def _alone(model, batch, row, **kwargs):
    ids = batch["input_ids"][row : row + 1, batch["attention_mask"][row].bool()]
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1] :]


@pytest.mark.parametrize("name", sorted(GRAPH_MODEL_TYPES))
def test_static_decode_matches_stock_per_prompt(name):
    model = make_model(name)
    batch = left_padded_batch(LENGTHS, seed=3)
    kwargs = dict(max_new_tokens=NEW, do_sample=False)
    alone = [_alone(model, batch, row, **kwargs) for row in range(len(LENGTHS))]
    graphs = _static_path(model)
    try:
        out = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)
    for row in range(len(LENGTHS)):
        assert torch.equal(out[row], alone[row]), (name, row)
    assert graphs.replays == NEW - 1  # every step after the prompt's went through the static buffers


def test_logits_match_eager_paged_path_and_graph_is_reused():
    model = make_model("llama")
    batch = left_padded_batch(LENGTHS, seed=5)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    hf_paged.enable(model)
    try:
        model._hf_paged_state.graphs = None
        eager = model.generate(**batch, **kwargs)
        eager.past_key_values.release()
        graphs = model._hf_paged_state.graphs = DecodeGraphs(model, capture=False)
        first = model.generate(**batch, **kwargs)
        first.past_key_values.release()
        second = model.generate(**batch, **kwargs)
        second.past_key_values.release()
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)
    assert torch.equal(first.sequences, eager.sequences) and torch.equal(second.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(first.logits), torch.stack(eager.logits), rtol=1e-9, atol=1e-9)
    assert graphs.replays == 2 * 11
    assert len(graphs._graphs) == 1  # one batch size, one table width: the second call reused the buffers


@pytest.mark.parametrize("mode", ["beams", "return_sequences", "sampling"])
def test_row_surgery_and_sampling_match_eager_paged_path(mode):
    model = make_model("qwen2")
    batch = left_padded_batch([7, 2], seed=1)
    kwargs = {
        "beams": dict(num_beams=3, do_sample=False),
        "return_sequences": dict(num_return_sequences=2, do_sample=True, top_k=5),
        "sampling": dict(do_sample=True, temperature=0.8),
    }[mode]
    hf_paged.enable(model)
    try:
        model._hf_paged_state.graphs = None
        torch.manual_seed(0)
        eager = model.generate(**batch, max_new_tokens=16, **kwargs)
        graphs = model._hf_paged_state.graphs = DecodeGraphs(model, capture=False)
        torch.manual_seed(0)
        static = model.generate(**batch, max_new_tokens=16, **kwargs)
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)
    assert torch.equal(static, eager)
    assert graphs.replays > 0


def test_beams_match_stock():
    model = make_model("llama")
    batch = left_padded_batch([6], seed=2)
    kwargs = dict(max_new_tokens=10, num_beams=3, do_sample=False)
    stock = model.generate(**batch, **kwargs)
    graphs = _static_path(model)
    try:
        paged = model.generate(**batch, **kwargs)
    finally:
        hf_paged.disable(model)
    assert torch.equal(paged, stock)
    assert graphs.replays > 0


def test_steps_the_buffers_cannot_express_run_eagerly():
    """Attention weights, a right-padded prompt (explicit per-row columns), chunked prefill's first
    chunks: those forwards take the ordinary path; the tokens still match stock."""
    model = make_model("llama")
    batch = left_padded_batch(LENGTHS, seed=3)
    graphs = _static_path(model)
    try:
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
        out.past_key_values.release()
        assert graphs.replays == 0
        right = {k: v.flip(1) for k, v in batch.items()}  # right padding: every row stores explicit columns
        paged_right = model.generate(**right, max_new_tokens=6, do_sample=False)
        assert graphs.replays == 0
    finally:
        hf_paged.disable(model)
    stock = model.generate(**batch, max_new_tokens=6, do_sample=False, output_attentions=True,
                           return_dict_in_generate=True)
    assert torch.equal(out.sequences, stock.sequences)
    assert torch.equal(paged_right, model.generate(**right, max_new_tokens=6, do_sample=False))


def test_disable_restores_forward_and_plain_forwards_are_untouched():
    model = make_model("llama")
    batch = left_padded_batch([4, 9], seed=0)
    before = model(**batch).logits
    graphs = _static_path(model)
    assert "forward" in vars(model)
    after = model(**batch).logits  # a plain forward: no PagedCache, the original forward
    assert torch.equal(before, after)
    assert graphs.replays == 0
    hf_paged.disable(model)
    assert "forward" not in vars(model) and "generate" not in vars(model)


def test_option_and_supported_families():
    model = make_model("opt")
    hf_paged.enable(model)
    try:
        assert model._hf_paged_state.graphs is None  # not a family checked through the static path
    finally:
        hf_paged.disable(model)
    llama = make_model("llama")
    hf_paged.enable(llama, cuda_graphs=False)
    try:
        assert llama._hf_paged_state.graphs is None
    finally:
        hf_paged.disable(llama)
    with pytest.raises(TypeError, match="cuda_graphs"):
        hf_paged.enable(llama, cuda_graphs="yes")
    assert not hf_paged.is_enabled(llama)
    assert DecodeGraphs.supports(llama)
    # Dynamic NTK scaling picks its frequencies on the host from the positions seen: stays eager.
    llama.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not DecodeGraphs.supports(llama)


def test_table_width_covers_the_call():
    assert table_width(1, 0, 16) == 16  # never below MIN_WIDTH
    assert table_width(33, 768, 16) == 64  # 512 prompt + 256 new tokens: one graph for the whole call
    assert table_width(70, 768, 16) == 128  # a row longer than the hint (a continued cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_stock_fp32():
    """On CUDA: captured once, replayed by later steps and calls, recaptured when the weights are replaced."""
    model = make_model("llama", dtype=torch.float32, head_dim=64).cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch([5, 40, 3, 17], seed=2).items()}
    kwargs = dict(max_new_tokens=24, do_sample=False, return_dict_in_generate=True, output_logits=True)
    stock = model.generate(**batch, **kwargs)
    hf_paged.enable(model)
    graphs = model._hf_paged_state.graphs
    try:
        runs = []
        for _ in range(2):
            out = model.generate(**batch, **kwargs)
            out.past_key_values.release()
            runs.append(out)
        assert (graphs.captures, graphs.replays) == (1, 2 * 23)
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        out = model.generate(**batch, **kwargs)
        out.past_key_values.release()
        runs.append(out)
        assert graphs.captures == 2  # the old graph read the replaced parameters
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)
    for out in runs:
        assert torch.equal(out.sequences, stock.sequences)
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(stock.logits), rtol=1e-3, atol=1e-3)


def test_compiled_static_decode_matches_stock():
    """compile='decode': the forward the graphs capture is torch.compile's (here without capture)."""
    model = make_model("llama")
    batch = left_padded_batch(LENGTHS, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    alone = [_alone(model, batch, row, **kwargs) for row in range(len(LENGTHS))]
    hf_paged.enable(model, compile="decode")
    try:
        assert model._hf_paged_state.graphs.compile
        graphs = model._hf_paged_state.graphs = DecodeGraphs(model, capture=False, compile=True)
        out = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    finally:
        hf_paged.disable(model)
    for row in range(len(LENGTHS)):
        assert torch.equal(out[row], alone[row]), row
    assert graphs.replays == 7 and graphs._compiled is not None
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        hf_paged.enable(model, compile="decode", cuda_graphs=False)
    with pytest.raises(ValueError, match="compile"):
        hf_paged.enable(model, compile="all")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_graphs_match_stock_fp32():
    model = make_model("llama", dtype=torch.float32, head_dim=64).cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch([5, 40, 3, 17], seed=2).items()}
    kwargs = dict(max_new_tokens=16, do_sample=False)
    stock = model.generate(**batch, **kwargs)
    hf_paged.enable(model, compile="decode")
    graphs = model._hf_paged_state.graphs
    try:
        paged = model.generate(**batch, **kwargs)
    finally:
        hf_paged.disable(model)
    assert (graphs.captures, graphs.replays) == (1, 15)
    assert torch.equal(paged, stock)
