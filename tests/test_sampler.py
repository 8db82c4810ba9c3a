"""Sampler tests on CPU: greedy, HF-equivalent filtering and penalty, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_paged.engine.request import Request
from hf_paged.engine.sampler import Sampler, filter_logits, gumbel_noise
from hf_paged.engine.sampling_params import SamplingParams

V = 50


def req(rid: int, tokens=(5, 6, 7), seed: int = 0, **params) -> Request:
    return Request(rid, rid, 0, len(tokens), list(tokens), SamplingParams(**params), seed=seed, arrival_time=0.0)


def sample(sampler: Sampler, logits: torch.Tensor, requests: list[Request]):
    return sampler.sample(logits, sampler.prepare(requests))


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    out = sample(Sampler(V, "cpu"), logits, [req(i, temperature=0, seed=i) for i in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.6),
        dict(temperature=1.0, min_p=0.05),
        dict(temperature=0.5, top_k=10, top_p=0.8, min_p=0.02),
        dict(temperature=2.0),
    ],
)
def test_filters_match_hf_warpers(params):
    torch.manual_seed(1)
    logits = torch.randn(4, V) * 3
    sampler = Sampler(V, "cpu")
    batch = sampler.prepare([req(i, **params) for i in range(4)])
    ours = filter_logits(logits.clone(), batch)

    hf = TemperatureLogitsWarper(params["temperature"])(None, logits.clone())
    if params.get("top_k"):
        hf = TopKLogitsWarper(params["top_k"])(None, hf)
    if params.get("top_p", 1.0) < 1:
        hf = TopPLogitsWarper(params["top_p"])(None, hf)
    if params.get("min_p"):
        hf = MinPLogitsWarper(params["min_p"])(None, hf)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    kept = ~torch.isinf(hf)
    torch.testing.assert_close(ours[kept], hf[kept])


def test_mixed_rows_each_get_their_own_filter():
    torch.manual_seed(2)
    logits = torch.randn(3, V)
    sampler = Sampler(V, "cpu")
    batch = sampler.prepare([req(0, top_k=1), req(1), req(2, top_k=3)])
    kept = (~torch.isinf(filter_logits(logits, batch))).sum(-1).tolist()
    assert kept == [1, V, 3]
    # top_k = 1 makes sampling greedy whatever the seed
    for seed in range(20):
        out = sample(sampler, logits[:1], [req(0, top_k=1, seed=seed)])
        assert out.token_ids == [logits[0].argmax().item()]


def test_sampled_tokens_stay_inside_the_filter():
    torch.manual_seed(3)
    logits = torch.randn(1, V)
    allowed = set(logits[0].topk(4).indices.tolist())
    seen = set()
    sampler = Sampler(V, "cpu")
    for seed in range(300):
        seen.update(sample(sampler, logits, [req(0, seed=seed, top_k=4, temperature=5.0)]).token_ids)
    assert seen == allowed


def test_seeded_sampling_ignores_batch_composition_and_order():
    torch.manual_seed(4)
    logits = {i: torch.randn(V) for i in range(4)}
    reqs = {i: req(i, tokens=tuple(range(3, 3 + i + 2)), seed=1000 + i, temperature=1.0, top_p=0.9) for i in range(4)}
    sampler = Sampler(V, "cpu")

    def run(order):
        out = sample(sampler, torch.stack([logits[i] for i in order]), [reqs[i] for i in order])
        return dict(zip(order, out.token_ids))

    alone = {i: run([i])[i] for i in range(4)}
    assert run([0, 1, 2, 3]) == alone
    assert run([3, 1, 0, 2]) == alone
    assert run([2, 0]) == {2: alone[2], 0: alone[0]}


def test_noise_depends_on_seed_and_position():
    ids = torch.arange(V)
    vh = ids  # any fixed vocab hash
    base = gumbel_noise(torch.tensor([7]), torch.tensor([0]), torch.tensor([10]), vh)
    assert torch.equal(base, gumbel_noise(torch.tensor([7]), torch.tensor([0]), torch.tensor([10]), vh))
    assert not torch.equal(base, gumbel_noise(torch.tensor([8]), torch.tensor([0]), torch.tensor([10]), vh))
    assert not torch.equal(base, gumbel_noise(torch.tensor([7]), torch.tensor([1]), torch.tensor([10]), vh))
    assert not torch.equal(base, gumbel_noise(torch.tensor([7]), torch.tensor([0]), torch.tensor([11]), vh))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(1, 4)
    sampler = Sampler(4, "cpu")
    n = 4000
    # Vary the seed and the position: both feed the hash.
    reqs = [req(i, tokens=tuple([3] * (1 + i % 7)), seed=i // 7) for i in range(n)]
    out = sampler.sample(logits.expand(n, 4).contiguous(), sampler.prepare(reqs))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.03), freq


def test_repetition_penalty_matches_hf():
    torch.manual_seed(5)
    logits = torch.randn(3, V)
    histories = [(4, 9, 9, 30), (1, 2, 3), (7,)]
    penalties = [1.3, 0.8, 1.0]
    sampler = Sampler(V, "cpu")
    reqs = [req(i, tokens=h, repetition_penalty=p, temperature=0) for i, (h, p) in enumerate(zip(histories, penalties))]
    batch = sampler.prepare(reqs)
    got = sampler.processed_logits(logits, batch)
    out = sampler.sample(logits, batch)
    for row, (h, p) in enumerate(zip(histories, penalties)):
        expect = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), logits[row : row + 1].clone())[0]
        torch.testing.assert_close(got[row], expect)
        assert out.token_ids[row] == expect.argmax().item()


def test_repetition_penalty_tracks_sampled_tokens():
    # Logits favour token 10 strongly at first; a huge penalty must stop it repeating.
    logits = torch.zeros(1, V)
    logits[0, 10] = 5.0
    logits[0, 11] = 4.0
    sampler = Sampler(V, "cpu")
    r = req(0, tokens=(3,), temperature=0, repetition_penalty=100.0)
    first = sample(sampler, logits, [r]).token_ids[0]
    r.token_ids.append(first)
    second = sample(sampler, logits, [r]).token_ids[0]
    assert (first, second) == (10, 11)
    sampler.release(r)
    # A new request reusing the slot starts from its own history only.
    r2 = req(1, tokens=(3,), temperature=0, repetition_penalty=100.0)
    assert sample(sampler, logits, [r2]).token_ids[0] == 10


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(6)
    logits = torch.randn(2, V)
    sampler = Sampler(V, "cpu")
    out = sample(sampler, logits, [req(0, temperature=0.5, logprobs=3, seed=3), req(1, temperature=0)])
    lp = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(lp[0, first.token_id].item(), abs=1e-6)
    top_ids = lp[0].topk(3).indices.tolist()
    assert [t for t, _ in first.top] == top_ids
    assert [v for _, v in first.top] == pytest.approx(lp[0, top_ids].tolist(), abs=1e-6)
    assert out.logprobs[1] is None


def count_penalty_reference(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's definition, written out token by token."""
    out = logits.clone()
    for token in set(generated):
        out[token] -= generated.count(token) * frequency + presence
    return out


