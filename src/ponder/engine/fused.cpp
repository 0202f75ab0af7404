// ponder's fused decode steps: the reference layer halves of engine/steps.py issued from C++, with the same bits. Why: at
// batch 1 a decode layer half is ~10-20 small tensor calls on a 256-wide model, and the interpreter's share of each
// call (argument parsing, view bookkeeping, the dispatcher entry) costs as much as the arithmetic. Matmuls, sums and
// softmax stay ATen calls. For float32 the purely elementwise parts (the tail of rms_norm, rotary embedding, cache
// writes) are plain loops doing the same IEEE operations in the same order, which is why this file is compiled with
// -ffp-contract=off: a fused multiply-add would round once where ATen rounds twice. Other dtypes take the ATen calls.
#include <torch/extension.h>

#include "kernels.h"

#include <cmath>
#include <optional>
#include <vector>

using at::Tensor;

static bool plain_f32(const Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); }

// models/llama.py rms_norm: float32 arithmetic, sum / n, conversions only when needed.
static Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  const bool f32 = x.scalar_type() == at::kFloat;
  if (f32 && x.is_contiguous() && plain_f32(w) && w.dim() == 1) {
    // ATen's sum (its reduction order), then rsqrt(s / n + eps) and (x * r) * w elementwise, rounding as ATen does.
    Tensor ss = (x * x).sum(-1, true);
    Tensor out = at::empty_like(x);
    const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
    const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>(), *ps = ss.data_ptr<float>();
    float* po = out.data_ptr<float>();
    const float fd = static_cast<float>(D), fe = static_cast<float>(eps);
    for (int64_t r = 0; r < rows; ++r) {
      float m = ps[r] / fd;
      m = m + fe;
      const float inv = 1.0f / std::sqrt(m);
      const float* xr = px + r * D;
      float* orow = po + r * D;
      for (int64_t j = 0; j < D; ++j) orow[j] = (xr[j] * inv) * pw[j];
    }
    return out;
  }
  Tensor xf = f32 ? x : x.to(at::kFloat);
  Tensor r = at::rsqrt((xf * xf).sum(-1, true).div_(x.size(-1)).add_(eps));
  Tensor y = xf * r;
  return (f32 ? y : y.to(x.scalar_type())) * w;
}

// apply_rope for one token per row, float32: src (n, heads, hd) with unit inner stride, cos/sin (n, 1, hd) contiguous;
// heads [0, split) go to `a` (n, split, hd) contiguous and heads [split, heads) to `b`, a cache column viewed as
// (n, heads - split, hd) with any strides: x * cos + roll(x, hd / 2) * sin, element by element.
static void rope_into(const Tensor& src, const Tensor& cos, const Tensor& sin, int64_t split, const Tensor& a,
                      const Tensor& b) {
  const int64_t n = src.size(0), heads = src.size(1), hd = src.size(2), half = hd / 2;
  const float *ps = src.data_ptr<float>(), *pc = cos.data_ptr<float>(), *pn = sin.data_ptr<float>();
  float *pa = split ? a.data_ptr<float>() : nullptr, *pb = b.data_ptr<float>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1), b0 = b.stride(0), b1 = b.stride(1);
  TORCH_CHECK(b.stride(2) == 1, "rope_into: the cache column must have unit inner stride");
  for (int64_t r = 0; r < n; ++r) {
    const float *c = pc + r * hd, *sn = pn + r * hd;
    for (int64_t h = 0; h < heads; ++h) {
      const float* x = ps + r * s0 + h * s1;
      float* o = h < split ? pa + (r * split + h) * hd : pb + r * b0 + (h - split) * b1;
      for (int64_t j = 0; j < half; ++j) {
        const float u = x[j] * c[j];
        const float v = x[j + half] * sn[j];
        o[j] = u + v;
      }
      for (int64_t j = half; j < hd; ++j) {
        const float u = x[j] * c[j];
        const float v = x[j - half] * sn[j];
        o[j] = u + v;
      }
    }
  }
}

static bool rope_fast(const Tensor& qkv, const Tensor& cos, const Tensor& sin, const Tensor& cache) {
  return qkv.scalar_type() == at::kFloat && qkv.stride(-1) == 1 && plain_f32(cos) && plain_f32(sin) &&
         cache.scalar_type() == at::kFloat && cache.stride(-1) == 1 && cos.size(-1) % 2 == 0;
}

