"""What an install brings: no Triton for the CPU path, the LICENSE that pyproject declares, and a
default pytest run limited to the test suite."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now fails as on a CPU-only install
sys.path.insert(0, sys.argv[1])
import torch
from models import make_model
import hf_paged

model = make_model("llama")
ids = torch.tensor([[5, 6, 7, 8, 9]])
stock = model.generate(ids, max_new_tokens=5, do_sample=False)
hf_paged.enable(model)
paged = model.generate(ids, max_new_tokens=5, do_sample=False)
hf_paged.disable(model)
gen = hf_paged.ContinuousGenerator(model, num_blocks=16, progress=False)
(result,) = gen.generate([ids[0].tolist()], hf_paged.SamplingParams(max_new_tokens=5, temperature=0))
print("enable parity", torch.equal(stock, paged))
print("generator parity", result.token_ids == stock[0, 5:].tolist())
from hf_paged.kernels import kv_write
try:
    kv_write.write_kv(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), torch.zeros(1, 16, 1, 64), torch.zeros(1, 16, 1, 64), torch.zeros(1, dtype=torch.long))
except ImportError as e:
    print("launch:", e)
"""


def test_cpu_path_works_without_triton():
    out = subprocess.run([sys.executable, "-c", NO_TRITON, str(ROOT / "tests")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "enable parity True" in out.stdout and "generator parity True" in out.stdout
    assert "needs Triton, which is not installed" in out.stdout  # a kernel launch says what is missing


def test_triton_is_an_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("triton") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(dep.startswith("triton") for dep in extras["test"]) and any(dep.startswith("triton") for dep in extras["triton"])
    assert "matplotlib" in extras["plot"] and "matplotlib" in extras["test"]


def test_license_file_matches_the_declared_license():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_default_pytest_run_is_the_test_suite():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    assert any((ROOT / "benchmarks").glob("test_*.py"))  # still there, one command away