@pytest.mark.parametrize("presence, frequency", [(0.7, 0.0), (0.0, 0.4), (1.5, -0.6), (-2.0, 2.0)])
def test_presence_and_frequency_penalties_match_the_reference(presence, frequency):
    torch.manual_seed(7)
    logits = torch.randn(3, V)
    # (prompt, generated): prompt tokens never count, only generated ones do.
    histories = [((4, 9), (9, 9, 30, 2)), ((1, 2, 3), ()), ((7,), (7, 7, 7))]
    reqs = []
    for i, (prompt, generated) in enumerate(histories):
        r = req(i, tokens=prompt + generated, presence_penalty=presence, frequency_penalty=frequency, temperature=0)
        r.prompt_len = len(prompt)
        reqs.append(r)
    sampler = Sampler(V, "cpu")
    got = sampler.processed_logits(logits, sampler.prepare(reqs))
    for row, (_, generated) in enumerate(histories):
        torch.testing.assert_close(got[row], count_penalty_reference(logits[row], list(generated), presence, frequency))


def test_count_penalties_track_sampled_tokens_and_combine_with_repetition_penalty():
    torch.manual_seed(8)
    logits = torch.randn(1, V) * 2
    params = dict(temperature=0, presence_penalty=0.5, frequency_penalty=0.8, repetition_penalty=1.2)
    r = req(0, tokens=(3, 4), **params)
    sampler = Sampler(V, "cpu")
    for _ in range(12):  # greedy: each step's choice must be the argmax of the reference logits
        generated = r.token_ids[r.prompt_len :]
        expect = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([r.token_ids]), logits.clone())[0]
        expect = count_penalty_reference(expect, generated, 0.5, 0.8)
        batch = sampler.prepare([r])
        torch.testing.assert_close(sampler.processed_logits(logits, batch)[0], expect)
        r.token_ids.append(sampler.sample(logits, batch).token_ids[0])
    assert len(set(r.token_ids[2:])) > 1  # the penalties moved greedy decoding off its first choice


