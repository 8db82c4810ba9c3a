"""Models quantized by transformers' own ``quantization_config`` run unchanged under ``enable()`` and
``ContinuousGenerator``: same greedy tokens as stock ``generate`` on the same quantized model.

The configuration that runs on CPU: torchao int8 weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``,
weights stored as int8 tensor subclasses, dequantized inside each linear). torchao does not support
float64, so these models run in float32.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="the test extra installs torchao")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402
from transformers import AutoModelForCausalLM, TorchAoConfig  # noqa: E402

import hf_paged  # noqa: E402
from models import VOCAB, left_padded_batch, make_model  # noqa: E402

NEW = 10
LENGTHS = [4, 13, 7, 21]


def quantized_model_and_refs(name: str, tmp_dir: str):
    """A tiny model saved as a checkpoint, loaded back int8-quantized, and stock greedy continuations
    of each prompt run alone on that quantized model."""
    make_model(name, dtype=torch.float32, head_dim=32).save_pretrained(tmp_dir)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_dir, dtype=torch.float32, device_map="cpu", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    ).eval()
    model.generation_config.pad_token_id = 0
    batch = left_padded_batch(LENGTHS, seed=2)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    refs = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p) :].tolist() for p in prompts]
    return model, batch, prompts, refs


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def quantized(request, tmp_path_factory):
    return quantized_model_and_refs(request.param, str(tmp_path_factory.mktemp(request.param)))


def test_weights_are_quantized(quantized):
    model, *_ = quantized
    assert model.is_quantized
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8


def test_enable_generate_matches_stock_on_quantized_model(quantized):
    model, batch, _, refs = quantized
    hf_paged.enable(model, num_blocks=32)
    try:
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        assert model._hf_paged_state.pool.allocator.num_used == 0
    finally:
        hf_paged.disable(model)
    assert out[:, -NEW:].tolist() == refs


def test_continuous_generator_matches_stock_on_quantized_model(quantized):
    model, _, prompts, refs = quantized
    gen = hf_paged.ContinuousGenerator(model, num_blocks=32, progress=False)
    results = gen.generate(prompts, hf_paged.SamplingParams(max_new_tokens=NEW, temperature=0))
    assert [r.token_ids for r in results] == refs
    assert gen.pool.allocator.is_whole()
    assert all(0 <= t < VOCAB for r in results for t in r.token_ids)
