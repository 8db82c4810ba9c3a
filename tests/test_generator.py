"""End-to-end ContinuousGenerator tests on CPU with tiny float64 models.

The golden check is greedy parity with stock ``model.generate`` run on each prompt alone, for every
architecture that routes attention through transformers' interface, also under preemption and
chunked prefill.
"""

from __future__ import annotations

import functools

import pytest
import torch
from models import CONFIGS, FALLBACK, VOCAB, make_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_paged.entrypoints.generator import ContinuousGenerator
from hf_paged.engine.sampling_params import SamplingParams

ARCHS = [name for name in CONFIGS if name not in FALLBACK]
LENGTHS = [3, 60, 17, 33, 8, 45]
NEW = 20
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0)


def make_prompts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@functools.cache
def model_and_refs(name: str):
    """The tiny model and stock greedy continuations of each prompt, generated one prompt at a time."""
    model = make_model(name)
    refs = []
    for p in make_prompts():
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)
        refs.append(out[0, len(p) :].tolist())
    return model, refs


def assert_parity(results, refs, name):
    for i, (res, ref) in enumerate(zip(results, refs)):
        assert res.token_ids == ref, f"{name} prompt {i}:\n  ours  {res.token_ids}\n  stock {ref}"


@functools.cache
def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character (ids 3..95); 0/1/2 = pad/bos/eos like the tiny models."""
    chars = [chr(c) for c in range(33, 33 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def new_generator(model, tokenizer=None, **kw) -> ContinuousGenerator:
    kw.setdefault("num_blocks", 64)
    return ContinuousGenerator(model, tokenizer, progress=False, **kw)


# ---- greedy parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_parity_with_stock_generate(name):
    model, refs = model_and_refs(name)
    gen = new_generator(model)
    results = gen.generate(make_prompts(), GREEDY)
    assert_parity(results, refs, name)
    assert [r.index for r in results] == list(range(len(LENGTHS)))
    assert all(r.finish_reason in ("length", "stop") for r in results)
    assert gen.pool.allocator.is_whole()
    stats = gen.stats
    assert stats.generated_tokens == sum(len(r) for r in refs) and stats.prompt_tokens == sum(LENGTHS)
    assert stats.kv_blocks_used == 0 and 0 < stats.kv_blocks_peak <= stats.kv_blocks_total == 64


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_parity_under_preemption(name):
    model, refs = model_and_refs(name)
    gen = new_generator(model, num_blocks=6)  # 96 tokens: the longest request (60 + 20) barely fits
    results = gen.generate(make_prompts(), GREEDY)
    assert gen.stats.preemptions > 0 and gen.stats.recomputed_tokens > 0
    assert_parity(results, refs, name)
    assert gen.pool.allocator.is_whole()


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt2"])
def test_parity_with_many_prompt_chunks(name):
    model, refs = model_and_refs(name)
    gen = new_generator(model, max_num_batched_tokens=7, max_num_seqs=3)
    results = gen.generate(make_prompts(), GREEDY)
    assert gen.stats.steps > sum(LENGTHS) // 7
    assert_parity(results, refs, name)


def test_greedy_repetition_penalty_matches_stock():
    model, _ = model_and_refs("llama")
    prompts = make_prompts()[:3]
    results = new_generator(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.7))
    for p, res in zip(prompts, results):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, repetition_penalty=1.7)
        assert res.token_ids == ref[0, len(p) :].tolist()


# ---- sampling --------------------------------------------------------------------------------------


def test_seeded_sampling_independent_of_batch_and_order():
    model, _ = model_and_refs("llama")
    prompts = make_prompts()
    params = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=30, top_p=0.95, seed=100 + i) for i in range(6)]
    gen = new_generator(model)
    full = [r.token_ids for r in gen.generate(prompts, params)]
    order = [4, 1, 5]
    subset = gen.generate([prompts[i] for i in order], [params[i] for i in order])
    assert [r.token_ids for r in subset] == [full[i] for i in order]
    alone = gen.generate([prompts[2]], [params[2]])
    assert alone[0].token_ids == full[2]
    # Preemption and recomputation do not change sampled tokens either.
    tight = new_generator(model, num_blocks=6)
    assert [r.token_ids for r in tight.generate(prompts, params)] == full
    assert tight.stats.preemptions > 0


def test_n_samples_equal_consecutive_seeds():
    model, _ = model_and_refs("llama")
    prompt = make_prompts()[2]
    gen = new_generator(model)
    (res,) = gen.generate([prompt], SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=7))
    assert len(res.samples) == 3 and res.token_ids == res.samples[0].token_ids
    singles = gen.generate([prompt] * 3, [SamplingParams(max_new_tokens=8, temperature=1.0, seed=7 + k) for k in range(3)])
    assert [s.token_ids for s in res.samples] == [r.token_ids for r in singles]
    assert len({tuple(s.token_ids) for s in res.samples}) > 1


def test_logprobs_match_stock_forward():
    model, refs = model_and_refs("llama")
    prompts = make_prompts()[:2]
    results = new_generator(model).generate(prompts, SamplingParams(max_new_tokens=6, temperature=0, logprobs=2))
    for p, res in zip(prompts, results):
        assert len(res.logprobs) == len(res.token_ids) == 6
        full = torch.tensor([p + res.token_ids])
        with torch.no_grad():
            lp = model(full).logits[0, len(p) - 1 : -1].log_softmax(-1)  # [6, V]: predicts each new token
        for i, (tok, entry) in enumerate(zip(res.token_ids, res.logprobs)):
            assert entry.token_id == tok
            assert entry.logprob == pytest.approx(lp[i, tok].item(), abs=1e-6)
            assert [t for t, _ in entry.top] == lp[i].topk(2).indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(lp[i].topk(2).values.tolist(), abs=1e-6)


# ---- stopping and text -----------------------------------------------------------------------------


def test_stop_strings_and_stop_ids():
    model, _ = model_and_refs("llama")
    tok = char_tokenizer()
    gen = new_generator(model, tok)
    prompts = ["hello", "abc!xyz", "q"]
    base = gen.generate(prompts, SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True))
    assert all(len(r.token_ids) == NEW and r.text == tok.decode(r.token_ids, skip_special_tokens=True) for r in base)

    # Stop string: a piece of the greedy text; the request must end on the token that completes it.
    stops = [r.text[5:7] for r in base]
    stopped = gen.generate(prompts, [SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True, stop=(s,)) for s in stops])
    for b, s, r in zip(base, stops, stopped):
        k = next(k for k in range(1, NEW + 1) if s in tok.decode(b.token_ids[:k], skip_special_tokens=True))
        assert r.finish_reason == "stop"
        assert r.token_ids == b.token_ids[:k]
        assert r.text == b.text[: b.text.find(s)]

    # Stop id: ends at its first occurrence, the id included.
    ids = [r.token_ids[7] for r in base]
    by_id = gen.generate(prompts, [SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True, stop_token_ids=(t,)) for t in ids])
    for b, t, r in zip(base, ids, by_id):
        assert r.finish_reason == "stop"
        assert r.token_ids == b.token_ids[: b.token_ids.index(t) + 1]
    assert gen.pool.allocator.is_whole()


def test_stream_matches_generate():
    model, _ = model_and_refs("llama")
    tok = char_tokenizer()
    gen = new_generator(model, tok)
    prompts = ["hello", "abc!xyz", "q"]
    base = gen.generate(prompts, SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True))
    params = [SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True, stop=(r.text[6:9],)) for r in base]
    expected = gen.generate(prompts, params)
    tokens = {i: [] for i in range(3)}
    text = {i: "" for i in range(3)}
    finished = {}
    for ev in gen.stream(prompts, params):
        assert ev.index not in finished
        tokens[ev.index] += ev.token_ids
        text[ev.index] += ev.text
        if ev.finished:
            finished[ev.index] = ev.finish_reason
    for i, r in enumerate(expected):
        assert tokens[i] == r.token_ids and text[i] == r.text and finished[i] == r.finish_reason == "stop"
    assert gen.pool.allocator.is_whole()


# ---- validation and errors -------------------------------------------------------------------------


@pytest.fixture
def counted():
    """A llama generator with a small pool plus a counter of model forwards."""
    model, _ = model_and_refs("llama")
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    yield new_generator(model, num_blocks=8), calls
    handle.remove()


OK = [5, 6, 7]


def _edited(**fields) -> SamplingParams:
    """Valid at construction, then edited into a bad value: generate must still catch it."""
    params = SamplingParams()
    for name, value in fields.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize(
    "prompts, params, match",
    [
        ([OK, OK, []], None, "request 2: the prompt is empty"),
        ([OK, OK, [4] * 257], None, "request 2: .*257 tokens"),
        ([OK, OK, [4, VOCAB]], None, f"request 2: .*{VOCAB}"),
        ([OK, OK, "abc"], None, "request 2: .*no tokenizer"),
        ([OK, OK, [4] * 100], SamplingParams(max_new_tokens=40), "request 2: .*needs 9 KV blocks"),
        ([OK] * 3, [SamplingParams()] * 2, "2 sampling_params for 3 prompts"),
        ([OK] * 3, [SamplingParams()] * 2 + [_edited(max_new_tokens=0)], "request 2: max_new_tokens .* 0"),
        ([OK] * 3, [SamplingParams()] * 2 + [_edited(temperature=-1.0)], "request 2: temperature .* -1.0"),
        ([OK] * 3, [SamplingParams()] * 2 + [_edited(top_p=0.0)], "request 2: top_p .* 0.0"),
        ([OK] * 3, [SamplingParams()] * 2 + [_edited(top_p=1.5)], "request 2: top_p .* 1.5"),
        ([OK] * 3, [SamplingParams()] * 2 + [_edited(top_k=-1)], "request 2: top_k .* -1"),
        ([OK] * 3, [SamplingParams()] * 2 + [_edited(n=0)], "request 2: n .* 0"),
        ([OK] * 3, [SamplingParams()] * 2 + [SamplingParams(stop=("x",))], "request 2: stop strings"),
    ],
)
def test_bad_inputs_raise_before_any_work(counted, prompts, params, match):
    gen, calls = counted
    with pytest.raises(ValueError, match=match):
        gen.generate(prompts, params)
    with pytest.raises(ValueError, match=match):
        gen.stream(prompts, params)  # validated eagerly, before the first next()
    assert not calls
    assert gen.pool.allocator.is_whole()


def test_bad_options():
    model, _ = model_and_refs("llama")
    with pytest.raises(TypeError):
        ContinuousGenerator(model, max_batch_tokens=64)
    with pytest.raises(ValueError, match="block_size"):
        ContinuousGenerator(model, block_size=10)
    with pytest.raises(ValueError, match="max_num_seqs"):
        ContinuousGenerator(model, max_num_seqs=0)
    with pytest.raises(NotImplementedError, match="hf_paged.enable"):
        ContinuousGenerator(make_model("falcon"))


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_error_in_a_step_frees_every_block(exc):
    model, refs = model_and_refs("llama")
    gen = new_generator(model, max_num_batched_tokens=16)
    calls = []

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise exc

    handle = model.register_forward_hook(fail_on_third)
    try:
        with pytest.raises(type(exc)):
            gen.generate(make_prompts(), GREEDY)
    finally:
        handle.remove()
    assert len(calls) == 3
    assert gen.pool.allocator.is_whole()
    # The generator is usable again and still exact.
    assert_parity(gen.generate(make_prompts(), GREEDY), refs, "llama")


def test_leaving_a_stream_early_frees_every_block():
    model, _ = model_and_refs("llama")
    gen = new_generator(model)
    events = gen.stream(make_prompts(), GREEDY)
    for _, _ in zip(range(5), events):
        pass
    assert gen.pool.allocator.num_used > 0
    events.close()
    assert gen.pool.allocator.is_whole()


def test_pool_layout_is_checked_on_the_first_forward():
    from hf_paged.memory.kv_pool import KVLayout, KVPool
    from hf_paged.engine.model_runner import ModelRunner, kv_layout_from_config
    from hf_paged.options import PoolOptions
    from hf_paged.engine.request import Request
    from hf_paged.engine.scheduler import Scheduler

    model, _ = model_and_refs("qwen3")
    right = kv_layout_from_config(model, torch.float64, "cpu")
    assert (right.num_layers, right.num_kv_heads, right.head_dim) == (2, 2, 16)
    wrong = KVLayout(2, 1, 32, torch.float64, torch.device("cpu"))
    pool = KVPool.create(PoolOptions(num_blocks=4), wrong)
    sched = Scheduler(pool.allocator, 16, max_num_seqs=1, max_num_batched_tokens=16)
    sched.add(Request(0, 0, 0, 3, [5, 6, 7], SamplingParams(), seed=0, arrival_time=0.0))
    with pytest.raises(AssertionError, match="sized from the config"):
        ModelRunner(model, pool, "auto").execute(sched.schedule())


def test_runs_freeze_older_objects_and_collect_them_afterwards():
    """Collections during a run skip the objects that existed before it (no pauses walking the model), and
    a garbage cycle of such objects is still collected once the run is over, also when it ends early."""
    import gc
    import weakref

    class Node:
        pass

    model, refs = model_and_refs("llama")
    gen = new_generator(model)
    before = gc.get_freeze_count()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    alive = weakref.ref(a)
    events = gen.stream(make_prompts(), GREEDY)
    next(events)
    assert gc.get_freeze_count() > before  # the model's objects and the cycle are frozen now
    del a, b
    gc.collect()
    assert alive() is not None  # frozen: skipped by the collection
    events.close()
    assert gc.get_freeze_count() == before
    gc.collect()
    assert alive() is None
    assert_parity(gen.generate(make_prompts(), GREEDY), refs, "llama")
    assert gc.get_freeze_count() == before
