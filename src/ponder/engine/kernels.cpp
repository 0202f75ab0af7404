// Few-row matrix products for float32 weights. Why: verifying k drafted tokens (and decoding a small batch) is a
// product of a few rows with every weight matrix. MKL's sgemm at 2-8 rows costs up to 2.3x its one-row gemv on these
// shapes (SmolLM2's 120 layer matrices, 2 threads: 15.4 ms at 1 row, 27.6 ms at 4, 34.9 ms at 8), although the
// product is bound by reading the weights once, like the gemv. This kernel streams each weight row once and takes
// its dot product with all m rows while it is in registers, so m rows cost about what one does until the arithmetic
// catches up with memory. The CPU's best instruction set is chosen at run time (AVX-512, AVX2+FMA, or plain loops);
// tests force each one against the reference product.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <c10/util/Half.h>
#include <cmath>
#include <vector>
#include <stdexcept>

namespace ponder {
namespace {

// Ordered: each level has everything below it. avx512vnni adds the byte dot product the quantised kernels use (the
// float32 kernel runs the same AVX-512 code at both AVX-512 levels).
enum Isa { kScalar = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Vnni = 4 };

int detect() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("avx512dq"))
    return kAvx512Vnni;
  if (avx2 && __builtin_cpu_supports("avx512f")) return kAvx512;
  if (avx2) return kAvx2;
  return kScalar;
}

std::atomic<int> g_isa{0};  // 0: not chosen yet
std::atomic<int64_t> g_max_rows{16};

int current() {
  int v = g_isa.load();
  if (v == 0) {
    v = detect();
    g_isa.store(v);
  }
  return v;
}

// y[j, n] = sum_k x[j, k] * w[n, k] for rows j < M, outputs n in [n0, n1). (Two weight rows per pass measured
// slower here: 23.9 vs 22.2 ms at 4 rows, 34.4 vs 28.1 at 8, over SmolLM2's 120 matrices.)
template <int M>
__attribute__((target("avx512f"))) void rows_avx512(const float* x, const float* w, float* y, int64_t K, int64_t N,
                                                     int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    __m512 acc[M];
    for (int j = 0; j < M; ++j) acc[j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 wv = _mm512_loadu_ps(wr + k);
      for (int j = 0; j < M; ++j) acc[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + j * K + k), acc[j]);
    }
    for (int j = 0; j < M; ++j) {
      float s = _mm512_reduce_add_ps(acc[j]);
      for (int64_t t = k; t < K; ++t) s += wr[t] * x[j * K + t];
      y[j * N + n] = s;
    }
  }
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int M>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, const float* w, float* y, int64_t K, int64_t N,
                                                    int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    __m256 acc[M];
    for (int j = 0; j < M; ++j) acc[j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = _mm256_loadu_ps(wr + k);
      for (int j = 0; j < M; ++j) acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * K + k), acc[j]);
    }
    for (int j = 0; j < M; ++j) {
      float s = hsum256(acc[j]);
      for (int64_t t = k; t < K; ++t) s += wr[t] * x[j * K + t];
      y[j * N + n] = s;
    }
  }
}

template <int M>
void rows_scalar(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int j = 0; j < M; ++j) {
      float s = 0.f;
      for (int64_t t = 0; t < K; ++t) s += wr[t] * x[j * K + t];
      y[j * N + n] = s;
    }
  }
}

using RowsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

template <int M>
RowsFn pick_m(int isa) {
  if (isa >= kAvx512) return &rows_avx512<M>;
  if (isa == kAvx2) return &rows_avx2<M>;
  return &rows_scalar<M>;
}

// The widest chunk of rows one pass takes: AVX2 has 16 registers, so 8 accumulators plus the weight vector.
int chunk_rows(int isa) { return isa >= kAvx512 ? 16 : 8; }

RowsFn pick(int m, int isa) {
  switch (m) {
    case 1: return pick_m<1>(isa);
    case 2: return pick_m<2>(isa);
    case 3: return pick_m<3>(isa);
    case 4: return pick_m<4>(isa);
    case 5: return pick_m<5>(isa);
    case 6: return pick_m<6>(isa);
    case 7: return pick_m<7>(isa);
    case 8: return pick_m<8>(isa);
    case 9: return pick_m<9>(isa);
    case 10: return pick_m<10>(isa);
    case 11: return pick_m<11>(isa);
    case 12: return pick_m<12>(isa);
    case 13: return pick_m<13>(isa);
    case 14: return pick_m<14>(isa);
    case 15: return pick_m<15>(isa);
    default: return pick_m<16>(isa);
  }
}

// x (M, K) contiguous float32, w (N, K) contiguous float32 -> y (M, N).
void few_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  const int isa = current();
  const int64_t step = chunk_rows(isa);
  // Enough outputs per task that the pool's hand-off is noise, few enough that both cores get work.
  const int64_t grain = std::max<int64_t>(32, N / (4 * std::max(1, at::get_num_threads())));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t j0 = 0; j0 < M; j0 += step) {
      const int64_t m = std::min<int64_t>(step, M - j0);
      pick(static_cast<int>(m), isa)(x + j0 * K, w, y + j0 * N, K, N, n0, n1);
    }
  });
}

