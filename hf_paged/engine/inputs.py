"""What the engine accepts, checked before any work: models, tokenizers, prompts, and the sampling
defaults a model's ``generation_config`` implies."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..integration.enable import uses_attention_interface
from .sampling_params import SamplingParams


def check_model(model: Any) -> None:
    """Refuse, with a clear error, models the engine cannot run (before any memory is allocated)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; hf_paged runs decoder-only causal LMs")
    if model.get_output_embeddings() is None or not hasattr(model, "generate"):
        raise ValueError(
            f"{name} has no language-model head (it returns hidden states, not logits); "
            f"load it with AutoModelForCausalLM (e.g. {name.replace('Model', 'ForCausalLM')})"
        )
    meta = next((n for n, p in itertools.chain(model.named_parameters(), model.named_buffers()) if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"{name} has weights on the meta device (e.g. {meta}); load or materialise them first")
    if not uses_attention_interface(model):
        raise NotImplementedError(
            f"{name} hard-codes its attention, so it cannot run packed continuous batches; "
            "use hf_paged.enable(model) and model.generate(...) instead (paged KV memory, dense attention)"
        )


def check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None:
        return
    if not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer (callable, with .decode), got {type(tokenizer).__name__}"
        )


def prompt_token_ids(where: str, prompt: Any, tokenizer: Any, num_embeddings: int) -> list[int]:
    """Token ids of one prompt: a string (tokenized; no second BOS when it starts with the BOS text), token
    ids (list, tensor, numpy), or what a tokenizer / ``apply_chat_template`` returns for one sequence."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{where}: prompt is a string but there is no tokenizer; pass token ids")
        # A prompt that already starts with the BOS text (a rendered chat template, say) must not get a second BOS.
        bos = getattr(tokenizer, "bos_token", None)
        add_special = not (isinstance(bos, str) and bos and prompt.startswith(bos))
        return list(tokenizer(prompt, add_special_tokens=add_special).input_ids)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids") and not isinstance(prompt, (torch.Tensor, list, tuple)):
        # What tokenizers and apply_chat_template(tokenize=True) return (dict / BatchEncoding): one sequence.
        ids = prompt["input_ids"] if isinstance(prompt, dict) or "input_ids" in prompt else prompt.input_ids
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
        elif ids and isinstance(ids[0], (list, tuple)) and len(ids) == 1:
            ids = ids[0]
        return prompt_token_ids(where, ids, tokenizer, num_embeddings)
    if isinstance(prompt, (Sequence, torch.Tensor)) or type(prompt).__name__ == "ndarray":
        if isinstance(prompt, torch.Tensor) or hasattr(prompt, "tolist"):
            if getattr(prompt, "ndim", 1) != 1:
                raise ValueError(f"{where}: token ids must be one sequence (1-D), got shape {tuple(prompt.shape)}")
            ids = prompt.tolist()
        else:
            ids = list(prompt)
        # Plain ints (the common case) are checked at C speed: a per-token Python check cost ~2.5 us per
        # token, i.e. 0.7 s for 512 prompts of ~550 tokens, on the caller's critical path.
        if ids and set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < num_embeddings:
            return ids  # already a fresh list (list(prompt) or .tolist())
        bad = next((t for t in ids if not _is_token_id(t, num_embeddings)), None)
        if bad is not None:
            raise ValueError(f"{where}: prompt token id {bad!r} is not an int in [0, {num_embeddings})")
        return [int(t) for t in ids]  # numpy ints -> int
    raise TypeError(f"{where}: a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What checking a request needs to know about the engine. Plain numbers, so a front end in another
    process than the model (``AsyncEngine.from_spec``) checks requests exactly as the engine core does."""

    num_embeddings: int  # token ids must be below this
    max_model_len: int | None  # the model's context (None: unbounded)
    block_size: int
    num_blocks: int  # the pool's size: a request that can never fit is refused


def check_request(where: str, prompt: Any, params: Any, tokenizer: Any, limits: RequestLimits) -> tuple[list[int], SamplingParams]:
    """Validate one prompt and its parameters; returns the token ids and a snapshot of the params.

    ``where`` names the request in error messages ("request 3", "request 'abc'").
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"{where}: sampling_params must be a SamplingParams, got {type(params).__name__}")
    try:
        params.validate()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if params.stop and tokenizer is None:
        raise ValueError(f"{where}: stop strings {params.stop!r} need a tokenizer")
    ids = prompt_token_ids(where, prompt, tokenizer, limits.num_embeddings)
    if not ids:
        raise ValueError(f"{where}: the prompt is empty")
    if limits.max_model_len is not None and len(ids) > limits.max_model_len:
        raise ValueError(f"{where}: the prompt has {len(ids)} tokens, more than the model's context ({limits.max_model_len})")
    bs = limits.block_size
    need = -(-(len(ids) + params.max_new_tokens) // bs)
    if need > limits.num_blocks:
        raise ValueError(
            f"{where}: prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) needs {need} KV "
            f"blocks of {bs} tokens, but the pool holds {limits.num_blocks}; raise num_blocks or lower max_new_tokens"
        )
    return ids, replace(params)  # a snapshot: later edits by the caller do not reach running requests


def sampling_params_from_generation_config(config: Any) -> SamplingParams:
    """``SamplingParams`` with the fields a transformers ``GenerationConfig`` sets (None: the library defaults)."""
    if config is None:
        return SamplingParams()
    fields: dict[str, Any] = {}
    max_new = getattr(config, "max_new_tokens", None)
    if isinstance(max_new, int) and max_new >= 1:
        fields["max_new_tokens"] = max_new
    min_new = getattr(config, "min_new_tokens", None)
    if isinstance(min_new, int) and 0 < min_new <= fields.get("max_new_tokens", SamplingParams.max_new_tokens):
        fields["min_new_tokens"] = min_new
    penalty = getattr(config, "repetition_penalty", None)
    if isinstance(penalty, (int, float)) and penalty > 0:
        fields["repetition_penalty"] = float(penalty)
    if not getattr(config, "do_sample", False):
        fields["temperature"] = 0.0
    else:
        for name, ok in (
            ("temperature", lambda v: v > 0),
            ("top_k", lambda v: isinstance(v, int) and v >= 0),
            ("top_p", lambda v: 0 < v <= 1),
            ("min_p", lambda v: 0 <= v <= 1),
        ):
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value):
                fields[name] = value
    return SamplingParams(**fields)


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: the generation config's (int or list), else the tokenizer's."""
    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _is_token_id(t: Any, vocab: int) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab
