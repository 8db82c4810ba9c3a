"""``enable`` under every generate mode, plus memory accounting and "plain forwards are untouched"."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

import hf_paged
from models import left_padded_batch, make_model


def run_both(model, batch, **gen_kwargs):
    """(stock output, paged output) of the same generate call, seeding identically for sampling."""
    torch.manual_seed(1234)
    stock = model.generate(**batch, **gen_kwargs)
    hf_paged.enable(model)
    try:
        torch.manual_seed(1234)
        paged = model.generate(**batch, **gen_kwargs)
        assert model._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)
    return stock, paged


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch([6, 11, 4], seed=3)


def test_sampling_with_seed(llama, batch):
    stock, paged = run_both(llama, batch, max_new_tokens=12, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(stock, paged)


def test_beam_search(llama, batch):
    stock, paged = run_both(llama, batch, max_new_tokens=10, num_beams=3, do_sample=False)
    assert torch.equal(stock, paged)


def test_num_return_sequences(llama, batch):
    stock, paged = run_both(llama, batch, max_new_tokens=8, do_sample=True, num_return_sequences=3)
    assert paged.shape[0] == 9
    assert torch.equal(stock, paged)


def test_assisted_decoding():
    model = make_model("llama", seed=0)
    assistant = make_model("llama", seed=1)
    batch = left_padded_batch([9], seed=4)
    kwargs = dict(max_new_tokens=14, do_sample=False)
    stock = model.generate(**batch, assistant_model=assistant, **kwargs)
    plain = model.generate(**batch, **kwargs)
    assert torch.equal(stock, plain)  # greedy assisted decoding is lossless
    hf_paged.enable(model)
    hf_paged.enable(assistant)
    try:
        paged = model.generate(**batch, assistant_model=assistant, **kwargs)
        assert model._hf_paged_state.pool.allocator.is_whole()
        assert assistant._hf_paged_state.pool.allocator.is_whole()
    finally:
        hf_paged.disable(model)
        hf_paged.disable(assistant)
    assert torch.equal(paged, stock)


def test_prompt_lookup_decoding(llama):
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    stock, paged = run_both(llama, batch, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(stock, paged)


def test_from_pretrained_on_saved_folder(tmp_path, batch):
    make_model("qwen2").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    stock, paged = run_both(model, batch, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(stock, paged)


def test_pipeline_uses_paged_generate(llama):
    # Pipelines call model.generate, so they go through the wrapper too.
    calls = []
    hf_paged.enable(llama)
    try:
        llama.register_forward_pre_hook(
            lambda m, a, k: calls.append(type(k.get("past_key_values")).__name__), with_kwargs=True
        )
        llama.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    finally:
        hf_paged.disable(llama)
        llama._forward_pre_hooks.clear()
    assert calls and set(calls) == {"PagedCache"}


class _BlockProbe(StoppingCriteria):
    """Checks at every step that the pool holds exactly ceil(real tokens / block_size) blocks per row."""

    def __init__(self, model, prompt_lens, block_size, raise_at=None):
        self.model, self.prompt_lens, self.bs, self.raise_at = model, prompt_lens, block_size, raise_at
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        # The newest token is not in the cache yet: it enters at the next forward.
        cached = [n + self.steps - 1 for n in self.prompt_lens]
        expected = sum(-(-n // self.bs) for n in cached)
        used = self.model._hf_paged_state.pool.allocator.num_used
        assert used == expected, f"step {self.steps}: {used} blocks used, expected {expected}"
        if self.steps == self.raise_at:
            raise RuntimeError("boom")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_blocks_track_real_tokens_and_return_to_pool(llama):
    lengths = [5, 16, 31, 17]  # on, under and just past 16-token block boundaries
    batch = left_padded_batch(lengths, seed=5)
    hf_paged.enable(llama, block_size=16)
    try:
        probe = _BlockProbe(llama, lengths, 16)
        llama.generate(**batch, max_new_tokens=20, do_sample=False, stopping_criteria=StoppingCriteriaList([probe]))
        assert probe.steps == 20
        pool = llama._hf_paged_state.pool
        assert pool.allocator.is_whole()
        # Left padding costs nothing: a padded DynamicCache would hold 4 x 31 token slots at prefill.
        probe = _BlockProbe(llama, lengths, 16, raise_at=4)
        with pytest.raises(RuntimeError, match="boom"):
            llama.generate(**batch, max_new_tokens=20, stopping_criteria=StoppingCriteriaList([probe]))
        assert pool.allocator.is_whole(), "blocks leaked after generate raised"
    finally:
        hf_paged.disable(llama)


def _forward_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.logits.detach().clone(), grads


def test_plain_forward_and_training_untouched(batch):
    model = make_model("llama", attn_implementation="sdpa")
    model.train()
    before = _forward_and_grads(model, batch)
    hf_paged.enable(model)
    during = _forward_and_grads(model, batch)
    model.eval()
    model.generate(**batch, max_new_tokens=3)
    model.train()
    after_generate = _forward_and_grads(model, batch)
    hf_paged.disable(model)
    after = _forward_and_grads(model, batch)
    for other in (during, after_generate, after):
        assert torch.equal(before[0], other[0])
        assert all(torch.equal(a, b) for a, b in zip(before[1], other[1]))
    assert model.config._attn_implementation == "sdpa"


def test_forward_in_another_thread_while_generating(batch):
    model = make_model("llama", attn_implementation="eager")
    reference = model(**batch).logits
    hf_paged.enable(model)
    seen = {}

    class RunForwardMidGeneration(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if "logits" not in seen:
                # generate is paused inside this thread with attention switched to hf_paged.
                seen["impl"] = model.config._attn_implementation
                worker = threading.Thread(target=lambda: seen.__setitem__("logits", model(**batch).logits))
                worker.start()
                worker.join()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    try:
        model.generate(**batch, max_new_tokens=4, stopping_criteria=StoppingCriteriaList([RunForwardMidGeneration()]))
    finally:
        hf_paged.disable(model)
    assert seen["impl"] == hf_paged.ATTENTION_NAME
    # Exactly equal; eager attention yields NaN on fully padded rows in both runs alike.
    torch.testing.assert_close(seen["logits"], reference, rtol=0, atol=0, equal_nan=True)


def test_enable_is_idempotent_and_reversible(llama):
    original = llama.generate
    hf_paged.enable(llama)
    state = llama._hf_paged_state
    hf_paged.enable(llama)
    assert llama._hf_paged_state is state
    hf_paged.enable(llama, block_size=32)  # new options reconfigure
    assert llama._hf_paged_state.options.block_size == 32
    hf_paged.disable(llama)
    hf_paged.disable(llama)
    assert not hf_paged.is_enabled(llama)
    assert "generate" not in vars(llama) and llama.generate == original


def test_options_are_validated(llama):
    with pytest.raises(TypeError, match="blok_size"):
        hf_paged.enable(llama, blok_size=16)
    with pytest.raises(ValueError, match="block_size"):
        hf_paged.enable(llama, block_size=10)
    with pytest.raises(ValueError, match="backend"):
        hf_paged.enable(llama, backend="cuda-magic")
    assert not hf_paged.is_enabled(llama)


def test_encoder_decoder_is_refused():
    config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(ValueError, match="encoder-decoder"):
        hf_paged.enable(model)


def test_static_cache_in_generation_config_is_replaced(batch):
    model = make_model("llama")
    stock = model.generate(**batch, max_new_tokens=6, do_sample=False)
    model.generation_config.cache_implementation = "static"
    hf_paged.enable(model)
    try:
        paged = model.generate(**batch, max_new_tokens=6, do_sample=False)
    finally:
        hf_paged.disable(model)
    assert torch.equal(stock, paged)
    assert model.generation_config.cache_implementation == "static"


def test_user_cache_is_respected(llama, batch):
    stock = llama.generate(**batch, max_new_tokens=5, do_sample=False)
    hf_paged.enable(llama)
    try:
        cache = DynamicCache(config=llama.config)
        out = llama.generate(**batch, max_new_tokens=5, do_sample=False, past_key_values=cache)
        assert cache.get_seq_length() > 0  # the user's cache was used, not a paged one
    finally:
        hf_paged.disable(llama)
    assert torch.equal(stock, out)


def test_attention_sinks_gpt_oss():
    """GPT-OSS passes learned sinks as ``s_aux`` and alternates sliding/full layers."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
    )
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_()  # zero-initialised sinks would barely matter
    model.generation_config.pad_token_id = 0
    stock, paged = run_both(model, left_padded_batch([5, 12, 3], seed=1), max_new_tokens=10, do_sample=False)
    assert torch.equal(stock, paged)


def test_prefill_chunking(llama):
    batch = left_padded_batch([5, 30, 13], seed=2)
    stock = llama.generate(**batch, max_new_tokens=6, do_sample=False)
    hf_paged.enable(llama)
    try:
        paged = llama.generate(**batch, max_new_tokens=6, do_sample=False, prefill_chunk_size=8)
    finally:
        hf_paged.disable(llama)
    assert torch.equal(stock, paged)
