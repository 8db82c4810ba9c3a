"""Sampler tests on CPU: greedy, HF-equivalent filtering and penalty, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
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
    reqs = [req(i, tokens=h, repetition_penalty=p, temperature=0, logprobs=V) for i, (h, p) in enumerate(zip(histories, penalties))]
    out = sample(sampler, logits, reqs)
    for row, (h, p) in enumerate(zip(histories, penalties)):
        expect = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), logits[row : row + 1].clone())
        expect = expect.log_softmax(-1)[0]
        got = torch.zeros(V)
        for tid, lp in out.logprobs[row].top:
            got[tid] = lp
        torch.testing.assert_close(got, expect)
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
