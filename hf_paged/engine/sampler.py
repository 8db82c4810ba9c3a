"""Batched on-device sampling from per-row parameter tensors.

Every row of a step has its own temperature, top-k, top-p, min-p, penalties and seed, held in ``[R]``
tensors built once per step (``Sampler.prepare``). ``Sampler.sample`` then runs the same
few tensor ops for the whole batch, with no per-row Python and one host sync: ``PendingSample.result()``.
Stages that no row uses (e.g. the sort for top-k/top-p) are skipped, decided on the host from the
parameters, never from device values.

Seeded sampling is reproducible whatever else is in the batch: a row's noise is a counter-based hash
of (seed, position of the token being sampled, vocab index), computed with int64 tensor ops, turned
into Gumbel noise, and the sample is ``argmax(filtered_logits / T + gumbel)`` (Gumbel-max). So the
noise a request sees depends on nothing but its own seed and its own length, and a preempted and
recomputed request draws the same tokens again.

Penalties keep, per request that uses them, a row over the vocabulary on the device: a ``[slots, V]``
bool table of the tokens seen (prompt + generated) for the repetition penalty, and a ``[slots, V]``
int32 table of how often each token was generated for the presence and frequency penalties. A row is
filled once from the request's tokens and then only gets each sampled token: no step re-reads a
request's whole context on the host. Penalties depend only on the request's own tokens, so they keep
seeded sampling independent of the batch as well.

``min_new_tokens`` masks the end-of-sequence ids (unless ``ignore_eos``) and ``stop_token_ids`` of
rows that have not generated enough tokens yet: a short ``(row, token)`` list built on the host from
the parameters and token counts, applied as one indexed fill on the device.

Order, per row: end-token mask, repetition penalty, presence/frequency penalties (these three give
the logits that logprobs report), then temperature, top-k, top-p, min-p and the draw.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from .request import Request, TokenLogprobs

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (16-bit halves)."""
    lo = x & 0xFFFF
    hi = x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' ``lowbias32`` integer hash: a bijection of [0, 2**32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[R, V]`` from per-row (seed, position) ``[R]`` int64 and hashed vocab ids ``[V]``."""
    key = _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32((positions & _M32) ^ 0x9E3779B9)))  # [R]
    h = _mix32((key[:, None] + vocab_hash[None, :]) & _M32)  # [R, V]
    # 24 random bits -> uniform in (0, 1) exactly representable in float32.
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters of one step (device tensors) plus host-side switches."""

    temperature: torch.Tensor  # [R] float32; 1 on greedy rows (they take the argmax anyway)
    top_k: torch.Tensor  # [R] int64; V when off
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32
    penalty: torch.Tensor  # [R] float32 repetition penalty
    presence_penalty: torch.Tensor  # [R] float32
    frequency_penalty: torch.Tensor  # [R] float32
    seed_lo: torch.Tensor  # [R] int64, low 32 bits of the row's seed
    seed_hi: torch.Tensor  # [R] int64, high 32 bits
    positions: torch.Tensor  # [R] int64 position of the token being sampled (= request.num_tokens)
    greedy: torch.Tensor  # [R] bool
    penalty_rows: torch.Tensor | None  # [P] int64 rows with a repetition penalty (None: no row has one)
    penalty_slots: torch.Tensor | None  # [P] int64 their rows of the seen-token table (distinct)
    count_rows: torch.Tensor | None  # [C] int64 rows with a presence or frequency penalty (None: none)
    count_slots: torch.Tensor | None  # [C] int64 their rows of the generated-count table (distinct)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) masked by min_new_tokens
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    num_logprobs: int | None  # max logprobs over rows that asked (None: no row asked)
    logprob_rows: list[int | None]  # per row: how many top logprobs it wants, None = no logprobs


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one sampled id per row
    logprobs: list[TokenLogprobs | None] | None  # per row, when any row asked for logprobs


class PendingSample:
    """Sampled token ids still on the device, on their way to the host.

    ``token_ids`` (``[R]``, on the device) can feed the next step's inputs before the host has them;
    ``result()`` waits for the copy (on CUDA a non-blocking copy into pinned memory and an event: only
    this step's work is waited for, not steps queued after it).
    """

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, logprob_layout: tuple[int, list] | None) -> None:
        self.token_ids = token_ids
        self._layout = logprob_layout  # (top k computed, per row: top logprobs wanted or None)
        self._event = None
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        host = self._host.tolist()
        if self._layout is None:
            return SamplerOutput(host, None)
        k, logprob_rows = self._layout
        out: list[TokenLogprobs | None] = []
        for row, want in zip(host, logprob_rows):
            if want is None:
                out.append(None)
                continue
            top = tuple((int(row[2 + j]), row[2 + k + j]) for j in range(min(want, k)))
            out.append(TokenLogprobs(int(row[0]), row[1], top))
        return SamplerOutput([int(row[0]) for row in host], out)


class TokenTable:
    """Per-request rows of a ``[slots, V]`` device table over the vocabulary, grown on demand.

    A request gets a row the first time it needs one (filled from the tokens it has so far) and keeps
    it until ``release``; freed rows are reused.
    """

    def __init__(self, vocab_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.dtype = dtype
        self.table: torch.Tensor | None = None  # [slots, V]
        self._row_of: dict[int, int] = {}  # request_id -> row
        self._free: list[int] = []

    def row(self, request_id: int, tokens: Sequence[int]) -> int:
        row = self._row_of.get(request_id)
        if row is not None:
            return row
        if not self._free:
            old = 0 if self.table is None else self.table.shape[0]
            grown = torch.zeros((max(8, 2 * old), self.vocab_size), dtype=self.dtype, device=self.device)
            if self.table is not None:
                grown[:old] = self.table
            self.table = grown
            self._free = list(range(grown.shape[0] - 1, old - 1, -1))
        row = self._free.pop()
        self._row_of[request_id] = row
        self.table[row] = 0
        if tokens:
            ids = torch.tensor(tokens, dtype=torch.long).to(self.device).clamp(max=self.vocab_size - 1)
            if self.dtype == torch.bool:
                self.table[row, ids] = True
            else:
                self.table[row].index_put_((ids,), torch.ones_like(ids, dtype=self.dtype), accumulate=True)
        return row

    def release(self, request_id: int) -> None:
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def reset(self) -> None:
        self._row_of.clear()
        self._free = [] if self.table is None else list(range(self.table.shape[0] - 1, -1, -1))


class Sampler:
    """Samples one token per row of a step's logits; owns the per-request penalty tables.

    ``eos_token_ids``: the model's end-of-sequence ids, which ``min_new_tokens`` holds back.
    """

    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: Collection[int] = ()) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.eos_token_ids = tuple(sorted(int(t) for t in eos_token_ids))
        self.vocab_hash = _mix32(torch.arange(vocab_size, dtype=torch.int64, device=self.device) ^ 0x5BD1E995)
        self.seen = TokenTable(vocab_size, self.device, torch.bool)  # prompt + generated: repetition penalty
        self.counts = TokenTable(vocab_size, self.device, torch.int32)  # generated only: presence/frequency

    # ---- host side, once per step ----------------------------------------------------------------
    def prepare(self, requests: list[Request], ahead: int = 0) -> SamplingBatch:
        """Parameters of the sampling rows (in batch order): one host->device copy for all of them.

        ``ahead``: tokens each request will have gained, in steps still on the device, before this one
        samples (1 for a step scheduled ahead, see ``EngineCore``): the position that seeds its noise and
        the ``min_new_tokens`` count move on by that much. The penalty tables need nothing: a sampled
        token enters them on the device, in stream order.
        """
        vocab = self.vocab_size
        rows = []
        penalty_rows: list[int] = []
        penalty_slots: list[int] = []
        count_rows: list[int] = []
        count_slots: list[int] = []
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        for i, r in enumerate(requests):
            p = r.params
            greedy = p.temperature == 0
            rows.append(
                (
                    1.0 if greedy else p.temperature,
                    min(p.top_k, vocab) if p.top_k > 0 else vocab,
                    p.top_p,
                    p.min_p,
                    p.repetition_penalty,
                    p.presence_penalty,
                    p.frequency_penalty,
                    r.seed & _M32,
                    (r.seed >> 32) & _M32,
                    r.num_tokens + ahead,
                    1.0 if greedy else 0.0,
                )
            )
            if p.repetition_penalty != 1.0:
                penalty_rows.append(i)
                penalty_slots.append(self.seen.row(r.request_id, r.token_ids))
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                count_rows.append(i)
                count_slots.append(self.counts.row(r.request_id, r.token_ids[r.prompt_len :]))
            if r.num_tokens + ahead - r.prompt_len < p.min_new_tokens:
                ends = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids).union(self.eos_token_ids)
                ends = sorted(t for t in ends if t < vocab)
                banned_rows += [i] * len(ends)
                banned_ids += ends
        # float64 holds every value exactly (ints < 2**53, seeds split in 32-bit halves), so one copy
        # carries all columns.
        host = torch.tensor(rows, dtype=torch.float64).view(len(rows), 11)
        if self.device.type == "cuda":
            host = host.pin_memory()
        cols = host.to(self.device, non_blocking=True).unbind(1)
        all_greedy = all(r.params.temperature == 0 for r in requests)
        sampling = [r.params for r in requests if r.params.temperature != 0]
        logprob_rows = [r.params.logprobs for r in requests]
        asked = [k for k in logprob_rows if k is not None]
        return SamplingBatch(
            temperature=cols[0].float(),
            top_k=cols[1].long(),
            top_p=cols[2].float(),
            min_p=cols[3].float(),
            penalty=cols[4].float(),
            presence_penalty=cols[5].float(),
            frequency_penalty=cols[6].float(),
            seed_lo=cols[7].long(),
            seed_hi=cols[8].long(),
            positions=cols[9].long(),
            greedy=cols[10] > 0,
            penalty_rows=self._index(penalty_rows),
            penalty_slots=self._index(penalty_slots),
            count_rows=self._index(count_rows),
            count_slots=self._index(count_slots),
            banned=(self._index(banned_rows), self._index(banned_ids)) if banned_rows else None,
            all_greedy=all_greedy,
            use_top_k=any(p.top_k > 0 for p in sampling),
            use_top_p=any(p.top_p < 1 for p in sampling),
            use_min_p=any(p.min_p > 0 for p in sampling),
            num_logprobs=max(asked) if asked else None,
            logprob_rows=logprob_rows,
        )

    def _index(self, values: list[int]) -> torch.Tensor | None:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True) if values else None

    def release(self, request: Request) -> None:
        """Forget a finished request's penalty rows."""
        self.seen.release(request.request_id)
        self.counts.release(request.request_id)

    def reset(self) -> None:
        self.seen.reset()
        self.counts.reset()

    # ---- device side ---------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """One token per row of ``logits`` ``[R, V]``: ``sample_async`` and its result at once."""
        return self.sample_async(logits, batch).result()

    def sample_async(self, logits: torch.Tensor, batch: SamplingBatch) -> "PendingSample":
        """Queue the sampling of one token per row of ``logits`` ``[R, V]`` and the copy of the results to
        the host; nothing waits for the device until ``PendingSample.result()``."""
        assert logits.shape[0] == batch.temperature.shape[0], f"{logits.shape[0]} logit rows for {batch.temperature.shape[0]} requests"
        x = self.processed_logits(logits, batch)  # [R, V]
        logprobs = torch.log_softmax(x, dim=-1) if batch.num_logprobs is not None else None
        token_ids = x.argmax(dim=-1)  # [R] greedy choice
        if not batch.all_greedy:
            token_ids = torch.where(batch.greedy, token_ids, self._draw(x, batch))
        if batch.penalty_rows is not None:
            self.seen.table[batch.penalty_slots, token_ids[batch.penalty_rows]] = True
        if batch.count_rows is not None:
            self.counts.table[batch.count_slots, token_ids[batch.count_rows]] += 1  # slots are distinct
        if logprobs is None:
            return PendingSample(token_ids, token_ids, None)
        # One transfer for everything: ids, chosen logprob, top ids, top logprobs (float64 holds ids exactly).
        chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)  # [R]
        k = min(batch.num_logprobs, logprobs.shape[-1])
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], token_ids[:, None][:, :0])
        packed = torch.cat([token_ids[:, None].double(), chosen[:, None].double(), top_ids.double(), top_lp.double()], dim=1)
        return PendingSample(token_ids, packed, (k, batch.logprob_rows))

    def processed_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """``logits`` ``[R, V]`` after the end-token mask and the penalties (float32 or wider).

        These are the logits that logprobs report; temperature and the filters come after.
        """
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [R, V]
        if batch.banned is not None:
            x = x.index_put(batch.banned, torch.tensor(float("-inf"), dtype=x.dtype, device=x.device))
        if batch.penalty_rows is not None:
            x = self._apply_repetition_penalty(x, batch)
        if batch.count_rows is not None:
            x = self._apply_count_penalties(x, batch)
        return x

    def _apply_repetition_penalty(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # HF RepetitionPenaltyLogitsProcessor: seen tokens' logits are divided (>0) or multiplied (<0).
        rows = batch.penalty_rows
        sub = x[rows]  # [P, V]
        pen = batch.penalty[rows][:, None].to(x.dtype)
        seen = self.seen.table[batch.penalty_slots, : x.shape[-1]]  # [P, V]
        return x.index_copy(0, rows, torch.where(seen, torch.where(sub < 0, sub * pen, sub / pen), sub))

    def _apply_count_penalties(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # OpenAI: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, where
        # count[j] is how often token j was generated so far (the prompt does not count).
        rows = batch.count_rows
        counts = self.counts.table[batch.count_slots, : x.shape[-1]].to(x.dtype)  # [C, V]
        freq = batch.frequency_penalty[rows][:, None].to(x.dtype)
        pres = batch.presence_penalty[rows][:, None].to(x.dtype)
        return x.index_copy(0, rows, x[rows] - counts * freq - (counts > 0).to(x.dtype) * pres)

    def _draw(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Gumbel-max over the temperature-scaled, top-k/top-p/min-p filtered logits."""
        noise = gumbel_noise(batch.seed_lo, batch.seed_hi, batch.positions, self.vocab_hash[: x.shape[-1]])
        return (filter_logits(x, batch) + noise).argmax(dim=-1)


def filter_logits(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as HF's warpers do them; removed tokens get -inf.

    ``x``: ``[R, V]`` penalised logits. Greedy rows have temperature 1 here (they take the argmax anyway).
    """
    x = x / batch.temperature[:, None].to(x.dtype)
    if not (batch.use_top_k or batch.use_top_p or batch.use_min_p):
        return x
    # Ascending sort, like HF's warpers: the most likely token is last.
    sorted_x, order = x.sort(dim=-1)  # [R, V]
    vocab = x.shape[-1]
    if batch.use_top_k:
        rank = torch.arange(vocab, device=x.device)
        sorted_x = sorted_x.masked_fill(rank[None, :] < vocab - batch.top_k[:, None], float("-inf"))
    if batch.use_top_p:
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop = (cum <= (1 - batch.top_p[:, None]).to(x.dtype)) & (batch.top_p[:, None] < 1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    if batch.use_min_p:
        probs = sorted_x.softmax(dim=-1)
        sorted_x = sorted_x.masked_fill(probs < batch.min_p[:, None].to(x.dtype) * probs[:, -1:], float("-inf"))
    return torch.empty_like(sorted_x).scatter_(-1, order, sorted_x)
