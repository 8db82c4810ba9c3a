"""Tensor parallelism on CPU: 2 processes over gloo, tiny random models loaded with transformers' TP plan.

Each model is built here, saved with ``save_pretrained`` and loaded in both processes with
``from_pretrained(path, tp_plan="auto")``: the weights become DTensor shards and the model's own
all-reduces run over gloo. The reference is stock ``generate`` on the unsharded model, one prompt at a
time (float64: the sharded sums round differently, and near-ties must not decide a token).
"""

from __future__ import annotations

import functools

import pytest
import torch
from models import CONFIGS, VOCAB, make_model
from tp_harness import RankError, run_ranks, unwrap

ARCHS = ["llama", "qwen2"]
LENGTHS = [5, 23, 17, 40]
NEW = 12


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@functools.cache
def saved_model(name: str, tmp_root: str, **overrides) -> tuple[str, list[list[int]]]:
    """Save the tiny model to a folder; returns the folder and stock greedy continuations of ``prompts()``."""
    model = make_model(name)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    path = f"{tmp_root}/{name}"
    model.save_pretrained(path)
    refs = []
    for p in prompts():
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)
        refs.append(out[0, len(p) :].tolist())
    return path, refs


def load_tp(path: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float64)
    model.generation_config.pad_token_id = 0
    return model


# ---- enable() + generate --------------------------------------------------------------------------


def _enable_rank(rank: int, path: str) -> dict:
    import hf_paged

    model = load_tp(path)
    sharded = model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0]
    hf_paged.enable(model, num_blocks=40)
    outs = []
    for p in prompts():
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)
        outs.append(out[0, len(p) :].tolist())
    # A left-padded batch through the pool as well.
    batch = torch.zeros((len(LENGTHS), max(LENGTHS)), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts()):
        batch[i, batch.shape[1] - len(p) :] = torch.tensor(p)
        mask[i, batch.shape[1] - len(p) :] = 1
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    state = model._hf_paged_state
    return {
        "single": outs,
        "batch": out[:, batch.shape[1] :].tolist(),
        "pool_heads": state.pool.layout.num_kv_heads,
        "sharded_rows": sharded,
        "num_blocks": state.pool.num_blocks,
    }


@pytest.mark.parametrize("name", ARCHS)
def test_enable_generate_under_tp_matches_single_process(name, tmp_path_factory):
    path, refs = saved_model(name, str(tmp_path_factory.mktemp("tp")))
    results = [unwrap(r) for r in run_ranks(_enable_rank, path)]
    heads = make_model(name).config.num_key_value_heads
    for rank, res in enumerate(results):
        assert res["sharded_rows"] < heads * 16, "the model was not loaded sharded"
        assert res["pool_heads"] == heads // 2, f"rank {rank}'s pool holds {res['pool_heads']} KV heads"
        assert res["num_blocks"] == 40
        assert res["single"] == refs, f"rank {rank} (one prompt at a time)"
        assert res["batch"] == refs, f"rank {rank} (left-padded batch)"


# ---- refusal ----------------------------------------------------------------------------------------


def _refusal_rank(rank: int, path: str) -> dict:
    import hf_paged

    model = load_tp(path)
    errors = {}
    for what, call in [("enable", lambda: hf_paged.enable(model)),
                       ("generator", lambda: hf_paged.ContinuousGenerator(model, num_blocks=8, progress=False))]:
        try:
            call()
            errors[what] = None
        except ValueError as e:
            errors[what] = str(e)
    errors["enabled"] = hf_paged.is_enabled(model)
    return errors


def test_tp_size_that_splits_a_kv_head_is_refused(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tp_kv1"))
    model = make_model("llama")
    model.config.num_key_value_heads = 1
    model = type(model)(model.config).to(torch.float64).eval()  # rebuilt with one KV head
    model.save_pretrained(f"{root}/llama_kv1")
    for rank, res in enumerate(run_ranks(_refusal_rank, f"{root}/llama_kv1")):
        res = unwrap(res)
        for what in ("enable", "generator"):
            message = res[what]
            assert message is not None, f"rank {rank}: {what} accepted a TP size of 2 for 1 KV head"
            assert "tensor parallel size (2)" in message and "KV heads (1)" in message, message
        assert not res["enabled"]
