"""Block-quantised weights (models/quant.py) and their kernels (engine/kernels.cpp qlinear).

Oracles: the gguf package's reference quantiser and dequantiser for the values; for the kernels, the float64 product
of the very int8 activations they make (``quant.linear_q8_reference``) and, for the accuracy claim, the float product.

Tolerances, derived. (1) Kernel against its own arithmetic in float64: each block's integer dot is exact (|dot| <=
32 * 128 * 127 < 2^24, so also exact as float32); per block the kernel rounds d_w * d_x, the product with the dot and
the accumulation, and the offset term (Q4) the same way, so with u = 2^-24 and nb blocks
|y - y64| <= (nb + 8) u sum_b (|d_w d_x| sum_k |q_k x_k| + |e_b c_b|), the magnitude of the terms before any
cancellation (the lanes hold partial dots of a block, which cancel only when they are summed).
(2) Against the float product: each activation is off by at most d_x / 2 (round to nearest), so
|y - x W^T| <= sum_b (d_x,b / 2) sum_{k in b} |w_k| plus (1).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from conftest import available_isas
from ponder.engine import fused
from ponder.errors import PonderError
from ponder.models import quant

mod = fused.load()
needs_kernels = pytest.mark.skipif(mod is None, reason="the compiled kernels are not available here")
U = 2.0 ** -24


def _isas() -> list[str]:
    return available_isas(mod)


def _weights(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[0, :5] = 0.0  # an all-zero-ish block start, and a constant block: d = 0 edge cases
    if K >= 64:
        w[-1, 32:64] = 0.0
    return w


@pytest.mark.parametrize("name", quant.TYPES)
def test_dequantize_is_the_reference_dequantiser_bit_for_bit(name):
    w = _weights(37, 96, 1).numpy()
    raw = gguf_quantize(w, gguf.GGMLQuantizationType[name])
    ref = gguf_dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(w.shape)
    q = quant.from_gguf_blocks(raw, name)
    assert q.shape == (37, 3, quant.BYTES[name]) and quant.qtype(q) == name
    assert quant.logical_shape(q) == (37, 96)
    assert np.array_equal(quant.dequantize(q).numpy(), ref)  # same float32 bits
    assert np.array_equal(quant.to_gguf_blocks(q), raw)  # the layout change loses nothing
    assert torch.equal(quant.quantize(torch.from_numpy(w), name), q)


def test_rows_and_embedding_dequantise_only_what_is_asked():
    w = _weights(50, 64, 2)
    q = quant.quantize(w, "Q8_0")
    ids = torch.tensor([[3, 7], [49, 0]])
    assert torch.equal(quant.embedding(ids, q), quant.dequantize(q)[ids])
    assert torch.equal(quant.rows(q, ids[0]), quant.dequantize(q)[ids[0]])


def test_quantize_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(PonderError, match="multiple of the 32-value block"):
        quant.quantize(torch.randn(4, 40), "Q8_0")
    with pytest.raises(PonderError, match="not supported"):
        quant.quantize(torch.randn(4, 64), "Q5_K")
    with pytest.raises(PonderError, match="model.layers.0.mlp.down_proj.weight has rows of 40"):
        quant.quantize_state({"model.layers.0.mlp.down_proj.weight": torch.randn(8, 40)}, "q4_0")


def _magnitude(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_b |d_w d_x| sum_k |q_k x_k| + |e_b c_b| per output, in float64 (tolerance (1) of the module docstring)."""
    xq, dx = quant.quantize_activations(x)
    M, K = x.shape
    nb = K // quant.BLOCK
    qs, d, m = quant._split(q)
    name = quant.qtype(q)
    if name == "Q8_0":
        wq = qs.view(torch.int8).double()
    else:
        wq = torch.cat((qs & 0x0F, qs >> 4), -1).double()
    # |products| summed, not |dot|: the kernel's lanes hold partial dots, which may cancel only in the final sum
    dots = torch.einsum("mbk,nbk->mnb", xq.double().abs().view(M, nb, 32), wq.abs())
    mag = (dots * d.double()[None] * dx.double()[:, None]).abs().sum(-1)
    if name != "Q8_0":
        sx = xq.double().view(M, nb, 32).sum(-1)
        e, c = (d, -8 * dx.double() * sx) if name == "Q4_0" else (m, dx.double() * sx)
        mag = mag + (e.double()[None] * c[:, None]).abs().sum(-1)
    return mag


