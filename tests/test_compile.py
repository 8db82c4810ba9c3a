"""``compile="decode" | "all"``: the decoder layers through ``torch.compile`` around the opaque paged ops.

Checked on CPU with Inductor (it generates C++ here) on tiny float64 models: greedy tokens identical
to the eager engine and to stock ``generate`` on each prompt alone, logprobs within 1e-6, the padded
decode-graph path compiled, no graph break inside the compiled decoder layers (the attention and the
K/V write are single custom-op nodes), one graph for all steps and layers, and the custom ops
themselves against their contract (``torch.library.opcheck``: schema, fake tensors, declared mutation).
"""

from __future__ import annotations

import functools

import pytest
import torch
from models import VOCAB, make_model

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.engine.cuda_graphs import DecodeGraphs
from hf_paged.engine.fusion import CompiledLayers
from hf_paged.integration import attention  # registers the ops
from hf_paged.memory.kv_pool import KVLayout, KVPool
from hf_paged.memory.metadata import build_step_metadata
from hf_paged.options import EngineOptions

LENGTHS = [3, 41, 17, 9]
NEW = 10
PARAMS = SamplingParams(max_new_tokens=NEW, temperature=0, logprobs=2)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@functools.cache
def model_and_stock(name: str):
    model = make_model(name)  # float64: greedy parity must not hinge on near-ties
    stock = []
    for p in prompts():
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)
        stock.append(out[0, len(p) :].tolist())
    return model, stock


def dynamo_counters():
    counters = torch._dynamo.utils.counters
    return dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def assert_same_results(got, want, label):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, f"{label} prompt {i}: {g.token_ids} vs eager {w.token_ids}"
        for a, b in zip(g.logprobs, w.logprobs):
            # float64 models still run RMSNorm and RoPE's cos/sin in float32 (as transformers writes them),
            # where Inductor's fused reductions and vectorised cos/sin round differently.
            assert a.logprob == pytest.approx(b.logprob, abs=1e-6)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.slow
# Graphs compiled: one per kind of layer (gemma2 alternates sliding-window and full-attention layers, and
# passes the window and softcap through the op), whatever the depth, batch size or prompt length.
@pytest.mark.parametrize("name, graphs", [("llama", 1), ("qwen2", 1), ("gemma2", 2)])
def test_compiled_steps_match_eager_and_stock_generate(name, graphs):
    model, stock = model_and_stock(name)
    eager = ContinuousGenerator(model, progress=False, num_blocks=64).generate(prompts(), PARAMS)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = ContinuousGenerator(model, progress=False, num_blocks=64, compile="all")
    compiled = gen.generate(prompts(), PARAMS)
    alone = gen.generate(prompts()[1:2], PARAMS)[0]  # a batch of one row: prompt, then decode steps
    assert alone.token_ids == stock[1]
    breaks, compiled_graphs = dynamo_counters()
    assert breaks == {}, f"graph breaks in the compiled forward: {breaks}"
    # The same graphs for every step, prompts and decodes, batches of 4 down to 1 (padded to 2: a size of
    # 1 would specialize into new graphs) and every layer (its index is a symbol, not a constant).
    assert compiled_graphs == graphs
    assert gen.runner.compile_seconds > 0
    assert_same_results(compiled, eager, f"{name} compiled")
    for i, (res, ref) in enumerate(zip(compiled, stock)):
        assert res.token_ids == ref, f"{name} prompt {i}: compiled {res.token_ids} vs stock {ref}"
    assert gen.pool.allocator.is_whole()


