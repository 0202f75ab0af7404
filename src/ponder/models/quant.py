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
_BY_BYTES = {b: n for n, b in BYTES.items()}
TYPES = tuple(BYTES)  # the types with a kernel, by GGUF name


def is_quantised(t: object) -> bool:
    """True for a tensor in this module's block layout."""
    return (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 3
            and int(t.shape[2]) in _BY_BYTES)


def qtype(t: torch.Tensor) -> str:
    return _BY_BYTES[int(t.shape[2])]


def logical_shape(t: torch.Tensor) -> tuple[int, int]:
    """(N, K) of the matrix a quantised tensor holds (a float tensor's own shape otherwise)."""
    if is_quantised(t):
        return int(t.shape[0]), int(t.shape[1]) * BLOCK
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


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) values of a quantised tensor (a float tensor is returned as float32)."""
    if not is_quantised(t):
        return t.float()
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
    """float32 rows ``idx`` of a weight in either form (an embedding lookup, a reduced LM head)."""
    return dequantize(t[idx.reshape(-1)]).view(*idx.shape, -1) if is_quantised(t) else t[idx]


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
