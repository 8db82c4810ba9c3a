"""The softmax every torch attention path shares (the readable reference, the masked path of ``enable``).

Plain torch, no Triton: the CPU install imports it without Triton.
"""

from __future__ import annotations

import torch


def softmax_with_sink(logits: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of ``logits`` (masked entries at -inf).

    ``sink``: an optional per-head logit, broadcast to ``logits[..., :1]``, that joins the denominator
    only (attention sinks, as GPT-OSS's ``s_aux``). A row that sees nothing gets probabilities 0, not
    NaN: left-padding queries attend to nothing.
    """
    if sink is not None:
        logits = torch.cat([logits, sink.expand(*logits.shape[:-1], 1)], dim=-1)
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    return probs[..., :-1] if sink is not None else probs