@pytest.mark.slow
def test_compiled_padded_decode_graph_path():
    """The decode graphs' padded buckets (run eagerly on CPU; captured on CUDA) with the compiled forward,
    prompts still prefilled eagerly (``compile="decode"``)."""
    model, stock = model_and_stock("llama")
    eager = ContinuousGenerator(model, progress=False, num_blocks=64).generate(prompts(), PARAMS)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = ContinuousGenerator(model, progress=False, num_blocks=64, compile="decode")
    runner = gen.runner
    forward = functools.partial(runner.forward, compiled=True)  # what prepare() builds on CUDA
    # Buckets of 2 and 8: batches of 1 and 3-4 rows are padded with side-effect-free rows.
    runner.graphs = DecodeGraphs(forward, gen.pool, max_blocks_per_seq=8, max_batch=8, buckets=(2, 8), capture=False)
    padded = gen.generate(prompts(), PARAMS)
    assert_same_results(padded, eager, "padded compiled decode")
    assert [r.token_ids for r in padded] == stock
    assert 8 in runner.graphs._buckets
    breaks, graphs = dynamo_counters()
    assert breaks == {} and graphs == 1  # padded batches of 2 and 8 rows share one dynamic graph
    assert gen.pool.allocator.is_whole()
    # The compiled layer forwards are swapped in only during the engine's steps; the layer-index tensors
    # the engine adds are plain host attributes, not part of the model's state.
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert [a._hf_paged_layer.item() for a in (layer.self_attn for layer in model.model.layers)] == [0, 1]
    assert not any("hf_paged" in name for name in model.state_dict())


def test_compile_needs_a_list_of_decoder_layers():
    class NoLayers(torch.nn.Module):
        config = make_model("llama").config

    with pytest.raises(ValueError, match="compile needs the model's decoder layers"):
        CompiledLayers(NoLayers())
    assert len(CompiledLayers(make_model("qwen2")).layers) == 2


def test_compile_option_is_checked():
    with pytest.raises(ValueError, match="compile must be one of"):
        EngineOptions(compile=True)
    with pytest.raises(ValueError, match="fuse_elementwise=True and compile='all' are alternatives"):
        EngineOptions(compile="all", fuse_elementwise=True)
    with pytest.raises(ValueError, match="compile must be one of"):
        ContinuousGenerator(make_model("llama"), progress=False, num_blocks=8, compile="yes")


def test_auto_compiles_only_where_measured_and_tested():
    from hf_paged.engine.model_runner import resolve_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    llama = make_model("llama")
    assert resolve_compile("auto", llama, cuda, "auto", False) == "all"
    assert resolve_compile("auto", make_model("gemma2"), cuda, "triton", False) == "all"
    assert resolve_compile("auto", llama, cpu, "auto", False) == "off"  # CPU: eager
    assert resolve_compile("auto", llama, cuda, "torch", False) == "off"  # the torch attention reference
    assert resolve_compile("auto", llama, cuda, "auto", True) == "off"  # fuse_elementwise asked for instead
    assert resolve_compile("auto", make_model("opt"), cuda, "auto", False) == "off"  # not checked on a GPU
    llama._tp_size = 2  # what transformers sets on a tensor-parallel model
    try:
        assert resolve_compile("auto", llama, cuda, "auto", False) == "off"
    finally:
        del llama._tp_size
    assert resolve_compile("all", make_model("opt"), cpu, "auto", False) == "all"  # explicit modes stay
    gen = ContinuousGenerator(llama, progress=False, num_blocks=8)  # the default, on CPU
    assert gen.options.compile == "auto" and gen.runner.compile_mode == "off"


@pytest.mark.slow
def test_a_failing_compile_warns_and_runs_eagerly(monkeypatch):
    """A compiler failure (here: a torch.compile backend that raises) leaves a working, eager generator
    with the same tokens, not a dead one."""
    from hf_paged.engine import model_runner

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(model_runner, "CompiledLayers", lambda model, backend="inductor": CompiledLayers(model, broken_backend))
    model, stock = model_and_stock("llama")
    torch._dynamo.reset()
    gen = ContinuousGenerator(model, progress=False, num_blocks=64, compile="all")
    assert gen.runner.compile_mode == "all"
    with pytest.warns(RuntimeWarning, match="torch.compile of the decoder layers failed .*running eagerly"):
        out = gen.generate(prompts(), PARAMS)
    assert gen.runner.compile_mode == "off"
    assert [r.token_ids for r in out] == stock
    assert [r.token_ids for r in gen.generate(prompts(), PARAMS)] == stock
    assert gen.pool.allocator.is_whole()


