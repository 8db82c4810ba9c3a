"""Request state as the scheduler sees it, and the results handed back to users.

One ``Request`` is one sequence: a prompt with ``n`` samples becomes ``n`` requests (sample ``k`` uses
``seed + k``) that are scheduled independently and merged into one ``GenerationResult`` at the end.

Token bookkeeping (the scheduler's whole view of a request)::

    |------------- prompt -------------|------ generated ------|
    |------------------------------- num_tokens ---------------|
    |------ num_computed_tokens ------|   K/V already in the pool

A step computes ``num_tokens - num_computed_tokens`` tokens, or a chunk of them. When a chunk reaches
``num_tokens`` the step's logits at its last token sample the next token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..memory.block_allocator import BlockKey
from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # in the waiting queue (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds blocks and is scheduled every step until it finishes
    FINISHED = "finished"  # done; blocks freed


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities of one generated token, from the penalised logits before temperature."""

    token_id: int
    logprob: float
    # The ``logprobs`` most likely (token_id, logprob) pairs, most likely first.
    top: tuple[tuple[int, float], ...] = ()


class IncrementalDetokenizer:
    """Text of the generated tokens, grown one token at a time, with stop-string detection.

    Decodes a small window (``prefix_offset:``) per token, the way TGI and vLLM do: the text added by a
    token is ``decode(window + token) - decode(window)``, held back while it ends in an incomplete UTF-8
    character (U+FFFD).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self._decode = _fast_decode(tokenizer)
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def append(self, token_id: int) -> bool:
        """Add a token; True when a stop string appeared (``text`` is then cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        old_len = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if not self.stop:
            return False
        # A stop string that ends in the new text starts at most max_stop_len - 1 chars before it.
        start = max(0, old_len - self.max_stop_len + 1)
        hits = [pos for pos in (self.text.find(s, start) for s in self.stop) if pos >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def flush(self) -> None:
        """At finish: add whatever text the held-back tokens decode to, complete or not."""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)

    def stable_text_len(self, finished: bool) -> int:
        """Length of the text prefix that no later stop string can cut any more (safe to stream)."""
        if finished or self.max_stop_len <= 1:
            return len(self.text)
        return max(0, len(self.text) - (self.max_stop_len - 1))


def _fast_decode(tokenizer: Any):
    """``decode(ids, skip_special_tokens=True)``, straight through the Rust tokenizer when that gives the
    same text (a fast tokenizer without clean-up): ~7x less Python per call, and this runs twice per token."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if callable(getattr(backend, "decode", None)) and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated."""

    request_id: int  # unique per generator run, in submission order
    index: int  # position of the prompt in the user's list
    sample: int  # k of the prompt's n samples
    prompt_len: int
    token_ids: list[int]  # prompt followed by the generated tokens (what a recompute replays)
    params: SamplingParams
    seed: int  # this sample's seed (params.seed + sample, or drawn at submission)
    arrival_time: float  # time.perf_counter() at submission
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool
    block_ids: list[int] = field(default_factory=list)  # physical blocks, in logical order
    # Prefix-cache keys of the full blocks of token_ids computed so far (they depend on tokens only,
    # so they survive preemption), and how many of block_ids are registered in the cache.
    block_keys: list[BlockKey] = field(default_factory=list)
    num_registered_blocks: int = 0
    # Leading blocks given back because they fell out of every layer's sliding window; their
    # entries in block_ids stay (stale) so logical block i is still block_ids[i].
    num_released_blocks: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at (the latest) admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "length", "stop" or "abort"
    logprobs: list[TokenLogprobs] | None = None  # one per generated token when params.logprobs is set
    detokenizer: IncrementalDetokenizer | None = None  # only when text is needed incrementally
    first_scheduled_time: float | None = None  # first admitted to the running batch
    first_token_time: float | None = None
    finish_time: float | None = None
    num_streamed_tokens: int = 0  # generated tokens already handed out by stream()
    num_streamed_chars: int = 0  # characters of text already handed out by stream()
    # With params.prompt_logprobs (sample 0 only): entry p is the logprob of prompt token p given the
    # tokens before it (entry 0 is None: the first token has no context).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    group: Any = None  # the engine's RequestGroup (the user request this sample belongs to)
    last_token_time: float | None = None  # sample 0 only: when its latest token was appended
    inter_token_latencies: list[float] = field(default_factory=list)  # sample 0 only: gaps between its tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class SampleResult:
    """One of the ``n`` samples of a prompt."""

    token_ids: list[int]  # generated tokens (the stop / eos token included when it ended the sample)
    text: str | None  # decoded generated text (cut before a stop string); None without a tokenizer
    finish_reason: str  # "length", "stop" or "abort"
    logprobs: list[TokenLogprobs] | None  # one per generated token when requested


@dataclass(slots=True)
class GenerationResult:
    """Everything generated for one prompt; ``generate`` returns these in input order."""

    index: int  # position of the prompt in the input list
    prompt_token_ids: list[int]
    token_ids: list[int]  # the first sample's tokens (the only one when n == 1)
    text: str | None  # the first sample's text
    finish_reason: str  # the first sample's finish reason
    samples: list[SampleResult]  # all n samples, sample 0 first (length 1 when n == 1)
    logprobs: list[TokenLogprobs] | None  # the first sample's logprobs
    ttft_s: float  # submission to first generated token (earliest over the samples)
    latency_s: float  # submission to the last sample's finish
    # With SamplingParams.prompt_logprobs: one entry per prompt token (the first is None), else None.
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """New output of one sample, yielded by ``ContinuousGenerator.stream`` and ``AsyncEngine.generate``."""

    index: int  # position of the prompt in the input list (0 for the online engine)
    sample: int  # which of the prompt's n samples
    token_ids: list[int]  # tokens generated since this sample's previous event
    text: str | None  # text added since the previous event (None without a tokenizer); may lag tokens
    finished: bool
    finish_reason: str | None  # set on the sample's last event: "stop", "length" or "abort"
    request_id: str | None = None  # the user request's id
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked for logprobs
    num_prompt_tokens: int = 0  # the prompt's length in tokens
    # With SamplingParams.prompt_logprobs: on sample 0's first event, one entry per prompt token.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
