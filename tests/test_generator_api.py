"""ContinuousGenerator as a new user meets it: empty input, concurrent calls, models it cannot run,
bad tokenizers, chat templates and what ``apply_chat_template`` returns."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from models import make_model
from test_generator import char_tokenizer, make_prompts, model_and_refs

from hf_paged import ContinuousGenerator, SamplingParams

GREEDY = SamplingParams(max_new_tokens=20, temperature=0)


def new(model=None, tokenizer=None, **kw):
    kw.setdefault("num_blocks", 64)
    return ContinuousGenerator(model if model is not None else model_and_refs("llama")[0], tokenizer, progress=False, **kw)


def test_empty_input_returns_nothing_and_leaves_the_generator_usable():
    gen = new()
    assert gen.generate([]) == []
    assert list(gen.stream([])) == []
    model, refs = model_and_refs("llama")
    assert gen.generate(make_prompts()[:1], GREEDY)[0].token_ids == refs[0]


def test_errors_leave_the_generator_usable():
    gen = new()
    with pytest.raises(ValueError, match="request 1"):
        gen.generate([[5, 6], [10_000]], GREEDY)
    with pytest.raises(TypeError, match="sampling_params"):
        gen.generate([[5, 6]], {"max_new_tokens": 3})
    stream = gen.stream(make_prompts()[:2], GREEDY)
    next(stream)
    stream.close()  # left early: every block back
    assert gen.pool.allocator.is_whole()
    assert gen.generate(make_prompts()[:1], GREEDY)[0].token_ids == model_and_refs("llama")[1][0]


def test_a_second_concurrent_run_is_refused_atomically():
    gen = new()
    stream = gen.stream(make_prompts(), GREEDY)
    next(stream)  # a run is in progress
    errors = []

    def other():
        try:
            gen.generate(make_prompts()[:1], GREEDY)
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=other) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 and all("already running" in str(e) for e in errors)
    rest = list(stream)
    assert rest[-1].finished
    assert gen.generate(make_prompts()[:1], GREEDY)[0].token_ids == model_and_refs("llama")[1][0]


def test_models_the_generator_cannot_run_are_refused_in_the_constructor():
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        ContinuousGenerator(t5)
    base = transformers.LlamaModel(make_model("llama").config)
    with pytest.raises(ValueError, match="no language-model head.*LlamaForCausalLM"):
        ContinuousGenerator(base)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(make_model("llama").config)
    with pytest.raises(ValueError, match="meta device"):
        ContinuousGenerator(meta)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ContinuousGenerator(object())
    with pytest.raises(TypeError, match="tokenizer must be"):
        ContinuousGenerator(make_model("llama"), tokenizer="gpt2")


def _chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    tok._tokenizer.post_processor = transformers.convert_slow_tokenizer.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return tok


def test_chat_and_rendered_templates_get_one_bos():
    tok = _chat_tokenizer()
    model = model_and_refs("llama")[0]
    gen = new(model, tok)
    conv = [{"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids[0] == 1 and ids[1] != 1
    stock = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    params = SamplingParams(max_new_tokens=8, temperature=0)

    by_chat = gen.chat([conv], params)[0]
    assert by_chat.prompt_token_ids == ids and by_chat.token_ids == stock
    # A template rendered to a string starts with the BOS text: no second BOS is added.
    rendered = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert gen.generate([rendered], params)[0].prompt_token_ids == ids
    # What apply_chat_template(tokenize=True, return_dict=True) returns is a prompt too.
    encoded = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert gen.generate([encoded], params)[0].token_ids == stock
    batch = tok(["ab"], return_tensors="pt")
    assert gen.generate([batch], params)[0].prompt_token_ids == tok("ab").input_ids
    # A plain string still gets its BOS.
    assert gen.generate(["ab"], params)[0].prompt_token_ids[0] == 1
    with pytest.raises(TypeError, match="conversation 0"):
        gen.chat(["not a conversation"])


def test_defaults_come_from_the_models_generation_config():
    model = make_model("llama")
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 5
    gen = new(model)
    prompt = make_prompts()[1]
    first, second = gen.generate([prompt]), gen.generate([prompt])
    stock = model.generate(torch.tensor([prompt]))[0, len(prompt) :].tolist()  # stock reads the same config
    assert first[0].token_ids == second[0].token_ids == stock and len(stock) <= 5
    # Sampling settings of the checkpoint are used too; explicit parameters override them.
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.generation_config.top_k = 7
    defaults = gen.default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_new_tokens) == (0.7, 7, 5)
    assert len(gen.generate([prompt], SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True))[0].token_ids) == 9


def test_min_new_tokens_holds_back_the_models_eos_like_stock():
    model = make_model("llama")
    prompt = make_prompts()[2]
    first = model.generate(torch.tensor([prompt]), max_new_tokens=1, do_sample=False)[0, -1].item()
    model.generation_config.eos_token_id = first  # greedy decoding would stop at once
    gen = new(model)
    assert gen.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))[0].token_ids == [first]
    held = gen.generate([prompt], SamplingParams(max_new_tokens=8, min_new_tokens=4, temperature=0))[0]
    stock = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=4, do_sample=False)[0, len(prompt) :]
    assert held.token_ids == stock.tolist() and len(held.token_ids) >= 4


@pytest.mark.parametrize("budget", [8192, 7])  # whole prompts, or chunks of 7 tokens across steps
def test_prompt_logprobs_equal_a_plain_forward(budget):
    model = model_and_refs("llama")[0]
    prompts = make_prompts()[:4]
    gen = new(model, max_num_batched_tokens=budget)
    gen.generate(prompts[:2], SamplingParams(max_new_tokens=2, temperature=0))  # cached prefixes must not be used
    params = SamplingParams(max_new_tokens=3, temperature=0, prompt_logprobs=2)
    results = gen.generate(prompts, [params, SamplingParams(max_new_tokens=3, temperature=0)] * 2)
    for i, (res, prompt) in enumerate(zip(results, prompts)):
        if i % 2:
            assert res.prompt_logprobs is None
            continue
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), dim=-1)
        got = res.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for p in range(1, len(prompt)):
            entry = got[p]
            assert entry.token_id == prompt[p]
            assert entry.logprob == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-9)
            top = ref[p - 1].topk(2)
            assert [t for t, _ in entry.top] == top.indices.tolist()
    assert gen.pool.allocator.is_whole()


def test_prompt_logprobs_survive_preemption_and_stream_once():
    model = model_and_refs("llama")[0]
    prompts = make_prompts()
    params = SamplingParams(max_new_tokens=20, temperature=0, prompt_logprobs=0)
    calm = new(model).generate(prompts, params)
    tight = new(model, num_blocks=9)
    squeezed = tight.generate(prompts, params)
    assert tight.stats.preemptions > 0
    for a, b in zip(calm, squeezed):
        assert [e and (e.token_id, round(e.logprob, 9)) for e in a.prompt_logprobs] == [
            e and (e.token_id, round(e.logprob, 9)) for e in b.prompt_logprobs
        ]
    events = [e for e in new(model).stream(prompts[:2], params) if e.prompt_logprobs is not None]
    assert [len(e.prompt_logprobs) for e in events] == [len(p) for p in prompts[:2]]


def test_incremental_text_through_the_rust_decoder_equals_decode():
    from transformers import AutoTokenizer

    from hf_paged.engine.request import IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(str(__import__("pathlib").Path(__import__("hf_paged").__file__).parent / "default_model"))
    ids = tok("héllo wörld, streaming ✓ text 123").input_ids[1:]
    detok = IncrementalDetokenizer(tok, ())
    for t in ids:
        detok.append(t)
    detok.flush()
    assert detok.text == tok.decode(ids, skip_special_tokens=True)


def test_a_model_left_in_train_mode_warns_once(caplog):
    model = make_model("llama")
    model.train()
    gen = new(model)
    params = SamplingParams(max_new_tokens=2, temperature=0)
    with caplog.at_level("WARNING", logger="hf_paged"):
        gen.generate(make_prompts()[:2], params)
        gen.generate(make_prompts()[:1], params)
    assert caplog.text.count("training mode") == 1
    model.eval()
