// ponder's fused decode steps: the same ATen calls as the Python layer halves in forward.py, in the same order (so
// the same bits), issued from C++. Why: at batch 1 a decode layer half is ~10-20 small tensor calls on a 256-wide
// model, and the Python interpreter's share of each call (argument parsing, view bookkeeping, the dispatcher entry)
// costs as much as the arithmetic. Moving the call sequence below Python removes that share for dense and planned
// layers alike; it does not fuse kernels or change any arithmetic.
#include <torch/extension.h>

#include <cmath>
#include <optional>

using at::Tensor;

// models/llama.py rms_norm: float32 arithmetic, sum / n, conversions only when needed.
static Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  const bool f32 = x.scalar_type() == at::kFloat;
  Tensor xf = f32 ? x : x.to(at::kFloat);
  Tensor r = at::rsqrt((xf * xf).sum(-1, true).div_(x.size(-1)).add_(eps));
  Tensor y = xf * r;
  return (f32 ? y : y.to(x.scalar_type())) * w;
}

// Engine._decode_attn: one new token per row, x (B, D); writes the row's K/V at column `start` and returns x plus the
// attention output. `mask` (B, 1, end) boolean or absent; `end` = start + 1 unless the cache has holes beyond.
Tensor decode_attn(const Tensor& x, const Tensor& ln1, double eps, const Tensor& wqkv,
                   const std::optional<Tensor>& bqkv, const Tensor& wo, const Tensor& cos, const Tensor& sin,
                   const Tensor& ck, const Tensor& cv, int64_t start, int64_t end, const std::optional<Tensor>& mask,
                   int64_t H, int64_t Hk, int64_t hd) {
  const int64_t B = x.size(0);
  const int64_t qdim = H * hd, kvdim = Hk * hd, G = H / Hk;
  Tensor qkv = at::linear(rms_norm(x, ln1, eps), wqkv, bqkv);
  Tensor qk = qkv.slice(1, 0, qdim + kvdim).view({B, H + Hk, hd});
  qk = qk * cos.view({B, 1, hd}) + qk.roll({hd / 2}, {-1}) * sin.view({B, 1, hd});
  ck.select(2, start).copy_(qk.slice(1, H));
  cv.select(2, start).copy_(qkv.slice(1, qdim + kvdim).view({B, Hk, hd}));
  Tensor k = ck.slice(2, 0, end), v = cv.slice(2, 0, end);
  Tensor q = qk.slice(1, 0, H).unsqueeze(2);  // (B, H, 1, hd)
  Tensor s = at::bmm(q.reshape({B * Hk, G, hd}), k.reshape({B * Hk, end, hd}).transpose(1, 2))
                 .mul_(std::pow(static_cast<double>(hd), -0.5));
  if (mask.has_value()) {
    Tensor m = mask->unsqueeze(1).unsqueeze(2);  // (B, 1, 1, 1, end), as _attend broadcasts it
    s = s.view({B, Hk, G, 1, end}).masked_fill_(m.logical_not(), -INFINITY).view({B * Hk, G, end});
  }
  Tensor o = at::bmm(s.softmax(-1), v.reshape({B * Hk, end, hd})).view({B, qdim});
  return x + at::linear(o, wo);
}

// The FFN half with its residual for rows x (N, D): x + down(silu(gate) * up) of the normed rows, gate|up fused.
Tensor ffn(const Tensor& x, const Tensor& ln2, double eps, const Tensor& wgu, const Tensor& wd) {
  auto gu = at::linear(rms_norm(x, ln2, eps), wgu).chunk(2, -1);
  return x + at::linear(at::silu(gu[0]) * gu[1], wd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attn", &decode_attn);
  m.def("ffn", &ffn);
}
