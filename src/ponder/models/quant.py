"""Block-quantised weights kept quantised: llama.cpp's Q8_0, Q4_0 and Q4_1, in a layout ponder's kernels read.

Why keep them: at batch 1 a decode step reads every weight once, so its floor is weight bytes / memory bandwidth. A
Q4_1 matrix is 0.625 bytes per value against float32's 4, and the user's alternative (llama.cpp on the same file)
runs it that way.

The layout. A quantised (N, K) matrix is a ``uint8`` tensor of shape (N, K // 32, B), B being the type's bytes per
32-value block (Q8_0 34, Q4_0 18, Q4_1 20). The shape alone names the type and K, so the tensor goes through
``torch.cat``, row slicing, row permutation and the C++ extension like any other. Within a row the bytes are planar:
first the quants of every block (Q8_0: K int8; Q4: 16 bytes per block, byte j holding value j in its low nibble and
value j + 16 in its high nibble, as GGUF stores them), then every block's float16 scale d, then (Q4_1) every block's
float16 minimum m. These are the file's bits, rearranged so a kernel loads a row's quants as one stream.

Values: Q8_0 d * q (q int8); Q4_0 d * (q - 8); Q4_1 d * q + m (q in 0..15): the gguf package's reference
dequantiser's arithmetic in the same float32 order, so ``dequantize`` gives its bits (``tests/test_quant.py``).

Nothing here decides anything; the kernels live in ``engine/kernels.cpp``.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf.quants import quantize as _gguf_quantize

from ..errors import PonderError

BLOCK = 32
BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # bytes per 32-value block
ROWS = 8  # rows per group of the interleaved layout
_BY_BYTES = {b: n for n, b in BYTES.items()}
_BY_GROUP_BYTES = {ROWS * b: n for n, b in BYTES.items()}
TYPES = tuple(BYTES)  # the types with a kernel, by GGUF name


def is_quantised(t: object) -> bool:
    """True for a tensor in either of this module's block layouts (planar rows, or interleaved row groups)."""
    return (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 3
            and (int(t.shape[2]) in _BY_BYTES or int(t.shape[2]) in _BY_GROUP_BYTES))


def is_interleaved(t: torch.Tensor) -> bool:
    return is_quantised(t) and int(t.shape[2]) in _BY_GROUP_BYTES


def qtype(t: torch.Tensor) -> str:
    b = int(t.shape[2])
    return _BY_BYTES[b] if b in _BY_BYTES else _BY_GROUP_BYTES[b]


def logical_shape(t: torch.Tensor) -> tuple[int, int]:
    """(N, K) of the matrix a quantised tensor holds (a float tensor's own shape otherwise)."""
    if is_quantised(t):
        return int(t.shape[0]) * (ROWS if is_interleaved(t) else 1), int(t.shape[1]) * BLOCK
    return int(t.shape[0]), int(t.shape[1])


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A quantised tensor's planar parts: quants (N, nb, 32 or 16) uint8, d (N, nb) float32, m (N, nb) or None."""
    N, nb, B = t.shape
    name = qtype(t)
    qb = 32 if name == "Q8_0" else 16
    flat = t.reshape(N, nb * B)
    qs = flat[:, : nb * qb].reshape(N, nb, qb)
    rest = flat[:, nb * qb:].contiguous()
    d = rest[:, : 2 * nb].contiguous().view(torch.float16).float()
    m = rest[:, 2 * nb:].contiguous().view(torch.float16).float() if name == "Q4_1" else None
    return qs, d, m


