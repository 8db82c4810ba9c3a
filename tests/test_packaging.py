"""The wheel must never ship a top-level ``kernels`` module (it would shadow Hugging Face's ``kernels``)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib, sys\n"
    "from transformers.utils.import_utils import is_kernels_available\n"
    "import_first = sys.argv[1] == '1'\n"
    "if import_first: import hf_paged\n"
    "print(is_kernels_available())\n"
)


def test_wheel_has_no_top_level_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("hf_paged-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level, sorted(top_level)
    assert "hf_paged/kernels/paged_attention.py" in names
    assert "hf_paged/kernels/kv_write.py" in names
    assert "hf_paged/default_model/config.json" in names


def _kernels_available(cwd: Path, import_hf_paged: bool) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if import_hf_paged else "0"], cwd=cwd, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_import_leaves_kernels_probe_unchanged(tmp_path):
    # Outside the repo, and inside it (where the repo's kernels/ folder is on sys.path as '').
    for cwd in (tmp_path, ROOT):
        assert _kernels_available(cwd, False) == _kernels_available(cwd, True)
