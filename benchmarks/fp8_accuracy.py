"""FP8 KV cache against full-precision K/V on tiny random-weight float32 models (CPU, about a minute).

Greedy ``generate`` with ``hf_paged.enable(model, kv_cache_dtype="fp8")`` against stock ``generate``,
8 left-padded prompts x 32 new tokens per architecture. Per step up to each row's first differing
token: whether the top-1 token agrees, the largest |logprob difference| over the vocabulary, and the
difference on the reference's chosen token.

Usage (repo root): ``PYTHONPATH=. python benchmarks/fp8_accuracy.py``
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import hf_paged  # noqa: E402
from models import left_padded_batch, make_model  # noqa: E402  (tests/models.py: the tiny configs)

tot_agree = tot = 0; worst = 0.0; chosen = []
for name in ["llama", "qwen2", "gemma2", "mistral", "gpt2", "phi3"]:
    model = make_model(name, dtype=torch.float32)
    batch = left_padded_batch([5, 12, 20, 9, 31, 16, 7, 25], seed=3)
    kw = dict(max_new_tokens=32, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(**batch, **kw)
    hf_paged.enable(model, kv_cache_dtype="fp8", num_blocks=64)
    out = model.generate(**batch, **kw)
    hf_paged.disable(model)
    w = batch["input_ids"].shape[1]
    same = out.sequences[:, w:] == ref.sequences[:, w:]
    agree = total = 0; m = 0.0
    for r in range(same.shape[0]):
        n = same.shape[1] if same[r].all() else int((~same[r]).nonzero()[0]) + 1
        for t in range(n):
            a = torch.log_softmax(out.scores[t][r].double(), -1); b = torch.log_softmax(ref.scores[t][r].double(), -1)
            m = max(m, (a - b).abs().max().item()); total += 1; agree += int(a.argmax() == b.argmax())
            chosen.append(abs(a[b.argmax()] - b[b.argmax()]).item())
    print(f"{name:8s} rows identical {int(same.all(1).sum())}/{same.shape[0]}  top-1 {agree}/{total}  max|dlogp| {m:.4f}")
    tot_agree += agree; tot += total; worst = max(worst, m)
c = torch.tensor(chosen)
print(f"all: top-1 agreement {tot_agree}/{tot} = {tot_agree/tot:.1%}, max |dlogprob| over the vocabulary {worst:.4f}, "
      f"|dlogprob| of the reference token: mean {c.mean():.4f}, p99 {c.quantile(0.99):.4f}")
