"""The embedded default model's tokenizer: shipped in the package, matching the model, regenerable."""

from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path

from transformers import PreTrainedTokenizerFast

FOLDER = Path(str(resources.files("hf_paged").joinpath("default_model")))


def test_matches_the_embedded_model():
    config = json.loads((FOLDER / "config.json").read_text())
    tok = PreTrainedTokenizerFast.from_pretrained(str(FOLDER))
    assert len(tok) == config["vocab_size"] == 4096
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (config["pad_token_id"], config["bos_token_id"],
                                                                     config["eos_token_id"]) == (0, 1, 2)
    text = "Hello, world! Ünïcödé and numbers 12345 — every byte encodes."
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and 1 not in ids[1:] and max(ids) < 4096
    assert tok.decode(ids, skip_special_tokens=True) == text
    # Every id decodes (a random model samples all of them).
    assert all(tok.decode([i]) for i in range(6, 4096))


def test_chat_template_holds_one_bos():
    tok = PreTrainedTokenizerFast.from_pretrained(str(FOLDER))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_script_regenerates_the_same_files(tmp_path):
    # The script lives in the source tree (a wheel ships only the data).
    script = Path(__file__).resolve().parents[1] / "hf_paged" / "default_model" / "make_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (FOLDER / name).read_bytes(), name
