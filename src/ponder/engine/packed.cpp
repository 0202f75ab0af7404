// Attention over low-precision K/V slots (engine/lowbits.py's layout) read in their packed form. Why: dequantising
// the demoted slots of every layer into float32 tensors before each decode step cost more than the attention itself
// (SmolLM2 at 4k tokens, half the KV bytes: 150 ms per token against 60 ms dense). Here each slot is unpacked into a
// 64-value buffer that stays in L1, used for every query of its group, and dropped: the slot's bytes are read once.
//
// Dequantisation is the same float32 arithmetic as lowbits.dequantise (u * scale, then + zero; -ffp-contract=off keeps
// the two roundings), so the values attended are the ones the reference attends; the dot products sum in another
// order (16 lanes), within float32 rounding of the reference.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t kChunk = 128;  // slots per task: (row, KV head) x chunks keeps both threads busy at batch 1

struct Packed {
  const uint8_t* q;
  const at::Half* s;
  const at::Half* z;
  int64_t nb, ng, bits, group;
};

Packed view(const Tensor& q, const Tensor& s, const Tensor& z, int64_t bits, int64_t group) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "packed values must be contiguous uint8");
  TORCH_CHECK(s.scalar_type() == at::kHalf && z.scalar_type() == at::kHalf && s.is_contiguous() && z.is_contiguous(),
              "scales and zeros must be contiguous float16");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8");
  return {q.data_ptr<uint8_t>(), s.data_ptr<at::Half>(), z.data_ptr<at::Half>(), q.size(-1), s.size(-1), bits, group};
}

// Slot j of (row, head) n into buf[hd]: u * scale + zero, per group.
inline void unpack(const Packed& p, int64_t slot, float* buf) {
  const uint8_t* b = p.q + slot * p.nb;
  const at::Half* s = p.s + slot * p.ng;
  const at::Half* z = p.z + slot * p.ng;
  const int per = static_cast<int>(8 / p.bits);
  const uint8_t mask = static_cast<uint8_t>((1 << p.bits) - 1);
  const int64_t bytes_per_group = p.group / per;
  for (int64_t g = 0; g < p.ng; ++g) {
    const float sc = static_cast<float>(s[g]), ze = static_cast<float>(z[g]);
    const uint8_t* bg = b + g * bytes_per_group;
    float* out = buf + g * p.group;
    for (int64_t t = 0; t < bytes_per_group; ++t)
      for (int k = 0; k < per; ++k) {
        float u = static_cast<float>((bg[t] >> (k * p.bits)) & mask);
        float us = u * sc;
        out[t * per + k] = us + ze;
      }
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
  float r = 0;
  for (int l = 0; l < 16; ++l) r += acc[l];
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// 4 bits, groups of a multiple of 32: AVX-512. A byte holds values 2t (low nibble) and 2t+1 (high), so 16 bytes
// widen to the even values of 32 and the odd ones; the queries (and the output rows of pv) are used in that
// de-interleaved order, which leaves every dot product and sum unchanged but the order it adds in.
bool fast4(const Packed& p, int64_t hd) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && p.bits == 4 && p.group % 32 == 0 && hd % 32 == 0;
}

__attribute__((target("avx512f"))) inline void unpack4(const Packed& p, int64_t slot, int64_t hd, float* buf) {
  const uint8_t* b = p.q + slot * p.nb;
  const at::Half* s = p.s + slot * p.ng;
  const at::Half* z = p.z + slot * p.ng;
  const __m512i nib = _mm512_set1_epi32(15);
  for (int64_t c = 0; c < hd / 32; ++c) {
    const int64_t g = c * 32 / p.group;
    const __m512 sc = _mm512_set1_ps(static_cast<float>(s[g])), ze = _mm512_set1_ps(static_cast<float>(z[g]));
    const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + c * 16)));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(w, nib));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
    _mm512_storeu_ps(buf + c * 32, _mm512_add_ps(_mm512_mul_ps(lo, sc), ze));
    _mm512_storeu_ps(buf + c * 32 + 16, _mm512_add_ps(_mm512_mul_ps(hi, sc), ze));
  }
}

// rows (R, hd) in the de-interleaved order: per 32 values, the 16 even ones, then the 16 odd ones
void deinterleave(const float* src, float* dst, int64_t R, int64_t hd) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < hd / 32; ++c)
      for (int64_t t = 0; t < 16; ++t) {
        dst[r * hd + c * 32 + t] = src[r * hd + c * 32 + 2 * t];
        dst[r * hd + c * 32 + 16 + t] = src[r * hd + c * 32 + 2 * t + 1];
      }
}

