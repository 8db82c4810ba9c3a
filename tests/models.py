"""Tiny random-weight models of real architectures, built in code (no downloads).

float64 by default: greedy parity against stock ``generate`` must not hinge on float32 near-ties.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 96


def _common(**extra):
    return dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


# name -> (config class, kwargs). Head dims are 16..32 to keep CPU tests fast; the kernels are tested
# separately at the real head dims (64..256).
CONFIGS = {
    "llama": ("LlamaConfig", _common(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
    "mistral": ("MistralConfig", _common(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, sliding_window=7,
                                         max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", _common(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
    "qwen3": ("Qwen3Config", _common(hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
    "gemma2": ("Gemma2Config", _common(hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                                       num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                       attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                                       query_pre_attn_scalar=16, max_position_embeddings=256)),
    "phi3": ("Phi3Config", _common(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   original_max_position_embeddings=256)),
    "gpt_neox": ("GPTNeoXConfig", _common(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256)),
    "gpt2": ("GPT2Config", _common(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "opt": ("OPTConfig", _common(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=256, word_embed_proj_dim=64)),
    "falcon": ("FalconConfig", _common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       new_decoder_architecture=True, num_kv_heads=2)),
}

# Architectures whose attention transformers hard-codes (paged memory, dense attention).
FALLBACK = {"falcon"}


def make_config(name: str):
    cls_name, kwargs = CONFIGS[name]
    return getattr(transformers, cls_name)(**kwargs)


def widen(config, head_dim: int = 64):
    """Same architecture with ``head_dim``-wide heads (the Triton kernels' sizes; the default tiny
    configs use 16-wide heads, which take the torch path)."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    for field in ("hidden_size", "n_embd", "word_embed_proj_dim"):
        if field in config.to_dict():
            setattr(config, field, heads * head_dim)
    if "head_dim" in config.to_dict():  # a stored field (Falcon derives it: a read-only property)
        config.head_dim = head_dim
    if getattr(config, "query_pre_attn_scalar", None) is not None:
        config.query_pre_attn_scalar = head_dim
    return config


def make_model(
    name: str, dtype: torch.dtype = torch.float64, seed: int = 0, attn_implementation: str | None = None, head_dim: int | None = None
):
    torch.manual_seed(seed)
    config = make_config(name)
    if head_dim is not None:
        config = widen(config, head_dim)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def left_padded_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prompts of the given lengths, left padded with token 0 (ids 3.. never collide with pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros((len(lengths), width), dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        attention_mask[row, width - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
