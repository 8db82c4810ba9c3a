"""The pytest plugin that runs transformers' own generation tests under ``enable``."""

from __future__ import annotations

import importlib.util
import pathlib

import torch
import transformers

import hf_paged
from models import make_config

PLUGIN = pathlib.Path(__file__).parent / "peer" / "hf_paged_enable_plugin.py"


def _plugin():
    spec = importlib.util.spec_from_file_location("hf_paged_enable_plugin", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_exclusion_has_a_reason(tmp_path):
    plugin = _plugin()
    excluded = plugin.load_excluded()
    assert excluded and all(len(reason) > 20 for reason in excluded.values())
    bad = tmp_path / "excluded.txt"
    bad.write_text("# comment\ntest_something\n")
    try:
        plugin.load_excluded(bad)
    except ValueError as e:
        assert "test_something" in str(e)
    else:
        raise AssertionError("a line without a reason was accepted")


def test_models_are_enabled_when_built():
    plugin = _plugin()
    original, begin_call = transformers.PreTrainedModel.post_init, hf_paged.PagedCache.begin_call
    try:
        plugin._enable_on_construction()
        model = transformers.AutoModelForCausalLM.from_config(make_config("llama")).eval()
        base = transformers.AutoModel.from_config(make_config("llama"))  # no generate: left alone
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    finally:
        transformers.PreTrainedModel.post_init, hf_paged.PagedCache.begin_call = original, begin_call
    assert hf_paged.is_enabled(model) and not hf_paged.is_enabled(base)
    assert plugin.COUNTS == {"models enabled": 1, "paged generate calls": 1}
    hf_paged.disable(model)
