"""Request bodies of the OpenAI-compatible API (pydantic) and OpenAI's error shape.

Every field is checked here, before any work: types are strict (``"0.5"`` is not a temperature), ranges
follow OpenAI's API, and an unknown field is an error naming it (a misspelt ``max_token`` must not
silently fall back to a default). A few OpenAI fields this server does not implement are accepted only
at their neutral value (``echo: false``, ``best_of`` equal to ``n``, ...) so that clients which always
send them keep working. ``validation_error`` turns pydantic's report into one 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

# The most top-logprobs per token (OpenAI's bound; also SamplingParams').
MAX_TOP_LOGPROBS = 20
# Samples per prompt: each holds a sequence slot and its own KV tail, so one request may not ask for
# thousands. The engine's queue bound (429) limits the rest.
MAX_N = 128

Number = StrictFloat | StrictInt


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, "invalid_value" if param else "invalid_request")


def validation_error(err: ValidationError) -> OpenAIError:
    """The most telling problem pydantic found, as a 400 whose ``param`` is the field's dotted path."""
    errors = err.errors(include_url=False)
    first = errors[0]
    if first.get("type") == "value_error" and not first.get("loc"):
        # A model validator's message starts with the field it is about.
        text = str(first.get("ctx", {}).get("error", first.get("msg", "")))
        return bad_request(text, text.split(":", 1)[0] if ":" in text else None)
    if first.get("type") == "extra_forbidden":
        param = _param(first)
        return OpenAIError(400, f"unknown field {param!r}: not a parameter of this endpoint", param, "unknown_parameter")
    # For a union (prompt, stop, content) pydantic reports every branch; a failed constraint (a negative
    # token id) says more than "not a string", so it wins; with none, the field's accepted forms are named.
    field = first.get("loc", ("",))[0]
    same_field = [e for e in errors if e.get("loc", ("",))[0] == field]
    chosen = next((e for e in same_field if not str(e.get("type", "")).endswith("_type")), None)
    value = (chosen or first).get("input")
    shown = f" (got {value!r:.80})" if (chosen or first).get("type") != "missing" else ""
    if chosen is None and len(same_field) > 1 and field in _FORMS:
        return bad_request(f"{field}: must be {_FORMS[field]}{shown}", str(field))
    chosen = chosen or first
    param = _param(chosen)
    return bad_request(f"{param or 'body'}: {chosen.get('msg', 'invalid value')}{shown}", param)


_FORMS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "messages": "a list of {'role': ..., 'content': ...} objects whose content is a string or a list of text parts",
    "tool_choice": "'none', 'auto' or null",
}


def _param(error: dict[str, Any]) -> str | None:
    return ".".join(str(p) for p in error.get("loc", ()) if not _is_union_branch(p)) or None


def _is_union_branch(part: Any) -> bool:
    # pydantic names the branch of a union it tried ("str", "list[int]", "function-after[...]").
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's spelling of "usage on every chunk"; accepted, not needed


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: StrictStr | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=16)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # Not OpenAI's, sent as extra body fields (vLLM's names).
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # -1 or 0: off
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    # OpenAI fields accepted only at their neutral value.
    logit_bias: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_common(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        if self.stop == "":
            raise ValueError("stop: must be a non-empty string or a list of them")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server (send null or {})")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: StrictStr | TokenIds | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: StrictBool = False
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.echo:
            raise ValueError("echo: not supported by this server (send false)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of equal to n is supported")
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one string, a list of strings, one id list, or a list of id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    # Roles and extra keys (name, tool_call_id, ...) are passed to the chat template as they are.
    model_config = ConfigDict(extra="allow", strict=True)

    role: Annotated[StrictStr, Field(min_length=1)]
    content: StrictStr | list[TextPart] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            out["content"] = "".join(part.text for part in self.content)
        elif self.content is None:
            out["content"] = ""
        return out


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # OpenAI's older spelling
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Accepted at their neutral value only.
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    service_tier: StrictStr | None = None
    add_generation_prompt: StrictBool = True  # vLLM's extra field: end the prompt with the assistant's turn

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens: conflicts with max_completion_tokens (send one of them)")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: tool calling is not supported by this server")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; any problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from None
    except ValueError as err:  # a model_validator's message starts with the field name
        text = str(err)
        raise bad_request(text, text.split(":", 1)[0] if ":" in text else None) from None
