"""``skinny_gemm`` (the few-row weight-streaming GEMM) against its torch reference and ``F.linear``.

Runs through the Triton interpreter on CPU (``TRITON_INTERPRET=1``, small shapes) and natively on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_paged.kernels.skinny_gemm import MAX_ROWS, skinny_gemm, skinny_gemm_reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter computes bf16 wrongly


@pytest.mark.parametrize("rows", [1, 2, 5, MAX_ROWS])
@pytest.mark.parametrize("n, k", [(48, 64), (70, 200), (16, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, LOW_DTYPE])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_and_linear(rows, n, k, dtype, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    y = skinny_gemm(x, w, b)
    assert y.shape == (rows, n) and y.dtype == dtype
    ref = skinny_gemm_reference(x, w, b)
    if dtype == torch.float32:  # exact products, float32 sums in another order
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    else:  # one 16-bit rounding of the same float32 sum, give or take an ulp
        torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=2e-2)


def test_strided_rows_and_every_config():
    x = torch.randn(6, 3, 96).to(DEVICE)[:, 1]  # rows 288 elements apart
    w = torch.randn(40, 96).to(DEVICE)
    for config in [(16, 32, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2)]:
        torch.testing.assert_close(skinny_gemm(x, w, config=config), x @ w.T, rtol=1e-5, atol=1e-4)


def test_bad_inputs_are_refused():
    w = torch.randn(8, 16)
    with pytest.raises(AssertionError, match="rows"):
        skinny_gemm(torch.randn(MAX_ROWS + 1, 16), w)
    with pytest.raises(AssertionError, match="does not match"):
        skinny_gemm(torch.randn(2, 15), w)
    with pytest.raises(AssertionError, match="dtype"):
        skinny_gemm(torch.randn(2, 16, dtype=torch.float64), w.double())
