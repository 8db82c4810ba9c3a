"""SamplingParams: validation at construction, accepted spellings, documentation, and the new
sampling features end to end (greedy parity with stock ``generate`` plus the matching processor)."""

from __future__ import annotations

import dataclasses
import pickle
import pydoc

import numpy as np
import pytest
import torch
from models import VOCAB, make_model
from transformers import LogitsProcessor, LogitsProcessorList

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.engine.sampling_params import MAX_LOGPROBS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), r"max_new_tokens .* 0"),
        (dict(max_new_tokens=3.0), r"max_new_tokens .* 3.0"),
        (dict(max_new_tokens=True), r"max_new_tokens .* True"),
        (dict(min_new_tokens=-1), r"min_new_tokens .* -1"),
        (dict(min_new_tokens=20, max_new_tokens=10), r"min_new_tokens .*max_new_tokens=10.* 20"),
        (dict(temperature=-0.5), r"temperature .* -0.5"),
        (dict(temperature=float("nan")), r"temperature .* nan"),
        (dict(top_p=2), r"top_p .* 2"),
        (dict(top_p=0), r"top_p .* 0"),
        (dict(top_k=-1), r"top_k .*vLLM.* -1"),
        (dict(top_k=2.5), r"top_k .* 2.5"),
        (dict(min_p=1.5), r"min_p .* 1.5"),
        (dict(repetition_penalty=0), r"repetition_penalty .* 0"),
        (dict(repetition_penalty=float("inf")), r"repetition_penalty .* inf"),
        (dict(presence_penalty=2.5), r"presence_penalty .* 2.5"),
        (dict(frequency_penalty=-3), r"frequency_penalty .* -3"),
        (dict(seed=2**70), r"seed .* 1180591620717411303424"),
        (dict(seed=2**63), r"seed .* 9223372036854775808"),
        (dict(seed=-1), r"seed .* -1"),
        (dict(seed="7"), r"seed .* '7'"),
        (dict(stop=5), r"stop .* 5"),
        (dict(stop=("ok", "")), r"stop .*''"),
        (dict(stop_token_ids=-3), r"stop_token_ids .*-3"),
        (dict(stop_token_ids=[1, "a"]), r"stop_token_ids .*'a'"),
        (dict(stop_token_ids="7"), r"stop_token_ids .* '7'"),
        (dict(ignore_eos=1), r"ignore_eos .* 1"),
        (dict(n=0), r"n must .* 0"),
        (dict(logprobs=10000), r"logprobs .*20.* 10000"),
        (dict(logprobs=-1), r"logprobs .* -1"),
        (dict(prompt_logprobs=21), r"prompt_logprobs .*20.* 21"),
        (dict(prompt_logprobs=1.0), r"prompt_logprobs .* 1.0"),
    ],
)
def test_bad_values_fail_at_construction_naming_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_validate_still_catches_later_edits():
    params = SamplingParams()
    params.top_p = 3.0
    with pytest.raises(ValueError, match="top_p .* 3.0"):
        params.validate()


def test_bounds_are_inclusive_where_documented():
    SamplingParams(logprobs=MAX_LOGPROBS, prompt_logprobs=0, seed=2**63 - 1, presence_penalty=-2, frequency_penalty=2,
                   min_new_tokens=16, max_new_tokens=16, top_p=1, min_p=1, top_k=10**9)


def test_numpy_scalars_are_stored_as_python_numbers():
    p = SamplingParams(
        max_new_tokens=np.int64(3), min_new_tokens=np.int32(1), temperature=np.float32(0.5), top_p=np.float64(0.9),
        top_k=np.uint8(7), seed=np.uint64(2**40), n=np.int16(2), logprobs=np.int64(2), prompt_logprobs=np.int8(1),
        presence_penalty=np.float16(0.5), ignore_eos=np.bool_(True), stop_token_ids=np.array([4, 5]),
    )
    for name in ("max_new_tokens", "min_new_tokens", "top_k", "seed", "n", "logprobs", "prompt_logprobs"):
        assert type(getattr(p, name)) is int, name
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert type(getattr(p, name)) is float, name
    assert p.ignore_eos is True and p.stop_token_ids == (4, 5) and all(type(t) is int for t in p.stop_token_ids)
    assert (p.max_new_tokens, p.temperature, p.seed) == (3, 0.5, 2**40)