// ---- block-quantised weights (layout: models/quant.py) ------------------------------------------------------------
// Why integer dot products: a Q4 weight would need four instructions per eight values to become float32 before a
// multiply; quantising the activations once per call to int8 per 32-value block (llama.cpp's scheme: d = max|x| / 127,
// q = round(x / d)) lets one byte-dot instruction do 32 multiply-adds of a block. What it costs: each activation
// carries an error of at most d / 2, so |y - y_float| <= sum_b (d_b / 2) sum_{k in b} |w_k| per output (the tests
// hold the kernels to that; the perplexity cost is in benchmarks/quant_decode.py).
constexpr int kQK = 32;
constexpr int kQ8_0 = 34, kQ4_0 = 18, kQ4_1 = 20;  // bytes per block, which is how a tensor names its type

struct QActs {
  std::vector<int8_t> q;  // (M, K) quants
  std::vector<float> d;   // (M, K / 32) scales
  std::vector<float> c;   // (M, K / 32) offset factors: Q4_0 -8 d sum(q), Q4_1 d sum(q), Q8_0 unused
  std::vector<float> c8;  // Q8_0 on the 512-bit group route (weights shifted by +128): -128 d sum(q)
};

void quantize_acts(const float* x, int64_t M, int64_t K, int qt, QActs& a) {
  const int64_t nb = K / kQK;
  a.q.resize(M * K);
  a.d.resize(M * nb);
  a.c.resize(M * nb);
  if (qt == kQ8_0) a.c8.resize(M * nb);
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * K + b * kQK;
      float amax = 0.f;
      for (int i = 0; i < kQK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.0f;
      const float inv = d != 0.f ? 1.0f / d : 0.f;
      int sum = 0;
      int8_t* qb = a.q.data() + r * K + b * kQK;
      for (int i = 0; i < kQK; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * inv));  // round half to even, as torch.round
        qb[i] = static_cast<int8_t>(v);
        sum += v;
      }
      a.d[r * nb + b] = d;
      a.c[r * nb + b] = qt == kQ4_0 ? -8.0f * d * static_cast<float>(sum) : d * static_cast<float>(sum);
      if (qt == kQ8_0) a.c8[r * nb + b] = -128.0f * d * static_cast<float>(sum);
    }
  }
}

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// The plain-loop kernel: the reference the vector ones are tested against, and the route on a CPU without AVX2.
void qrows_scalar(const QActs& a, const uint8_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1,
                  int64_t j0, int64_t m, int qt) {
  const int64_t nb = K / kQK, qb = qt == kQ8_0 ? kQK : kQK / 2, rb = nb * qt;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * rb;
    const uint16_t* dw = reinterpret_cast<const uint16_t*>(row + nb * qb);
    for (int64_t j = j0; j < j0 + m; ++j) {
      float sum = 0.f, off = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* xq = a.q.data() + j * K + b * kQK;
        const uint8_t* q = row + b * qb;
        int dot = 0;
        for (int i = 0; i < kQK; ++i) {
          const int wq = qt == kQ8_0 ? static_cast<int8_t>(q[i]) : (i < 16 ? q[i] & 0x0F : q[i - 16] >> 4);
          dot += wq * xq[i];
        }
        sum += static_cast<float>(dot) * (half_to_float(dw[b]) * a.d[j * nb + b]);
        if (qt != kQ8_0) off += half_to_float(qt == kQ4_0 ? dw[b] : dw[nb + b]) * a.c[j * nb + b];
      }
      y[j * N + n] = sum + off;
    }
  }
}

// The same for the interleaved layout (groups of 8 rows; models/quant.py `interleave`).
void groups_scalar(const QActs& a, const uint8_t* w, float* y, int64_t K, int64_t N, int64_t g0, int64_t g1,
                   int64_t j0, int64_t m, int qt) {
  const int64_t nb = K / kQK, gb = 8 * qt, nq = qt == kQ8_0 ? 256 : 128;
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < 8; ++r) {
      for (int64_t j = j0; j < j0 + m; ++j) {
        float sum = 0.f, off = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* blk = w + (g * nb + b) * gb;
          const uint16_t* d = reinterpret_cast<const uint16_t*>(blk + nq);
          const int8_t* xq = a.q.data() + j * K + b * kQK;
          int dot = 0;
          for (int k = 0; k < kQK; ++k) {
            int wq;
            if (qt == kQ8_0) {
              wq = static_cast<int8_t>(blk[(k / 4) * 32 + r * 4 + k % 4]);
            } else {
              const int kk = k % 16;
              const uint8_t byte = blk[(kk / 4) * 32 + r * 4 + kk % 4];
              wq = k < 16 ? byte & 0x0F : byte >> 4;
            }
            dot += wq * xq[k];
          }
          sum += static_cast<float>(dot) * (half_to_float(d[r]) * a.d[j * nb + b]);
          if (qt != kQ8_0) off += half_to_float(qt == kQ4_0 ? d[r] : d[8 + r]) * a.c[j * nb + b];
        }
        y[j * N + g * 8 + r] = sum + off;
      }
    }
  }
}

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define QNS q_avx2
#define PONDER_VNNI 0
#include "qrows.inc"
#undef PONDER_VNNI
#undef QNS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")
#define QNS q_vnni
#define PONDER_VNNI 1
#include "qrows.inc"
#undef PONDER_VNNI
#undef QNS
#pragma GCC pop_options

