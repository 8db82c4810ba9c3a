"""``ElementwiseFusion``: compiled norms / MLPs only inside the context, same outputs, restored after."""

from __future__ import annotations

import torch
from models import make_model

from hf_paged.engine.fusion import ElementwiseFusion


def test_modules_swapped_only_inside_and_outputs_unchanged():
    model = make_model("llama")
    x = torch.randint(3, 90, (2, 11))
    ref = model(x).logits
    fusion = ElementwiseFusion(model, backend="eager")  # the swapping alone; CUDA runs use Inductor
    assert {type(m).__name__ for m in fusion.modules} == {"LlamaRMSNorm", "LlamaMLP"}
    assert len(fusion.modules) == 2 * 2 + 1 + 2  # two norms per layer, the final norm, one MLP per layer
    with fusion:
        with fusion:  # nested (re-entrant) use keeps the swap until the outermost exit
            pass
        assert all("forward" in m.__dict__ for m in fusion.modules)
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-12)
    assert all("forward" not in m.__dict__ for m in fusion.modules)  # the class's forward again
    assert torch.equal(model(x).logits, ref)