def test_single_stop_and_stop_token_id_become_tuples():
    p = SamplingParams(stop="x", stop_token_ids=5)
    assert p.stop == ("x",) and p.stop_token_ids == (5,)
    assert SamplingParams(stop_token_ids=np.int64(5)).stop_token_ids == (5,)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2]).stop == ("a", "b")
    assert SamplingParams(stop=None, stop_token_ids=None) == SamplingParams()


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        (dict(max_tokens=5), "'max_new_tokens'"),
        (dict(min_tokens=5), "'min_new_tokens'"),
        (dict(num_return_sequences=2), "'n'"),
        (dict(top_logprobs=2), "'logprobs'"),
        (dict(do_sample=False), "temperature=0"),
        (dict(temprature=0.5), "did you mean 'temperature'"),
        (dict(foo=1), "fields: frequency_penalty"),
    ],
)
def test_other_spellings_get_a_type_error_naming_the_field(kwargs, hint):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(kwargs))}'.*{hint}"):
        SamplingParams(**kwargs)


def test_help_documents_every_field():
    text = pydoc.render_doc(SamplingParams)
    for field in dataclasses.fields(SamplingParams):
        assert f"{field.name}:" in text, field.name


def test_copies_and_replace_keep_working():
    p = SamplingParams(stop="x", seed=3, min_new_tokens=2, presence_penalty=0.1)
    assert pickle.loads(pickle.dumps(p)) == p
    assert dataclasses.replace(p, n=2).n == 2
    with pytest.raises(ValueError, match="n must"):
        dataclasses.replace(p, n=0)


# ---- the new features through ContinuousGenerator -------------------------------------------------


class CountPenalty(LogitsProcessor):
    """OpenAI presence/frequency penalties over the generated tokens: a plain reference processor."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_len :].tolist()
            for token in set(generated):
                scores[row, token] -= generated.count(token) * self.frequency + self.presence
        return scores


PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 40, 41, 40, 41, 40]]


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def generator(model):
    return ContinuousGenerator(model, num_blocks=32, progress=False)


def test_presence_and_frequency_penalties_match_generate_with_the_reference(model):
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, presence_penalty=0.8, frequency_penalty=1.5)
    results = generator(model).generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, results):
        stock = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
            logits_processor=LogitsProcessorList([CountPenalty(len(prompt), 0.8, 1.5)]),
        )
        assert result.token_ids == stock[0, len(prompt) :].tolist()
    plain = generator(model).generate(PROMPTS, dataclasses.replace(params, presence_penalty=0.0, frequency_penalty=0.0))
    assert [r.token_ids for r in results] != [r.token_ids for r in plain]  # the penalties changed something


def test_min_new_tokens_matches_generate(model):
    # The stop id is each prompt's first greedy token, so without min_new_tokens it stops at once.
    gen = generator(model)
    firsts = [r.token_ids[0] for r in gen.generate(PROMPTS, SamplingParams(max_new_tokens=1, temperature=0))]
    for prompt, stop in zip(PROMPTS, firsts):
        params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=stop, min_new_tokens=4)
        (result,) = gen.generate([prompt], params)
        stock = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=4, do_sample=False,
                               eos_token_id=stop, pad_token_id=0)
        expected = stock[0, len(prompt) :].tolist()
        if stop in expected:  # stock pads after its EOS
            expected = expected[: expected.index(stop) + 1]
        assert result.token_ids == expected and len(result.token_ids) >= 4
        assert result.token_ids[0] != stop
        (unconstrained,) = gen.generate([prompt], dataclasses.replace(params, min_new_tokens=0))
        assert unconstrained.token_ids == [stop] and unconstrained.finish_reason == "stop"


def test_seeded_sampling_with_new_features_is_independent_of_the_batch(model):
    gen = generator(model)
    params = [
        SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, presence_penalty=1.0, min_new_tokens=3, stop_token_ids=5),
        SamplingParams(max_new_tokens=8, temperature=0.8, seed=4, frequency_penalty=0.7, top_k=20),
    ]
    together = gen.generate(PROMPTS, params)
    alone = [gen.generate([p], q)[0] for p, q in zip(PROMPTS, params)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert all(t < VOCAB for r in together for t in r.token_ids)
