"""The compiled matrix kernels (engine/kernels.cpp) against the float64 product, for every instruction set this
CPU has. Tolerance: a float32 dot product of length K summed in any order is within gamma_K * sum_k |x_k w_k| of the
exact value, gamma_K = K u / (1 - K u), u = 2^-24 (Higham, Accuracy and Stability, 3.1); the bound is per element."""

from __future__ import annotations

import pytest
import torch

from conftest import available_isas
from ponder.engine import fused

mod = fused.load()
pytestmark = pytest.mark.skipif(mod is None, reason="the compiled kernels are not available here")


def _isas() -> list[str]:
    return available_isas(mod)


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    K = x.shape[-1]
    exact = x.double() @ w.double().T + (b.double() if b is not None else 0)
    mag = x.double().abs() @ w.double().abs().T + (b.double().abs() if b is not None else 0)
    u = 2.0 ** -24
    gamma = (K + 1) * u / (1 - (K + 1) * u)
    assert y.dtype == torch.float32 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= gamma * mag + 1e-30).all()


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 17, 64])
@pytest.mark.parametrize("K,N", [(64, 48), (576, 960), (37, 19), (1536, 33)])
def test_linear_matches_reference(isa, rows, K, N):
    g = torch.Generator().manual_seed(rows * 1000 + K)
    x, w = torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    mod.set_isa(isa)
    try:
        _check(mod.linear(x, w), x, w, None)
        _check(mod.linear(x, w, b), x, w, b)
        # unaligned and non-contiguous activations: a sliced view and a transposed copy's view
        xs = torch.randn(rows, K + 3, generator=g)[:, 3:]
        _check(mod.linear(xs, w), xs, w, None)
        x3 = x.view(1, rows, K)
        assert mod.linear(x3, w).shape == (1, rows, N)
    finally:
        mod.set_isa("auto")


def test_few_rows_path_is_really_taken_and_can_be_switched_off():
    """The kernel's own summation order differs from MKL's in the last bits: with it switched off (max rows 0) the
    result is F.linear's exactly, with it on (3..16 rows) it is not bit-identical on a long reduction."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 1536, generator=g), torch.randn(256, 1536, generator=g)
    ref = torch.nn.functional.linear(x, w)
    on = mod.linear(x, w)
    old = mod.max_rows()
    try:
        mod.set_max_rows(0)
        assert torch.equal(mod.linear(x, w), ref)
    finally:
        mod.set_max_rows(old)
    assert not torch.equal(on, ref)
    assert torch.equal(mod.linear(x[:1], w), torch.nn.functional.linear(x[:1], w))  # one row: MKL, unchanged


def test_unknown_or_unsupported_isa_is_refused():
    with pytest.raises(ValueError, match="unknown instruction set"):
        mod.set_isa("sse9")
    assert mod.isa() in ("scalar", "avx2", "avx512", "avx512vnni")


def test_other_dtypes_fall_back_to_aten():
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    assert torch.equal(mod.linear(x, w), torch.nn.functional.linear(x, w))