__attribute__((target("avx512f"))) void qk4(const Packed& p, const float* qd, int64_t R, int64_t hd, int64_t n,
                                            int64_t m, int64_t j0, int64_t j1, float* op) {
  alignas(64) float buf[512];
  for (int64_t j = j0; j < j1; ++j) {
    unpack4(p, n * m + j, hd, buf);
    for (int64_t r = 0; r < R; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < hd; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qd + r * hd + i), _mm512_load_ps(buf + i), acc);
      op[(n * R + r) * m + j] = _mm512_reduce_add_ps(acc);
    }
  }
}

__attribute__((target("avx512f"))) void pv4(const Packed& p, const float* pp, int64_t R, int64_t hd, int64_t n,
                                            int64_t m, int64_t j0, int64_t j1, float* o) {
  alignas(64) float buf[512];
  for (int64_t j = j0; j < j1; ++j) {
    unpack4(p, n * m + j, hd, buf);
    for (int64_t r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(pp[(n * R + r) * m + j]);
      for (int64_t i = 0; i < hd; i += 16)
        _mm512_storeu_ps(o + r * hd + i, _mm512_fmadd_ps(w, _mm512_load_ps(buf + i), _mm512_loadu_ps(o + r * hd + i)));
    }
  }
}

}  // namespace

// q (N, R, hd) float32 against packed K (N, m, ...): scores (N, R, m), unscaled.
Tensor packed_qk(const Tensor& q0, const Tensor& kq, const Tensor& ks, const Tensor& kz, int64_t bits, int64_t group,
                 bool fast) {
  TORCH_CHECK(q0.scalar_type() == at::kFloat && q0.dim() == 3, "queries must be float32 (N, R, hd)");
  Tensor q = q0.contiguous();
  const int64_t N = q.size(0), R = q.size(1), hd = q.size(2), m = kq.size(1);
  Packed p = view(kq, ks, kz, bits, group);
  TORCH_CHECK(p.nb * (8 / bits) == hd && kq.size(0) == N, "packed keys do not match the queries");
  Tensor out = at::empty({N, R, m}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  const bool f4 = fast && hd <= 512 && fast4(p, hd);
  std::vector<float> qd;
  if (f4) {
    qd.resize(N * R * hd);
    deinterleave(qp, qd.data(), N * R, hd);
  }
  at::parallel_for(0, N * chunks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> buf(hd);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / chunks, j0 = (u % chunks) * kChunk, j1 = std::min(m, j0 + kChunk);
      if (f4) {
        qk4(p, qd.data() + n * R * hd, R, hd, n, m, j0, j1, op);
        continue;
      }
      for (int64_t j = j0; j < j1; ++j) {
        unpack(p, n * m + j, buf.data());
        for (int64_t r = 0; r < R; ++r) op[(n * R + r) * m + j] = dot(qp + (n * R + r) * hd, buf.data(), hd);
      }
    }
  });
  return out;
}

// Probabilities p (N, R, m) float32 over packed V (N, m, ...): sum_j p[.., j] * v_j, (N, R, hd).
Tensor packed_pv(const Tensor& p0, const Tensor& vq, const Tensor& vs, const Tensor& vz, int64_t bits, int64_t group,
                 bool fast) {
  TORCH_CHECK(p0.scalar_type() == at::kFloat && p0.dim() == 3, "probabilities must be float32 (N, R, m)");
  Tensor pr = p0.contiguous();
  const int64_t N = pr.size(0), R = pr.size(1), m = pr.size(2);
  Packed p = view(vq, vs, vz, bits, group);
  const int64_t hd = p.nb * (8 / bits);
  TORCH_CHECK(vq.size(0) == N && vq.size(1) == m, "packed values do not match the probabilities");
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  Tensor part = at::zeros({N, chunks, R, hd}, pr.options());  // one partial sum per chunk, added below
  const float* pp = pr.data_ptr<float>();
  float* op = part.data_ptr<float>();
  const bool f4 = fast && hd <= 512 && fast4(p, hd);
  at::parallel_for(0, N * chunks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> buf(hd);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / chunks, c = u % chunks, j0 = c * kChunk, j1 = std::min(m, j0 + kChunk);
      float* o = op + (n * chunks + c) * R * hd;
      if (f4) {
        pv4(p, pp, R, hd, n, m, j0, j1, o);
        continue;
      }
      for (int64_t j = j0; j < j1; ++j) {
        unpack(p, n * m + j, buf.data());
        for (int64_t r = 0; r < R; ++r) {
          const float w = pp[(n * R + r) * m + j];
          float* orow = o + r * hd;
          for (int64_t i = 0; i < hd; ++i) orow[i] += w * buf[i];
        }
      }
    }
  });
  Tensor out = part.sum(1);
  if (!f4) return out;
  // back from the de-interleaved order: per 32 values, even ones first
  return out.view({N, R, hd / 32, 2, 16}).transpose(-1, -2).reshape({N, R, hd});
}
