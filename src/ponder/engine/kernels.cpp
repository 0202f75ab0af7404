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
#include <stdexcept>

namespace ponder {
namespace {

enum Isa { kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

int detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
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
  if (isa == kAvx512) return &rows_avx512<M>;
  if (isa == kAvx2) return &rows_avx2<M>;
  return &rows_scalar<M>;
}

// The widest chunk of rows one pass takes: AVX2 has 16 registers, so 8 accumulators plus the weight vector.
int chunk_rows(int isa) { return isa == kAvx512 ? 16 : 8; }

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

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
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
  else throw std::invalid_argument("unknown instruction set '" + name + "'; choose auto, avx512, avx2 or scalar");
  if (v > detect()) throw std::invalid_argument("this CPU does not support " + name);
  g_isa.store(v);
}

std::string isa() {
  switch (current()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

void set_max_rows(int64_t m) { g_max_rows.store(m); }
int64_t max_rows() { return g_max_rows.load(); }

}  // namespace ponder
