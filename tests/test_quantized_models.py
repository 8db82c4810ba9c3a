"""Models quantized by transformers' own ``quantization_config`` run unchanged under ``enable()`` and
``ContinuousGenerator``: same greedy tokens as stock ``generate`` on the same quantized model.

The configurations that run on CPU: torchao int8 weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``)
and float8 e4m3 weight-only (``TorchAoConfig(Float8WeightOnlyConfig())``), weights stored as int8 / float8
tensor subclasses and dequantized inside each linear. (Float8 weights with dynamically quantized float8
activations, the GPU configuration, need CUDA compute capability 8.9+.) torchao does not support float64,
so these models run in float32.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="the test extra installs torchao")
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig  # noqa: E402
from transformers import AutoModelForCausalLM, TorchAoConfig  # noqa: E402

import hf_paged  # noqa: E402
from models import VOCAB, left_padded_batch, make_model  # noqa: E402

NEW = 10
LENGTHS = [4, 13, 7, 21]
# weight format -> (torchao config factory, tensor subclass name, stored dtype)
WEIGHTS = {
    "int8": (Int8WeightOnlyConfig, "Int8Tensor", torch.int8),
    "float8": (Float8WeightOnlyConfig, "Float8Tensor", torch.float8_e4m3fn),
}


def quantized_model_and_refs(name: str, weights: str, tmp_dir: str):
    """A tiny model saved as a checkpoint, loaded back quantized, and stock greedy continuations of each
    prompt run alone on that quantized model."""
    make_model(name, dtype=torch.float32, head_dim=32).save_pretrained(tmp_dir)
    config = TorchAoConfig(WEIGHTS[weights][0]())
    model = AutoModelForCausalLM.from_pretrained(
        tmp_dir, dtype=torch.float32, device_map="cpu", quantization_config=config
    ).eval()
    model.generation_config.pad_token_id = 0
    batch = left_padded_batch(LENGTHS, seed=2)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    refs = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p) :].tolist() for p in prompts]
    return model, batch, prompts, refs, weights


@pytest.fixture(scope="module", params=[("llama", "int8"), ("qwen2", "int8"), ("llama", "float8")], ids="-".join)
def quantized(request, tmp_path_factory):
    name, weights = request.param
    return quantized_model_and_refs(name, weights, str(tmp_path_factory.mktemp(name)))


def test_weights_are_quantized(quantized):
    model, *_, weights = quantized
    assert model.is_quantized
    weight = model.model.layers[0].mlp.up_proj.weight
    _, cls_name, stored = WEIGHTS[weights]
    assert type(weight).__name__ == cls_name and weight.qdata.dtype == stored


def test_enable_generate_matches_stock_on_quantized_model(quantized):
    model, batch, _, refs, _ = quantized
    hf_paged.enable(model, num_blocks=32)
    try:
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        assert model._hf_paged_state.pool.allocator.num_used == 0
    finally:
        hf_paged.disable(model)
    assert out[:, -NEW:].tolist() == refs


def test_continuous_generator_matches_stock_on_quantized_model(quantized):
    model, _, prompts, refs, _ = quantized
    gen = hf_paged.ContinuousGenerator(model, num_blocks=32, progress=False)
    results = gen.generate(prompts, hf_paged.SamplingParams(max_new_tokens=NEW, temperature=0))
    assert [r.token_ids for r in results] == refs
    assert gen.pool.allocator.is_whole()
    assert all(0 <= t < VOCAB for r in results for t in r.token_ids)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 activations (torch._scaled_mm) need a CUDA GPU of compute capability 8.9+")
def test_torchao_fp8_dynamic_weights_under_the_engine():
    """The GPU configuration: FP8 weights per output channel with FP8 activations quantized per token
    (TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(PerRow()))) under ContinuousGenerator, CUDA
    graphs included: each greedy token is the top-1 of a stock forward of the same quantized model over
    the generated text, except at near ties, and its logprob matches that forward."""
    import copy

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    base = make_model("llama", dtype=torch.bfloat16, head_dim=64).cuda()
    config = TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    model = type(base).from_pretrained(
        None, config=copy.deepcopy(base.config), state_dict=base.state_dict(), dtype=torch.bfloat16, device_map="cuda",
        quantization_config=config,
    ).eval()
    assert model.model.layers[0].mlp.up_proj.weight.qdata.dtype == torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 11, 40)]
    cg = hf_paged.ContinuousGenerator(model, num_blocks=64, progress=False)
    results = cg.generate(prompts, hf_paged.SamplingParams(max_new_tokens=16, temperature=0, logprobs=0, ignore_eos=True))
    from test_fp8_swap_gpu import check_logprobs_against_stock_forward

    check_logprobs_against_stock_forward(model, prompts, results, tol=0.1)  # bf16: packed and stock forwards round differently
    assert cg.pool.allocator.is_whole()