def _pool_and_step(dtype=torch.float32):
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=dtype, device=torch.device("cpu"))
    pool = KVPool(layout, num_blocks=8, block_size=16)
    pool.kv.normal_()
    # Row 0 decodes its 20th token, row 1 prefills 5 tokens after 12 cached ones; -1 = no slot.
    step = build_step_metadata([1, 5], [20, 17], [[3, 5], [1, 6]], 16, torch.device("cpu"))
    return pool, step


def test_attention_op_matches_the_launcher_and_passes_opcheck():
    pool, step = _pool_and_step()
    q = torch.randn(6, 4, 16)
    k_cache, v_cache = pool.layer(1)
    args = (q, k_cache, v_cache, step.block_tables, step.seq_lens, step.query_start_loc, step.max_query_len,
            0.25, None, None, None, None, None, "auto")
    got = torch.ops.hf_paged.paged_attention(*args)
    want = attention.run_paged_attention(q, k_cache, v_cache, step, scale=0.25, sliding_window=None, softcap=None,
                                         sinks=None, backend="auto")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.hf_paged.paged_attention, args)
    windowed = (*args[:8], 4, 30.0, torch.randn(4), *args[11:])  # sliding window, softcap and sinks pass through
    want = attention.run_paged_attention(q, k_cache, v_cache, step, scale=0.25, sliding_window=4, softcap=30.0,
                                         sinks=windowed[10], backend="auto")
    torch.testing.assert_close(torch.ops.hf_paged.paged_attention(*windowed), want, rtol=0, atol=0)


def test_write_op_writes_one_layer_and_passes_opcheck():
    pool, step = _pool_and_step()
    before = pool.kv.clone()
    key, value = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    torch.ops.hf_paged.write_kv(key, value, pool.kv, None, 1, step.slot_mapping)
    slots = step.slot_mapping.tolist()
    k_flat, v_flat = (pool.kv[1, i].view(-1, 2, 16) for i in (0, 1))
    for t, slot in enumerate(slots):
        assert torch.equal(k_flat[slot], key[t]) and torch.equal(v_flat[slot], value[t])
    untouched = torch.ones(pool.kv.shape[:4], dtype=torch.bool)
    untouched[1].view(2, -1)[:, slots] = False
    assert torch.equal(pool.kv[untouched], before[untouched])  # layer 0 and every other slot as they were
    torch.library.opcheck(torch.ops.hf_paged.write_kv, (key, value, pool.kv.clone(), None, 0, step.slot_mapping))


def test_write_and_attend_is_write_then_attention_and_passes_opcheck():
    pool, step = _pool_and_step()
    q, key, value = torch.randn(6, 4, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    layer = torch.tensor(1)  # the layer as a 0-d tensor: an input of the compiled graph, not a constant
    args = (q, key, value, pool.kv, None, layer, step.slot_mapping, step.block_tables, step.seq_lens,
            step.query_start_loc, step.max_query_len, 0.25, None, None, None, "auto")
    reference = pool.kv.clone()
    torch.ops.hf_paged.write_kv(key, value, reference, None, 1, step.slot_mapping)
    want = attention.run_paged_attention(q, reference[1, 0], reference[1, 1], step, scale=0.25, sliding_window=None,
                                         softcap=None, sinks=None, backend="auto")
    got = torch.ops.hf_paged.write_and_attend(*args)
    assert torch.equal(pool.kv, reference)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.hf_paged.write_and_attend, (*args[:3], pool.kv.clone(), *args[4:]))