// models/llama.py apply_rope with ATen calls (any dtype, any shape): x * cos + roll(x, hd / 2) * sin.
static Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  return x * cos + x.roll({x.size(-1) / 2}, {-1}) * sin;
}

// Rotates one token per row, src (n, heads, hd): heads [0, split) are returned as (n, split, hd), heads
// [split, heads) are written into the cache column `col` (n, heads - split, hd). Plain loops for float32.
static Tensor rope_split(const Tensor& src, const Tensor& cos, const Tensor& sin, int64_t split, const Tensor& col) {
  const int64_t n = src.size(0), hd = src.size(2);
  if (rope_fast(src, cos, sin, col)) {
    Tensor a = at::empty({n, split, hd}, src.options());
    rope_into(src, cos, sin, split, a, col);
    return a;
  }
  Tensor r = rope(src, cos.view({n, 1, hd}), sin.view({n, 1, hd}));
  col.copy_(r.slice(1, split));
  return r.slice(1, 0, split);
}

// steps.attend: q (B, H, Tq, hd) against k, v (B, Hk, Tk, hd); mask (B, Tq, Tk) boolean or absent. Up to
// `small_tq` queries with a mask, or one query, as two batched matmuls; otherwise SDPA.
static Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask0,
                     bool is_causal, int64_t small_tq) {
  std::optional<Tensor> mask;
  if (mask0.has_value()) mask = mask0->unsqueeze(1);  // (B, 1, Tq, Tk)
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), hd = q.size(3);
  const int64_t Hk = k.size(1), Tk = k.size(2), G = H / Hk;
  if (Tq == 1 || (mask.has_value() && Tq <= small_tq)) {
    Tensor s = at::bmm(q.reshape({B * Hk, G * Tq, hd}), k.reshape({B * Hk, Tk, hd}).transpose(1, 2))
                   .mul_(std::pow(static_cast<double>(hd), -0.5));
    if (mask.has_value())
      s = s.view({B, Hk, G, Tq, Tk}).masked_fill_(mask->unsqueeze(2).logical_not(), -INFINITY)
              .view({B * Hk, G * Tq, Tk});
    return at::bmm(s.softmax(-1), v.reshape({B * Hk, Tk, hd})).view({B, H, Tq, hd});
  }
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal && !mask.has_value(), std::nullopt,
                                          H != Hk);
}

// PythonSteps.attn for one new token per row, x (B, D); writes the row's K/V at column `start` and returns x plus the
// attention output. `mask` (B, 1, end) boolean or absent; `end` = start + 1 unless the cache has holes beyond.
Tensor decode_attn(const Tensor& x, const Tensor& ln1, double eps, const Tensor& wqkv,
                   const std::optional<Tensor>& bqkv, const Tensor& wo, const Tensor& cos, const Tensor& sin,
                   const Tensor& ck, const Tensor& cv, int64_t start, int64_t end, const std::optional<Tensor>& mask,
                   int64_t H, int64_t Hk, int64_t hd) {
  const int64_t B = x.size(0), qdim = H * hd, kvdim = Hk * hd;
  Tensor qkv = ponder::linear(rms_norm(x, ln1, eps), wqkv, bqkv);
  Tensor q = rope_split(qkv.slice(1, 0, qdim + kvdim).view({B, H + Hk, hd}), cos, sin, H, ck.select(2, start));
  cv.select(2, start).copy_(qkv.slice(1, qdim + kvdim).view({B, Hk, hd}));
  Tensor o = attend(q.unsqueeze(2), ck.slice(2, 0, end), cv.slice(2, 0, end), mask, false, 1).view({B, qdim});
  return x + ponder::linear(o, wo);
}

