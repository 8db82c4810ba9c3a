"""``SamplingParams``: how one request samples and when it stops.

Validation is explicit (``validate()``) rather than in ``__post_init__`` so that ``ContinuousGenerator``
can check every request of a call before any work and name the offending request in the error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling and stopping parameters (the order of filters follows ``model.generate``).

    Filters are applied as: repetition penalty, temperature, top-k, top-p, min-p, then one draw.
    """

    # Tokens to generate at most; the request finishes with "length" when it gets there.
    max_new_tokens: int = 16
    # Softmax temperature; 0 means greedy (argmax of the penalised logits).
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p.
    top_p: float = 1.0
    # Keep the top_k most likely tokens; 0 turns the filter off.
    top_k: int = 0
    # Drop tokens whose probability is below min_p times the most likely token's; 0 turns it off.
    min_p: float = 0.0
    # HF's RepetitionPenaltyLogitsProcessor over prompt + generated tokens; 1 turns it off.
    repetition_penalty: float = 1.0
    # Seed of this request's noise: equal seeds give equal tokens whatever else is in the batch.
    # None: a seed is drawn from torch's default generator when the request is submitted.
    seed: int | None = None
    # Strings that end the request ("stop"); the text is cut before the stop string. Needs a tokenizer.
    stop: tuple[str, ...] = ()
    # Token ids that end the request ("stop"); the id is kept as the last token.
    stop_token_ids: tuple[int, ...] = ()
    # Keep generating after the model's end-of-sequence token.
    ignore_eos: bool = False
    # Independent samples of the same prompt; sample k uses seed + k.
    n: int = 1
    # Number of top log-probabilities to return per generated token (None: no logprobs at all;
    # 0: only the sampled token's logprob).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept the obvious spellings (a single string, lists) and store tuples.
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its value."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must hold non-negative ints, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0, got {self.logprobs!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
