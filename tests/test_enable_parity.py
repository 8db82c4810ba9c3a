"""Greedy parity of ``enable(model)`` + stock ``generate`` against stock transformers, per architecture."""

from __future__ import annotations

import pytest
import torch

import hf_paged
from models import CONFIGS, FALLBACK, left_padded_batch, make_model

LENGTHS = [5, 9, 3, 17]
NEW = 10


def stock_per_row(model, batch, new):
    """Ground truth: stock generate on each prompt alone, unpadded (tokens and per-step logits)."""
    rows = []
    for r in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][r].bool()
        ids = batch["input_ids"][r][keep][None]
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )
        rows.append((out.sequences[0, -new:], torch.cat(out.logits)))
    return rows


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_left_padded_matches_stock(name):
    model = make_model(name)
    batch = left_padded_batch(LENGTHS, seed=1)
    stock = model.generate(**batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    truth = stock_per_row(model, batch, NEW)

    hf_paged.enable(model)
    try:
        paged = model.generate(
            **batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        pool = model._hf_paged_state.pool
        # The returned cache keeps its blocks for its reader until released (or garbage collected).
        assert pool.allocator.num_used == paged.past_key_values.num_blocks_used > 0
        paged.past_key_values.release()
        assert pool.allocator.is_whole(), "blocks leaked after generate"
    finally:
        hf_paged.disable(model)

    paged_logits = torch.stack(paged.logits, dim=1)  # [B, NEW, V]
    for r, (tokens, logits) in enumerate(truth):
        assert torch.equal(paged.sequences[r, -NEW:], tokens), f"{name} row {r}: paged tokens differ from stock"
        torch.testing.assert_close(paged_logits[r], logits, rtol=1e-6, atol=1e-6)
    stock_logits = torch.stack(stock.logits, dim=1)
    if torch.isfinite(stock_logits).all():
        # Stock batched generate is itself a valid reference here (it is not for Gemma2, whose eager
        # attention returns NaN for fully masked padding rows).
        assert torch.equal(paged.sequences, stock.sequences)
    else:
        assert name == "gemma2", f"stock {name} produced non-finite logits"


def test_fallback_architectures_are_reported(caplog):
    for name in sorted(CONFIGS):
        model = make_model(name)
        with caplog.at_level("WARNING", logger="hf_paged"):
            caplog.clear()
            hf_paged.enable(model)
        said = "hard-codes its attention" in caplog.text
        assert said == (name in FALLBACK), name
        assert model._hf_paged_state.uses_interface == (name not in FALLBACK)
        hf_paged.disable(model)