def interleave(t: torch.Tensor) -> torch.Tensor:
    """Planar rows -> interleaved groups of 8 rows, the layout of the kernels' row-group route: per group and block,
    the quants of 8 rows arranged so that one 32-byte load holds 4 consecutive values of each of the 8 rows (Q8_0:
    8 such chunks; Q4: 4 chunks, each byte holding value c*4+i in its low nibble and 16+c*4+i in its high one),
    then the 8 rows' f16 scales, then (Q4_1) their minimums. Why: one integer dot instruction then advances 8 output
    rows at once against 4 broadcast activations, instead of one row whose 8 partial sums must be added up; a few
    activation rows reuse each unpacked weight chunk. Shape (N/8, nb, 8 B); N must be a multiple of 8."""
    N, nb, B = t.shape
    if N % ROWS:
        raise ValueError(f"interleave needs a multiple of {ROWS} rows, got {N}")
    name = qtype(t)
    qs, _, _ = _split(t)  # (N, nb, 32 | 16)
    flat = t.reshape(N, nb * B)
    qb = qs.shape[-1]
    d = flat[:, nb * qb: nb * qb + 2 * nb].reshape(N // ROWS, ROWS, nb, 2).permute(0, 2, 1, 3)
    G = N // ROWS
    if name == "Q8_0":
        q = qs.reshape(G, ROWS, nb, 8, 4).permute(0, 2, 3, 1, 4)  # (G, nb, chunk, row, 4)
    else:
        vals = torch.cat((qs & 0x0F, qs >> 4), -1)  # (N, nb, 32) values 0..31
        lo = vals[..., :16].reshape(G, ROWS, nb, 4, 4)
        hi = vals[..., 16:].reshape(G, ROWS, nb, 4, 4)
        q = (lo | (hi << 4)).permute(0, 2, 3, 1, 4)  # (G, nb, chunk, row, 4)
    parts = [q.reshape(G, nb, -1), d.reshape(G, nb, -1)]
    if name == "Q4_1":
        m = flat[:, nb * qb + 2 * nb:].reshape(G, ROWS, nb, 2).permute(0, 2, 1, 3)
        parts.append(m.reshape(G, nb, -1))
    return torch.cat(parts, -1).contiguous()


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``interleave`` (a planar tensor is returned as it is)."""
    if not is_interleaved(t):
        return t
    G, nb, GB = t.shape
    name = qtype(t)
    nq = 256 if name == "Q8_0" else 128
    q = t[..., :nq]
    if name == "Q8_0":
        qs = q.reshape(G, nb, 8, ROWS, 4).permute(0, 3, 1, 2, 4).reshape(G * ROWS, nb, 32)
    else:
        c = q.reshape(G, nb, 4, ROWS, 4).permute(0, 3, 1, 2, 4).reshape(G * ROWS, nb, 16)
        lo, hi = c & 0x0F, c >> 4  # values 0..15 and 16..31
        qs = lo | (hi << 4)  # planar: byte j holds value j (low) and j + 16 (high)
    d = t[..., nq:nq + 16].reshape(G, nb, ROWS, 2).permute(0, 2, 1, 3).reshape(G * ROWS, nb * 2)
    parts = [qs.reshape(G * ROWS, -1), d]
    if name == "Q4_1":
        parts.append(t[..., nq + 16:].reshape(G, nb, ROWS, 2).permute(0, 2, 1, 3).reshape(G * ROWS, nb * 2))
    return torch.cat(parts, -1).reshape(G * ROWS, nb, BYTES[name]).contiguous()


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) values of a quantised tensor in either layout (a float tensor is returned as float32)."""
    if not is_quantised(t):
        return t.float()
    t = deinterleave(t)
    N, nb, _ = t.shape
    name = qtype(t)
    qs, d, m = _split(t)
    if name == "Q8_0":
        return (qs.view(torch.int8).float() * d[..., None]).reshape(N, nb * BLOCK)
    q = torch.cat((qs & 0x0F, qs >> 4), -1)  # (N, nb, 32): low nibbles are values 0..15, high nibbles 16..31
    if name == "Q4_0":
        return (d[..., None] * (q.to(torch.int8) - 8).float()).reshape(N, nb * BLOCK)
    return (d[..., None] * q.float() + m[..., None]).reshape(N, nb * BLOCK)


def from_gguf_blocks(raw: np.ndarray, name: str) -> torch.Tensor:
    """GGUF's interleaved blocks (N, row bytes) -> this module's planar layout. GGUF blocks: Q8_0 d|32 q, Q4_0
    d|16 q, Q4_1 d|m|16 q."""
    if name not in BYTES:
        raise PonderError(f"no kernel for quantisation type {name}; kernels exist for {', '.join(TYPES)}")
    B = BYTES[name]
    a = np.ascontiguousarray(raw, dtype=np.uint8)
    N = a.shape[0]
    blocks = a.reshape(N, -1, B)
    nb = blocks.shape[1]
    head = 4 if name == "Q4_1" else 2
    qs = blocks[:, :, head:].reshape(N, -1)
    parts = [qs, blocks[:, :, 0:2].reshape(N, -1)]
    if name == "Q4_1":
        parts.append(blocks[:, :, 2:4].reshape(N, -1))
    return torch.from_numpy(np.concatenate(parts, 1).reshape(N, nb, B).copy())


def to_gguf_blocks(t: torch.Tensor) -> np.ndarray:
    """The inverse of ``from_gguf_blocks``: (N, row bytes) uint8 in GGUF's block order."""
    N, nb, B = t.shape
    qs, _, _ = _split(t)
    flat = t.reshape(N, nb * B).numpy()
    qb = qs.shape[-1]
    d = flat[:, nb * qb: nb * qb + 2 * nb].reshape(N, nb, 2)
    parts = [d]
    if qtype(t) == "Q4_1":
        parts.append(flat[:, nb * qb + 2 * nb:].reshape(N, nb, 2))
    parts.append(qs.numpy())
    return np.concatenate(parts, -1).reshape(N, nb * B)


def quantize(w: torch.Tensor, name: str) -> torch.Tensor:
    """A float (N, K) matrix in a quantised type, with the gguf package's reference quantiser (llama.cpp's
    rounding). K must be a multiple of 32: a block never straddles two rows."""
    name = name.upper()
    if name not in BYTES:
        raise PonderError(f"--quantize {name.lower()} is not supported; choose one of "
                          f"{', '.join(n.lower() for n in TYPES)}")
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise PonderError(f"cannot quantise a {tuple(w.shape)} matrix to {name}: its rows ({w.shape[-1]} values) "
                          f"are not a multiple of the {BLOCK}-value block; run it with --weights float32")
    raw = _gguf_quantize(w.detach().float().contiguous().numpy(), gguf.GGMLQuantizationType[name])
    return from_gguf_blocks(raw, name)


def rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float32 rows ``idx`` of a weight in any form (an embedding lookup, a reduced LM head); an interleaved
    tensor unpacks only the row groups that hold them."""
    if not is_quantised(t):
        return t[idx]
    flat = idx.reshape(-1)
    if is_interleaved(t):
        groups, inv = torch.unique(flat // ROWS, return_inverse=True)
        vals = dequantize(t[groups]).view(len(groups), ROWS, -1)
        return vals[inv, flat % ROWS].view(*idx.shape, -1)
    return dequantize(t[flat]).view(*idx.shape, -1)


def embedding(ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return rows(t, ids) if is_quantised(t) else F.embedding(ids, t)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The Python reference product for either form: a quantised weight is dequantised, then multiplied in float32
    (exact weights, float activations: what the kernels approximate)."""
    if is_quantised(w):
        return F.linear(x, dequantize(w).to(x.dtype), b)
    return F.linear(x, w, b)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels do to the activations before an integer dot product, as llama.cpp does: per row and per
    32-value block, d = max|x| / 127 and q = round-half-even(x / d) in int8. Returns q (M, K) int8 and d (M, K/32).
    The kernels compute these very values (same float32 operations), so the tests can hold their integer part
    exactly to this."""
    M, K = x.shape
    xb = x.float().reshape(M, K // BLOCK, BLOCK)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(xb * inv[..., None]).to(torch.int8)
    return q.reshape(M, K), d


def linear_q8_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels' arithmetic in float64: quantised activations times the exact weight values. The kernels differ
    from this only by float32 summation order."""
    q, d = quantize_activations(x.reshape(-1, x.shape[-1]))
    xd = (q.double().view(q.shape[0], -1, BLOCK) * d.double()[..., None]).reshape(q.shape)
    y = xd @ dequantize(w).double().T
    if b is not None:
        y = y + b.double()
    return y.view(*x.shape[:-1], -1)


def quantize_state(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A float checkpoint's matrices in a quantised type (``--quantize``): every layer matrix in ``name``; the
    embedding (and an untied LM head) in Q8_0 when ``name`` is a 4-bit type, as the shipped SmolLM2 file stores its
    tied embedding, because the head's rounding reaches every logit. Norms and biases stay float. Refused, naming
    the tensor, when a matrix's rows are not a multiple of the 32-value block."""
    name = name.upper()
    if name not in BYTES:
        raise PonderError(f"--quantize {name.lower()} is not supported; choose one of "
                          f"{', '.join(n.lower() for n in TYPES)}")
    out = {}
    for k, v in weights.items():
        if v.dim() != 2 or is_quantised(v):
            out[k] = v
            continue
        if v.shape[1] % BLOCK:
            raise PonderError(f"cannot --quantize {name.lower()}: {k} has rows of {v.shape[1]} values, not a "
                              f"multiple of the {BLOCK}-value block; run this model with --weights float32")
        top = k in ("model.embed_tokens.weight", "lm_head.weight")
        out[k] = quantize(v, "Q8_0" if top and name != "Q8_0" else name)
    return out


def describe(weights: dict[str, torch.Tensor]) -> str:
    """The weight form in a few words, for every measurement's environment: e.g. "Q4_1 (layers), Q8_0 (embedding),
    float32 (norms)"."""
    forms: dict[str, list[str]] = {}
    for k, v in weights.items():
        form = qtype(v) if is_quantised(v) else str(v.dtype).removeprefix("torch.")
        part = ("embedding" if "embed_tokens" in k else "head" if k.startswith("lm_head") else
                "layers" if v.dim() >= 2 else "norms")
        forms.setdefault(form, [])
        if part not in forms[form]:
            forms[form].append(part)
    return ", ".join(f"{f} ({'+'.join(p)})" for f, p in forms.items())