@pytest.mark.parametrize("name", quant.TYPES)
def test_interleaved_layout_is_the_same_bits(name):
    q = quant.quantize(_weights(24, 96, 3), name)
    g = quant.interleave(q)
    assert quant.is_interleaved(g) and g.shape == (3, 3, 8 * quant.BYTES[name]) and quant.qtype(g) == name
    assert quant.logical_shape(g) == (24, 96) and quant.nbytes(g) == quant.nbytes(q)
    assert torch.equal(quant.deinterleave(g), q) and torch.equal(quant.dequantize(g), quant.dequantize(q))
    ids = torch.tensor([[3, 17], [23, 3]])
    assert torch.equal(quant.rows(g, ids), quant.rows(q, ids))
    with pytest.raises(ValueError, match="multiple of 8"):
        quant.interleave(q[:7])


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("name", quant.TYPES)
@pytest.mark.parametrize("rows", [1, 2, 8, 9, 64])
@pytest.mark.parametrize("K,N,layout", [(32, 1, "planar"), (96, 33, "planar"), (576, 64, "planar"),
                                        (1536, 17, "planar"), (32, 8, "grouped"), (96, 40, "grouped"),
                                        (1536, 64, "grouped")])
def test_kernel_matches_its_arithmetic(isa, name, rows, K, N, layout):
    q = quant.quantize(_weights(N, K, K + N), name)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, K + 1, generator=g)[:, 1:]  # an unaligned, non-contiguous view
    b = torch.randn(N, generator=g)
    w = quant.interleave(q) if layout == "grouped" else q
    mod.set_isa(isa)
    try:
        y = mod.qlinear(x, w)
        yb = mod.linear(x.reshape(1, rows, K), w, b)  # through the general entry, 3-D, with a bias
    finally:
        mod.set_isa("auto")
    ref = quant.linear_q8_reference(x, q)
    bound = (K // 32 + 8) * U * _magnitude(x.contiguous(), q) + 1e-30
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    assert ((y.double() - ref).abs() <= bound).all()
    assert yb.shape == (1, rows, N)
    assert ((yb[0].double() - ref - b.double()).abs() <= bound + 2 * U * (ref.abs() + b.double().abs())).all()


@needs_kernels
@pytest.mark.parametrize("name", quant.TYPES)
def test_kernel_error_against_float_is_within_the_activation_rounding(name):
    K, N = 576, 96
    w = _weights(N, K, 5)
    q = quant.quantize(w, name)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(6))
    wf = quant.dequantize(q).double()
    exact = x.double() @ wf.T
    _, dx = quant.quantize_activations(x)
    wabs = wf.abs().view(N, K // 32, 32).sum(-1)  # (N, nb)
    bound = (dx.double() / 2) @ wabs.T + (K // 32 + 8) * U * _magnitude(x, q) + 1e-30
    err = (mod.qlinear(x, q).double() - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 0  # the activations really are rounded: the bound is not vacuous
    # and the rows do not depend on each other: a row alone gives the same bits as inside a batch of four
    assert torch.equal(mod.qlinear(x[2:3], q), mod.qlinear(x, q)[2:3])


@needs_kernels
@pytest.mark.parametrize("layout", ["planar", "grouped"])
def test_every_isa_gives_the_same_integers(layout):
    """The instruction sets differ only in float summation order: their results agree to the derived bound, and
    the forced set is the one reported."""
    got = {}
    q = quant.quantize(_weights(40, 192, 9), "Q4_1")
    w = quant.interleave(q) if layout == "grouped" else q
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(2))
    for isa in _isas():
        mod.set_isa(isa)
        assert mod.isa() == isa
        got[isa] = mod.qlinear(x, w)
    mod.set_isa("auto")
    bound = (192 // 32 + 8) * U * _magnitude(x, q) * 2
    for v in got.values():
        assert ((v.double() - got["scalar"].double()).abs() <= bound + 1e-30).all()


@needs_kernels
def test_kernel_refuses_mismatched_shapes():
    q = quant.quantize(_weights(8, 64, 1), "Q8_0")
    with pytest.raises(RuntimeError, match="64"):
        mod.qlinear(torch.randn(2, 96), q)