// PythonSteps.attn for T new tokens per row, x (B, T, D) (prefill, scoring, speculative verification): writes
// columns [start, end) and returns x plus the attention output.
Tensor attn_rows(const Tensor& x, const Tensor& ln1, double eps, const Tensor& wqkv, const std::optional<Tensor>& bqkv,
                 const Tensor& wo, const Tensor& cos, const Tensor& sin, const Tensor& ck, const Tensor& cv,
                 int64_t start, int64_t end, const std::optional<Tensor>& mask, bool is_causal, int64_t H,
                 int64_t Hk, int64_t hd, int64_t small_tq) {
  const int64_t B = x.size(0), T = x.size(1), qdim = H * hd, kvdim = Hk * hd;
  Tensor qkv = ponder::linear(rms_norm(x, ln1, eps), wqkv, bqkv);
  Tensor qk = qkv.slice(2, 0, qdim + kvdim).view({B, T, H + Hk, hd});
  qk = rope(qk, cos, sin);
  auto qks = qk.split({H, Hk}, 2);
  ck.slice(2, start, end).copy_(qks[1].transpose(1, 2));
  cv.slice(2, start, end).copy_(qkv.slice(2, qdim + kvdim).reshape({B, T, Hk, hd}).transpose(1, 2));
  Tensor o = attend(qks[0].transpose(1, 2), ck.slice(2, 0, end), cv.slice(2, 0, end), mask, is_causal, small_tq);
  return x + ponder::linear(o.transpose(1, 2).reshape({B, T, qdim}), wo);
}

// PythonSteps.kv (steps.row_kv plus the cache write) for one new token per row (a row that skips the layer but
// leaves K/V, plan kv="compute"): writes column `start` and returns the normed rows (the attending rows reuse them).
Tensor decode_kv(const Tensor& x, const Tensor& ln1, double eps, const Tensor& wkv, const std::optional<Tensor>& bkv,
                 const std::optional<Tensor>& k_norm, const Tensor& cos, const Tensor& sin, const Tensor& ck,
                 const Tensor& cv, int64_t start, int64_t Hk, int64_t hd) {
  const int64_t n = x.size(0), kvdim = Hk * hd;
  Tensor h = rms_norm(x, ln1, eps);
  auto kv = ponder::linear(h, wkv, bkv).split({kvdim, kvdim}, -1);
  Tensor k = kv[0].view({n, Hk, hd});
  if (k_norm.has_value()) k = rms_norm(k, *k_norm, eps);
  rope_split(k, cos, sin, 0, ck.select(2, start));
  cv.select(2, start).copy_(kv[1].reshape({n, Hk, hd}));
  return h;
}

// The FFN half with its residual for rows x (N, D): x + down(silu(gate) * up) of the normed rows, gate|up fused.
Tensor ffn(const Tensor& x, const Tensor& ln2, double eps, const Tensor& wgu, const Tensor& wd) {
  auto gu = ponder::linear(rms_norm(x, ln2, eps), wgu).chunk(2, -1);
  return x + ponder::linear(at::silu(gu[0]) * gu[1], wd);
}

Tensor packed_qk(const Tensor& q, const Tensor& kq, const Tensor& ks, const Tensor& kz, int64_t bits, int64_t group,
                 bool fast);
Tensor packed_pv(const Tensor& p, const Tensor& vq, const Tensor& vs, const Tensor& vz, int64_t bits, int64_t group,
                 bool fast);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_qk", &packed_qk, "scores of float32 queries against packed low-precision keys (engine/packed.cpp)",
        pybind11::arg("q"), pybind11::arg("kq"), pybind11::arg("ks"), pybind11::arg("kz"), pybind11::arg("bits"),
        pybind11::arg("group"), pybind11::arg("fast") = true);
  m.def("packed_pv", &packed_pv, "probabilities times packed low-precision values (engine/packed.cpp)",
        pybind11::arg("p"), pybind11::arg("vq"), pybind11::arg("vs"), pybind11::arg("vz"), pybind11::arg("bits"),
        pybind11::arg("group"), pybind11::arg("fast") = true);
  m.def("decode_attn", &decode_attn);
  m.def("ffn", &ffn);
  m.def("decode_kv", &decode_kv);
  m.def("attn_rows", &attn_rows);
  m.def("linear", &ponder::linear, "x W^T (+ b): the few-rows kernel for 3..max_rows rows, ATen otherwise",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("b") = pybind11::none());
  m.def("qlinear", &ponder::qlinear, "x W^T (+ b) for a block-quantised W (models/quant.py)", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("b") = pybind11::none());
  m.def("set_isa", &ponder::set_isa);
  m.def("isa", &ponder::isa);
  m.def("set_max_rows", &ponder::set_max_rows);
  m.def("max_rows", &ponder::max_rows);
}
