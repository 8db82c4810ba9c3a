"""``SamplingParams``: how one request samples and when it stops.

Parameters are normalised and validated when constructed, so a bad value fails where it was written.
``validate()`` stays public: ``ContinuousGenerator`` calls it again on every request before any work
(a field may have been changed after construction) and names the offending request in the error.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, ClassVar

# The most top-logprobs a request may ask for, per generated or prompt token: OpenAI's API and vLLM's
# default ``max_logprobs`` both stop at 20. The bound is fixed (not the vocabulary) so that a request is
# valid or not independently of the model, and so one request cannot make a step copy a whole
# ``[rows, vocab]`` logprob table back to the host.
MAX_LOGPROBS = 20

# Seeds are in [0, 2**63): every value fits a signed int64 (torch tensors, other frameworks' seeds), and
# the sampler's noise hashes all 64 bits of ``seed + sample``, so distinct seeds in this range (and the
# ``seed + k`` of their ``n`` samples) never share noise. Larger Python ints would silently alias.
SEED_LIMIT = 2**63

# Other libraries' spellings -> this class's field, for the hint in the TypeError of an unknown keyword.
_OTHER_SPELLINGS = {
    "max_tokens": "max_new_tokens",  # vLLM, OpenAI
    "max_completion_tokens": "max_new_tokens",  # OpenAI
    "max_length": "max_new_tokens",  # transformers (counts the prompt too; max_new_tokens does not)
    "min_tokens": "min_new_tokens",  # vLLM
    "min_length": "min_new_tokens",  # transformers (counts the prompt too)
    "num_return_sequences": "n",  # transformers
    "best_of": "n",  # vLLM, OpenAI
    "top_logprobs": "logprobs",  # OpenAI
    "stop_sequences": "stop",  # TGI
    "eos_token_id": "stop_token_ids",  # transformers
    "random_seed": "seed",
    "do_sample": "temperature",  # greedy is temperature=0
}


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling and stopping parameters for ``ContinuousGenerator``.

    Every field is checked when the object is built (``ValueError`` naming the field and its value);
    numpy scalars are accepted and stored as plain Python ints and floats. The logits of a row go
    through: ``min_new_tokens`` (end tokens masked), repetition penalty, presence and frequency
    penalties, temperature, top-k, top-p, min-p, then one seeded draw (or the argmax when greedy).

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1); the request finishes with "length" there.
        min_new_tokens: tokens to generate at least (0 <= min_new_tokens <= max_new_tokens): until then
            the model's end-of-sequence ids (unless ``ignore_eos``) and ``stop_token_ids`` get zero
            probability, as transformers' ``MinNewTokensLengthLogitsProcessor``. Stop strings still stop.
        temperature: softmax temperature (>= 0); 0 means greedy (the argmax of the penalised logits).
        top_p: nucleus sampling, in (0, 1]: keep the smallest set of most likely tokens whose
            probability reaches ``top_p``; 1 turns it off.
        top_k: keep the ``top_k`` most likely tokens (>= 0); 0 turns it off, and a value above the
            vocabulary size keeps every token (as transformers' ``TopKLogitsWarper``).
        min_p: in [0, 1]: drop tokens whose probability is below ``min_p`` times the most likely
            token's; 0 turns it off.
        repetition_penalty: transformers' ``RepetitionPenaltyLogitsProcessor`` over the prompt and the
            generated tokens (> 0): a seen token's logit is divided by it when positive, multiplied
            when negative; 1 turns it off.
        presence_penalty: OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of
            every token generated so far (the prompt does not count); 0 turns it off.
        frequency_penalty: OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's logit once
            per time it was generated so far; 0 turns it off.
        seed: seed of this request's noise, an int in [0, 2**63). Equal seeds give equal tokens
            whatever else is in the batch (and after a preemption). None: a seed is drawn from
            torch's default generator when the request is submitted.
        stop: strings that end the request (finish reason "stop"); the text is cut before the stop
            string. A single string is accepted. Needs a tokenizer.
        stop_token_ids: token ids that end the request ("stop"); the id is kept as the last token.
            A single int is accepted.
        ignore_eos: keep generating after the model's end-of-sequence token.
        n: independent samples of the prompt (>= 1); sample k uses seed + k.
        logprobs: None: no logprobs. k in [0, 20]: the sampled token's logprob plus the k most likely
            (token, logprob) pairs, for every generated token, from the penalised logits before
            temperature. 20 is the bound of OpenAI's API and vLLM's default.
        prompt_logprobs: None: none. k in [0, 20]: the logprob of every prompt token after the first
            (as log-likelihood evaluations use) plus the k most likely alternatives at each position.

    Unknown keywords raise ``TypeError``; other libraries' spellings (``max_tokens``, ``min_tokens``,
    ``num_return_sequences``, ...) name the field to use instead.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_new_tokens: int = 0
    prompt_logprobs: int | None = None

    _INT_FIELDS: ClassVar[tuple[str, ...]] = ("max_new_tokens", "top_k", "seed", "n", "logprobs", "min_new_tokens", "prompt_logprobs")
    _FLOAT_FIELDS: ClassVar[tuple[str, ...]] = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")

    def __new__(cls, *args: Any, **kwargs: Any) -> SamplingParams:
        # Runs before the dataclass __init__ (which keeps its documented signature), only to turn an
        # unknown keyword into a TypeError that names the field meant.
        unknown = [k for k in kwargs if k not in _FIELD_NAMES]
        if unknown:
            raise TypeError(_unknown_keyword_message(unknown[0]))
        return object.__new__(cls)  # (zero-argument super() breaks in slots dataclasses)

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    def _normalise(self) -> None:
        """Store the accepted spellings in one form: numpy scalars -> int/float, one stop -> a tuple."""
        for name in self._INT_FIELDS:
            value = getattr(self, name)
            if _is_int(value):
                setattr(self, name, int(value))
        for name in self._FLOAT_FIELDS:
            value = getattr(self, name)
            if _is_number(value):
                setattr(self, name, float(value))
        if _is_bool(self.ignore_eos):
            self.ignore_eos = bool(self.ignore_eos)
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif _is_iterable(self.stop):
            self.stop = tuple(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = ()
        elif _is_int(self.stop_token_ids):
            self.stop_token_ids = (int(self.stop_token_ids),)
        elif _is_iterable(self.stop_token_ids) and not isinstance(self.stop_token_ids, (str, bytes)):
            self.stop_token_ids = tuple(int(t) if _is_int(t) else t for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its value."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be an int in [0, max_new_tokens={self.max_new_tokens!r}], got {self.min_new_tokens!r}"
            )
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            hint = " (vLLM's -1 for 'off' is 0 here)" if self.top_k == -1 else ""
            raise ValueError(f"top_k must be an int >= 0 (0 = off){hint}, got {self.top_k!r}")
        if not _is_finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_finite(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a sequence of them, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be an int >= 0 or a sequence of them, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {value!r}")


_FIELD_NAMES = frozenset(f.name for f in fields(SamplingParams))


def _unknown_keyword_message(name: str) -> str:
    message = f"SamplingParams got an unexpected keyword argument {name!r}"
    meant = _OTHER_SPELLINGS.get(name)
    if meant == "temperature":
        return f"{message}; use temperature=0 for greedy decoding (do_sample=False) or > 0 to sample"
    if meant is not None:
        return f"{message}; the field here is {meant!r}"
    close = difflib.get_close_matches(name, sorted(_FIELD_NAMES), n=1)
    return f"{message}; did you mean {close[0]!r}?" if close else f"{message}; fields: {', '.join(sorted(_FIELD_NAMES))}"


def _is_bool(x: object) -> bool:
    # numpy's bool (``np.bool_``) is not a Python bool; it is recognised by its type name so that
    # numpy stays optional.
    return isinstance(x, bool) or type(x).__name__ in ("bool", "bool_")


def _is_int(x: object) -> bool:
    """Python and numpy integers; bools are refused (``True`` as a token count is a bug)."""
    return isinstance(x, numbers.Integral) and not _is_bool(x)


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not _is_bool(x)


def _is_finite(x: object) -> bool:
    return _is_number(x) and math.isfinite(x)


def _is_iterable(x: object) -> bool:
    try:
        iter(x)
    except TypeError:
        return False
    return True
