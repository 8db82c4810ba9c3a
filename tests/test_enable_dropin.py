"""``enable`` as a drop-in for stock ``generate``: any 2D mask, attention weights, returned caches,
generation settings read at every call, the pool-fit check and the train() warning.

Ground truth is stock ``generate`` on the same inputs (float64 CPU, so greedy near-ties do not decide).
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache, StaticCache, StoppingCriteria, StoppingCriteriaList

import hf_paged
from hf_paged import PagedCache
from models import VOCAB, left_padded_batch, make_config, make_model

NEW = 6
GREEDY = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)


def right_padded_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros((len(lengths), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def gappy_batch(rows: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random holes anywhere but the first and last columns (a fully masked first query is NaN in
    some stock attentions, which would make stock itself an unusable reference)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, width), generator=g)
    attention_mask = (torch.rand((rows, width), generator=g) > 0.35).long()
    attention_mask[:, 0] = attention_mask[:, -1] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def paged_run(model, *args, **kwargs):
    """``model.generate`` under enable; checks every block went back to the pool (or to the returned cache)."""
    hf_paged.enable(model)
    try:
        out = model.generate(*args, **kwargs)
        cache = getattr(out, "past_key_values", None)
        pool = model._hf_paged_state.pool
        if isinstance(cache, PagedCache):
            cache.release()
        if pool is not None:
            assert pool.allocator.is_whole(), "blocks leaked"
        return out
    finally:
        hf_paged.disable(model)


def assert_same_generation(stock, paged):
    assert torch.equal(stock.sequences, paged.sequences)
    torch.testing.assert_close(torch.stack(paged.logits), torch.stack(stock.logits), rtol=1e-6, atol=1e-6)


# ---- 1. any 2D mask ------------------------------------------------------------------------------
# mistral (window 7) and gemma2 (window 6, softcap) count their sliding windows in columns, padding
# included: the right-padded rows below put pads inside the window of the last query.
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt2", "opt", "qwen3", "falcon"])
@pytest.mark.parametrize("kind", ["right", "gappy"])
def test_any_2d_mask_matches_stock(name, kind):
    batch = right_padded_batch([6, 9, 4], seed=1) if kind == "right" else gappy_batch(3, 11, seed=2)
    model = make_model(name)
    stock = model.generate(**batch, **GREEDY)
    assert_same_generation(stock, paged_run(model, **batch, **GREEDY))


def test_masked_columns_are_not_stored():
    model = make_model("llama")
    batch = gappy_batch(2, 12, seed=3)
    hf_paged.enable(model, block_size=16)
    try:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        # Prompt tokens whose mask is 1, plus the new tokens except the last (never written).
        assert cache.real_lengths == (batch["attention_mask"].sum(dim=1) + 2).tolist()
        cache.release()
    finally:
        hf_paged.disable(model)


def test_beams_with_right_padding_match_stock():
    model = make_model("qwen2")
    batch = right_padded_batch([5, 8], seed=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    stock = model.generate(**batch, **kwargs)
    assert torch.equal(stock, paged_run(model, **batch, **kwargs))


# ---- 2. output_attentions --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("kind", ["right", "left"])
def test_output_attentions_match_stock_eager(name, kind):
    # Left padding: the first query of a row sees a token only if the row starts there; stock's weights
    # for queries that see nothing are meaningless (and stay out of the comparison).
    batch = right_padded_batch([5, 8], seed=5) if kind == "right" else left_padded_batch([8, 8], seed=5)
    model = make_model(name, attn_implementation="eager")
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_attentions=True)
    stock = model.generate(**batch, **kwargs)
    paged = paged_run(model, **batch, **kwargs)
    assert torch.equal(stock.sequences, paged.sequences)
    assert len(paged.attentions) == len(stock.attentions) == 4
    for step_stock, step_paged in zip(stock.attentions, paged.attentions):
        assert len(step_paged) == len(step_stock) == model.config.num_hidden_layers
        for a, b in zip(step_stock, step_paged):
            assert a.shape == b.shape
            # Stock eager takes its softmax in float32.
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["assisted", "prompt_lookup"])
def test_output_attentions_with_assisted_decoding(mode):
    model = make_model("llama", attn_implementation="eager")
    if mode == "assisted":
        extra = {"assistant_model": make_model("llama", seed=1, attn_implementation="eager")}
    else:
        extra = {"prompt_lookup_num_tokens": 2}
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_attentions=True, **extra)
    stock = model.generate(input_ids=ids, **kwargs)
    if mode == "assisted":
        hf_paged.enable(extra["assistant_model"])
    try:
        paged = paged_run(model, input_ids=ids, **kwargs)
    finally:
        hf_paged.disable(extra.get("assistant_model", model))
    assert torch.equal(stock.sequences, paged.sequences)
    for step_stock, step_paged in zip(stock.attentions, paged.attentions):
        for a, b in zip(step_stock, step_paged):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---- 3. assisted decoding when the model generates the pad token -----------------------------------
def test_assisted_decoding_through_generated_pad_token():
    model = make_model("llama", seed=0)
    assistant = make_model("llama", seed=1)
    ids = torch.tensor([[9, 17, 33, 4, 61, 12, 8]])
    plain = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    # Make the 3rd generated token the pad token: generate then infers the assistant's mask from pad
    # tokens, which puts a hole in it (in a column the assistant may already have stored).
    pad = int(plain[0, ids.shape[1] + 2])
    for m in (model, assistant):
        m.generation_config.pad_token_id = pad
        m.generation_config.eos_token_id = None
    kwargs = dict(input_ids=ids, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    stock = model.generate(**kwargs)
    assert torch.equal(stock, plain)
    hf_paged.enable(assistant)
    try:
        paged = paged_run(model, **kwargs)
        assert assistant._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(assistant)
    assert torch.equal(paged, stock)


def test_mask_revealing_an_unstored_column_is_refused():
    model = make_model("llama")
    batch = right_padded_batch([4, 6], seed=6)
    hf_paged.enable(model)
    try:
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        ids = out.sequences
        mask = torch.ones_like(ids)  # claims row 0's padding columns are tokens now
        with pytest.raises(ValueError, match="column 4, which was masked out"):
            model.generate(input_ids=ids, attention_mask=mask, past_key_values=out.past_key_values, max_new_tokens=1)
        out.past_key_values.release()
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)


# ---- 4. generation settings read at every call ------------------------------------------------------
def _forward_caches(model):
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: seen.append(type(k.get("past_key_values")).__name__), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("where", ["config", "generation_config"])
def test_use_cache_false_checkpoint_generates_like_stock(where, tmp_path):
    config = make_config("llama")
    model = make_model("llama")
    if where == "config":  # as saved after training with gradient checkpointing
        config.use_cache = False
        model = type(model)(config).to(torch.float64).eval()
        model.load_state_dict(make_model("llama").state_dict())
        model.generation_config.pad_token_id = 0
        assert model.generation_config.use_cache is False
    else:
        model.generation_config.use_cache = False
    batch = left_padded_batch([5, 9], seed=7)
    stock = model.generate(**batch, **GREEDY)
    hf_paged.enable(model)
    seen, handle = _forward_caches(model)
    try:
        paged = model.generate(**batch, **GREEDY)
    finally:
        handle.remove()
        hf_paged.disable(model)
    assert_same_generation(stock, paged)
    assert "PagedCache" not in seen and paged.past_key_values is None


def test_cache_implementation_set_after_enable_is_respected():
    model = make_model("llama")
    batch = left_padded_batch([5, 9], seed=8)
    stock = model.generate(**batch, **GREEDY)
    hf_paged.enable(model)
    try:
        model.generation_config.cache_implementation = "static"
        static = model.generate(**batch, **GREEDY)
        assert isinstance(static.past_key_values, StaticCache)
        model.generation_config.cache_implementation = None
        paged = model.generate(**batch, **GREEDY)
        assert isinstance(paged.past_key_values, PagedCache)
        paged.past_key_values.release()
    finally:
        hf_paged.disable(model)
    assert_same_generation(stock, static)
    assert_same_generation(stock, paged)


def test_compile_config_without_a_static_cache_runs_paged():
    # A compile_config only compiles with a compileable cache (a static one): with the default cache,
    # stock generate runs eagerly, and so does the paged cache.
    from transformers import CompileConfig

    model = make_model("llama")
    batch = left_padded_batch([5, 9], seed=9)
    stock = model.generate(**batch, **GREEDY, compile_config=CompileConfig())
    paged = paged_run(model, **batch, **GREEDY, compile_config=CompileConfig())
    assert_same_generation(stock, paged)
    assert not hasattr(model, "_compiled_call")


# ---- 5. the returned cache ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "falcon"])
def test_returned_cache_reads_like_a_dynamic_cache(name):
    model = make_model(name)
    batch = left_padded_batch([5, 9, 7], seed=10)
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    stock = model.generate(**batch, **kwargs, past_key_values=DynamicCache(config=model.config))
    hf_paged.enable(model)
    try:
        paged = model.generate(**batch, **kwargs)
        cache = paged.past_key_values
        assert isinstance(cache, PagedCache) and len(cache) == model.config.num_hidden_layers
        assert cache.get_seq_length() == stock.past_key_values.get_seq_length() == 9 + 3
        real = torch.cat([batch["attention_mask"], torch.ones(3, 3, dtype=torch.long)], dim=1).bool()
        for ours, theirs in zip(cache.layers, stock.past_key_values.layers):
            assert ours.keys.shape == theirs.keys.shape and ours.values.shape == theirs.values.shape
            for mine, ref in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                # Real columns hold the same K/V; padding columns hold zeros (stock: the pad token's).
                torch.testing.assert_close(mine.transpose(1, 2)[real], ref.transpose(1, 2)[real], rtol=1e-6, atol=1e-6)
                assert not mine.transpose(1, 2)[~real].any()
        pool = model._hf_paged_state.pool
        assert pool.allocator.num_used == cache.num_blocks_used > 0
        del paged, cache, ours, theirs
        assert pool.allocator.is_whole(), "dropping the returned cache gives its blocks back"
    finally:
        hf_paged.disable(model)


def _generate_in_two_calls(model, batch, cache=None, **kwargs):
    first = model.generate(**batch, max_new_tokens=3, past_key_values=cache, **kwargs)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    rest = model.generate(
        input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values, max_new_tokens=2, **kwargs
    )
    return first, rest


@pytest.mark.parametrize("batch_kind", ["left", "right"])
def test_continuing_from_a_returned_cache_does_not_recompute(batch_kind):
    model = make_model("llama")
    batch = left_padded_batch([5, 9], seed=11) if batch_kind == "left" else right_padded_batch([5, 9], seed=11)
    kwargs = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
    whole = model.generate(**batch, max_new_tokens=5, **kwargs)
    stock = _generate_in_two_calls(model, batch, DynamicCache(config=model.config), **kwargs)
    hf_paged.enable(model)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        first, rest = _generate_in_two_calls(model, batch, **kwargs)
        assert seen[-2:] == [1, 1], "the continuation recomputed cached tokens"
        assert rest.past_key_values is first.past_key_values
        rest.past_key_values.release()
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        handle.remove()
        hf_paged.disable(model)
    for ours, theirs in zip((first, rest), stock):
        assert_same_generation(theirs, ours)
    if batch_kind == "left":
        # Right padding is not resumable even in stock: a single call gives the new tokens of a padded
        # row positions counted from its last (padding) column, a continuation counts from the mask.
        assert torch.equal(rest.sequences, whole.sequences)
        torch.testing.assert_close(torch.stack(first.logits + rest.logits), torch.stack(whole.logits), rtol=1e-6, atol=1e-6)


# ---- pool-fit check and train() warning ---------------------------------------------------------------
def test_call_that_cannot_fit_the_pool_is_refused_before_any_work():
    model = make_model("llama")
    batch = left_padded_batch([6, 11, 4], seed=12)
    heads = []
    model.lm_head.register_forward_hook(lambda *a: heads.append(1))
    hf_paged.enable(model, num_blocks=9, block_size=16)
    try:
        # Final lengths (the last new token is never written) 6+39, 11+39, 4+39 -> 3 + 4 + 3 = 10 blocks.
        with pytest.raises(hf_paged.PoolExhaustedError, match=r"needs at least 10 KV blocks of 16 tokens .* 9 free of 9"):
            model.generate(**batch, max_new_tokens=40, do_sample=False)
        assert not heads, "the model ran a forward before the refusal"
        assert model._hf_paged_state.pool.allocator.is_whole()
        # 6+26, 11+26, 4+26 -> 2 + 3 + 2 = 7 blocks: fits and runs.
        out = model.generate(**batch, max_new_tokens=27, do_sample=False)
        assert out.shape[1] == 11 + 27
    finally:
        hf_paged.disable(model)


def test_sampled_copies_and_beams_count_shared_prompts():
    model = make_model("llama")
    batch = left_padded_batch([32], seed=13)  # two full prompt blocks, shared by every copy
    hf_paged.enable(model, num_blocks=8, block_size=16)
    try:
        # 4 samples x (ceil((32 + 15) / 16) - 2) = 4 own blocks + 2 shared = 6 <= 8.
        model.generate(**batch, max_new_tokens=16, do_sample=True, num_return_sequences=4)
        # 4 samples x (ceil((32 + 17) / 16) - 2) = 8 own + 2 shared = 10 > 8.
        with pytest.raises(hf_paged.PoolExhaustedError, match="needs at least 10 KV blocks"):
            model.generate(**batch, max_new_tokens=18, do_sample=True, num_return_sequences=4)
        # Beams share what their histories have in common, so the least they need is one beam's blocks
        # plus one block per other beam: 2 shared + 1 + 3 = 6 <= 8 runs; 2 + 4 + 3 = 9 > 8 is refused.
        model.generate(**batch, max_new_tokens=16, num_beams=4, do_sample=False)
        with pytest.raises(hf_paged.PoolExhaustedError, match="needs at least 9 KV blocks"):
            model.generate(**batch, max_new_tokens=50, num_beams=4, do_sample=False)
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)


class _TakeBlocks(StoppingCriteria):
    """Takes the pool's free blocks mid-call, as another user of the pool would."""

    def __init__(self, model):
        self.model, self.taken = model, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.taken is None:
            allocator = self.model._hf_paged_state.pool.allocator
            self.taken = allocator.allocate(allocator.num_free)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_pool_exhausted_mid_call_is_a_clear_error():
    model = make_model("llama")
    hf_paged.enable(model, num_blocks=12)
    try:
        thief = _TakeBlocks(model)
        with pytest.raises(hf_paged.PoolExhaustedError, match="KV pool is full"):
            model.generate(
                **left_padded_batch([6, 11], seed=14), max_new_tokens=40, stopping_criteria=StoppingCriteriaList([thief])
            )
        allocator = model._hf_paged_state.pool.allocator
        allocator.free(thief.taken)
        assert allocator.is_whole()
    finally:
        hf_paged.disable(model)


def test_train_mode_warns_once(caplog):
    model = make_model("llama")
    model.train()
    hf_paged.enable(model)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_paged"):
            for _ in range(2):
                model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
        model.eval()
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    finally:
        hf_paged.disable(model)
    said = [r for r in caplog.records if "training mode" in r.getMessage()]
    assert len(said) == 1 and "model.eval()" in said[0].getMessage()