namespace {

// x (M, K) contiguous float32 against a quantised w of type qt (N rows) -> y (M, N); `grouped`: the interleaved
// layout, whose work units are groups of 8 rows (one unit per row otherwise).
void quant_rows(const float* x, const uint8_t* w, float* y, int64_t M, int64_t K, int64_t N, int qt, bool grouped) {
  const int isa = current();
  QActs a;
  quantize_acts(x, M, K, qt, a);
  const int64_t units = grouped ? N / 8 : N;
  const int64_t grain = std::max<int64_t>(grouped ? 4 : 16, units / (4 * std::max(1, at::get_num_threads())));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t j0 = 0; j0 < M; j0 += 8) {
      const int m = static_cast<int>(std::min<int64_t>(8, M - j0));
      if (isa >= kAvx512Vnni)
        (grouped ? q_vnni::pick_groups(qt, m) : q_vnni::pick(qt, m))(a, w, y + j0 * N, K, N, u0, u1, j0);
      else if (isa >= kAvx2)
        (grouped ? q_avx2::pick_groups(qt, m) : q_avx2::pick(qt, m))(a, w, y + j0 * N, K, N, u0, u1, j0);
      else
        (grouped ? groups_scalar : qrows_scalar)(a, w, y, K, N, u0, u1, j0, m, qt);
    }
  });
}

// 8 for a weight in the interleaved layout (its last dimension holds 8 rows' block bytes), 1 for planar rows.
int64_t rows_per_unit(const at::Tensor& w) { return w.size(2) % 8 == 0 && w.size(2) > 40 ? 8 : 1; }

}  // namespace

bool is_quantised(const at::Tensor& w) {
  if (w.scalar_type() != at::kByte || w.dim() != 3) return false;
  const int64_t b = w.size(2) / rows_per_unit(w);
  return b == kQ8_0 || b == kQ4_0 || b == kQ4_1;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(is_quantised(w), "qlinear: the weight is not in ponder's block layout (models/quant.py)");
  const int64_t per = rows_per_unit(w);
  const int64_t K = x.size(-1), N = w.size(0) * per;
  TORCH_CHECK(w.size(1) * kQK == K, "qlinear: the activations have ", K, " values per row, the weight ", w.size(1) * kQK);
  TORCH_CHECK(x.device().is_cpu() && w.is_contiguous(), "qlinear: CPU tensors, contiguous weight");
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  const int64_t M = K ? xc.numel() / K : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options().dtype(at::kFloat));
  if (M) quant_rows(xc.data_ptr<float>(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), M, K, N,
                    static_cast<int>(w.size(2) / per), per == 8);
  if (b.has_value() && b->defined()) y.add_(*b);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  if (w.scalar_type() == at::kByte) return qlinear(x, w, b);
  const int64_t K = x.size(-1);
  const int64_t M = K ? x.numel() / K : 0;
  // Two rows stay with MKL: its sgemm is still as fast as one row there (measured: 16.1 vs 18.7 ms over the 120
  // matrices), and from three rows on this kernel wins (22.2 vs 27.4 ms at 4, 28.1 vs 33.5 at 8).
  const bool take = M >= 3 && M <= g_max_rows.load() && x.scalar_type() == at::kFloat &&
                    w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous() && w.size(1) == K &&
                    x.device().is_cpu();
  if (!take) return at::linear(x, w, b);
  const at::Tensor xc = x.contiguous();
  const int64_t N = w.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  few_rows(xc.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, K, N);
  if (b.has_value() && b->defined()) y.add_(*b);
  return y;
}

void set_isa(const std::string& name) {
  int v;
  if (name == "auto") v = detect();
  else if (name == "scalar") v = kScalar;
  else if (name == "avx2") v = kAvx2;
  else if (name == "avx512") v = kAvx512;
  else if (name == "avx512vnni") v = kAvx512Vnni;
  else throw std::invalid_argument("unknown instruction set '" + name + "'; choose auto, avx512vnni, avx512, avx2 or scalar");
  if (v > detect()) throw std::invalid_argument("this CPU does not support " + name);
  g_isa.store(v);
}

std::string isa() {
  switch (current()) {
    case kAvx512Vnni: return "avx512vnni";
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

void set_max_rows(int64_t m) { g_max_rows.store(m); }
int64_t max_rows() { return g_max_rows.load(); }

}  // namespace ponder