def test_penalty_rows_are_per_request_and_reused_after_release():
    logits = torch.zeros(2, V)
    logits[:, 10] = 1.0
    sampler = Sampler(V, "cpu")
    a = req(0, tokens=(3,), temperature=0, frequency_penalty=2.0)
    b = req(1, tokens=(3,), temperature=0)  # no penalty: unaffected by a's history
    first = sampler.sample(logits, sampler.prepare([a, b])).token_ids
    a.token_ids.append(first[0])
    b.token_ids.append(first[1])
    second = sampler.sample(logits, sampler.prepare([a, b])).token_ids
    assert first == [10, 10] and second[0] != 10 and second[1] == 10
    sampler.release(a)
    fresh = req(2, tokens=(3,), temperature=0, frequency_penalty=2.0)  # reuses a's row, starts empty
    assert sampler.sample(logits[:1], sampler.prepare([fresh])).token_ids == [10]


EOS = 2


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_new_tokens_matches_hf_processor(ignore_eos):
    torch.manual_seed(9)
    logits = torch.randn(4, V)
    logits[:, EOS] = 10.0  # EOS (and the stop id 17) would win without the mask
    logits[:, 17] = 9.0
    sampler = Sampler(V, "cpu", eos_token_ids=[EOS])
    prompt = (5, 6, 7)
    reqs = []
    for i, generated in enumerate([(), (8,), (8, 9), (8, 9, 10)]):
        r = req(i, tokens=prompt + generated, temperature=0, min_new_tokens=3, stop_token_ids=17, ignore_eos=ignore_eos)
        r.prompt_len = len(prompt)
        reqs.append(r)
    batch = sampler.prepare(reqs)
    got = sampler.processed_logits(logits, batch)
    ends = [17] if ignore_eos else [EOS, 17]
    for row, r in enumerate(reqs):
        hf = MinNewTokensLengthLogitsProcessor(len(prompt), 3, ends, device="cpu")
        expect = hf(torch.tensor([r.token_ids]), logits[row : row + 1].clone())[0]
        assert torch.equal(got[row], expect), row
    tokens = sampler.sample(logits, batch).token_ids
    assert tokens[3] == EOS  # three tokens generated: the mask is off
    if ignore_eos:
        assert tokens[:3] == [EOS] * 3  # EOS does not stop these rows, so it is not held back
    else:
        assert not {EOS, 17} & set(tokens[:3])


def test_seeded_sampling_with_penalties_ignores_batch_composition():
    torch.manual_seed(10)
    logits = {i: torch.randn(V) for i in range(4)}
    params = [
        dict(presence_penalty=0.5),
        dict(frequency_penalty=1.0, repetition_penalty=1.3),
        dict(min_new_tokens=5, stop_token_ids=(3,)),
        dict(),
    ]

    def fresh(i):
        r = req(i, tokens=(3, 4, 5, 6, 3), seed=50 + i, temperature=1.0, top_k=20, **params[i])
        r.prompt_len = 2  # three generated tokens, so the count penalties have something to count
        return r

    def run(order):
        sampler = Sampler(V, "cpu", eos_token_ids=[0])
        reqs = {i: fresh(i) for i in order}
        out = {i: [] for i in order}
        for _ in range(6):
            tokens = sampler.sample(torch.stack([logits[i] for i in order]), sampler.prepare([reqs[i] for i in order])).token_ids
            for i, t in zip(order, tokens):
                reqs[i].token_ids.append(t)
                out[i].append(t)
        return out

    alone = {i: run([i])[i] for i in range(4)}
    assert run([0, 1, 2, 3]) == alone
    assert run([3, 2, 1, 0]) == alone
    assert run([1, 3]) == {1: alone[1], 3: alone[3]}
