"""``hf-paged demo``: the three systems on the embedded model agree token for token, and the report says so."""

from __future__ import annotations

import torch

from hf_paged.entrypoints.demo import run_demo


def test_demo_systems_agree_and_report_renders():
    torch.manual_seed(0)
    report = run_demo(device="cpu", batch_size=3, new_tokens=4, repeats=1)
    assert report.all_identical, report.render()
    text = report.render()
    for line in ("stock generate", "enable() + generate", "ContinuousGenerator", "best of 1 interleaved"):
        assert line in text
    assert 0 < report.peak_kv_blocks and report.paged_kv_bytes < report.padded_kv_bytes
