// bf16 matrix products y = x W^T for CPU inference: batch 1..8 (decode) near the memory-bandwidth roofline, and
// any batch (prefill chunks, large decode batches) with exactly the same arithmetic per output element.
//
// y[m, n] = sum_k x[m, k] * W[n, k]; W is [N, K] bf16 row-major (the nn.Linear layout), x is [M, K] bf16,
// y is [M, N] fp32 or bf16. Products use AVX-512 BF16 (vdpbf16ps: pairs of bf16 products accumulated in fp32).
//
// Batch invariance: y[m, n] is one fixed sequence of operations on x row m and W row n, whatever M is, which
// rows share a tile, how work is split across threads and how many threads there are:
//   acc = 0; for each 32 k in order: acc = vdpbf16ps(acc, W[n, k:k+32], x[m, k:k+32]);
//   s = reduce1(acc) (simd_reduce.h's fixed tree); for each tail k in order: s += W[n, k] * x[m, k].
// The decode path (1-8 rows, streaming W once per row group) and the blocked path (more rows, tiles of 4 x 6
// summed 16 at a time by reduce16, the same tree) both compute exactly that. So a row's result alone equals
// its result in any batch, and a prompt's rows give the same values however the prompt is chunked.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include "simd_reduce.h"

namespace {

using ember_simd::reduce1;
using ember_simd::reduce16;

constexpr int kMaxBatch = 8;     // rows of x the decode path takes at once
constexpr int kRowsPerTile = 4;  // W rows per tile (both paths)
constexpr int kGemmRows = 6;     // x rows per tile of the blocked path: 4 x 6 accumulators, two reduce16

inline void store(float* y, float v) { *y = v; }
inline void store(at::BFloat16* y, float v) { *y = at::BFloat16(v); }  // round to nearest even

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The scalar k tail of one dot product, continuing s.
inline float tail(float s, const uint16_t* w, const uint16_t* x, int64_t k0, int64_t K) {
  for (int64_t k = k0; k < K; ++k) s += bf16_to_float(w[k]) * bf16_to_float(x[k]);
  return s;
}

// One dot product without tiles: for W rows past the last whole tile of 4 (a property of N alone).
inline float dot(const uint16_t* w, const uint16_t* x, int64_t K) {
  const int64_t kv = K / 32 * 32;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < kv; k += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
  return tail(reduce1(acc), w, x, kv, K);
}

// Decode: M (<= 8) rows of x against W rows [n0, n1); each W tile is read once for all M rows.
template <int M, typename Out>
void gemv_rows(const uint16_t* w, const uint16_t* x, Out* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t kv = K / 32 * 32;
  int64_t n = n0;
  for (; n + kRowsPerTile <= n1; n += kRowsPerTile) {
    __m512 acc[kRowsPerTile][M];
    for (int r = 0; r < kRowsPerTile; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kv; k += 32) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < kRowsPerTile; ++r) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
      }
    }
    for (int r = 0; r < kRowsPerTile; ++r)
      for (int m = 0; m < M; ++m) store(y + m * N + n + r, tail(reduce1(acc[r][m]), w + (n + r) * K, x + m * K, kv, K));
  }
  for (; n < n1; ++n)
    for (int m = 0; m < M; ++m) store(y + m * N + n, dot(w + n * K, x + m * K, K));
}

template <int M, typename Out>
void gemv(const uint16_t* w, const uint16_t* x, Out* y, int64_t K, int64_t N) {
  // Grain: enough rows that each task streams a few hundred KB of weights.
  const int64_t grain = std::max<int64_t>(kRowsPerTile, (1 << 18) / (K * 2) / kRowsPerTile * kRowsPerTile);
  at::parallel_for(0, (N + kRowsPerTile - 1) / kRowsPerTile, grain / kRowsPerTile, [&](int64_t t0, int64_t t1) {
    gemv_rows<M, Out>(w, x, y, K, N, t0 * kRowsPerTile, std::min(N, t1 * kRowsPerTile));
  });
}

// A tile of T (<= 6) x rows against 4 W rows: 24 accumulators (unused ones stay 0), summed 16 at a time by
// reduce16. Accumulator r * 6 + m is W row r with x row m.
template <int T, typename Out>
void gemm_tile(const uint16_t* w, const uint16_t* x, Out* y, int64_t K, int64_t N) {
  constexpr int kAcc = kRowsPerTile * kGemmRows;
  const int64_t kv = K / 32 * 32;
  __m512 acc[32];
  for (int i = 0; i < 32; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kv; k += 32) {
    __m512bh xv[T];
    for (int m = 0; m < T; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < kRowsPerTile; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int m = 0; m < T; ++m) acc[r * kGemmRows + m] = _mm512_dpbf16_ps(acc[r * kGemmRows + m], wv, xv[m]);
    }
  }
  alignas(64) float sums[32];
  _mm512_store_ps(sums, reduce16(reinterpret_cast<const __m512(&)[16]>(acc[0])));
  _mm512_store_ps(sums + 16, reduce16(reinterpret_cast<const __m512(&)[16]>(acc[16])));
  static_assert(kAcc <= 32, "two reduce16");
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int m = 0; m < T; ++m) store(y + m * N + r, tail(sums[r * kGemmRows + m], w + r * K, x + m * K, kv, K));
}

// Any M: work items are (block of W rows small enough to stay in L2, span of x rows) pairs, so W is read from
// memory about once and a few W rows with many x rows still use every thread.
template <typename Out>
void gemm(const uint16_t* w, const uint16_t* x, Out* y, int64_t M, int64_t K, int64_t N) {
  const int64_t block = std::max<int64_t>(kRowsPerTile, (1 << 17) / (K * 2) / kRowsPerTile * kRowsPerTile);
  const int64_t n_blocks = (N + block - 1) / block;
  const int64_t span = 60;  // x rows per work item (a multiple of kGemmRows)
  const int64_t m_spans = (M + span - 1) / span;
  at::parallel_for(0, n_blocks * m_spans, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = i / m_spans * block, n1 = std::min(N, n0 + block);
      const int64_t m0 = i % m_spans * span, m1 = std::min(M, m0 + span);
      const int64_t whole = n0 + (n1 - n0) / kRowsPerTile * kRowsPerTile;
      for (int64_t m = m0; m < m1; m += kGemmRows) {
        const uint16_t* xm = x + m * K;
        Out* ym = y + m * N;
        const int64_t t = std::min<int64_t>(kGemmRows, m1 - m);
        for (int64_t n = n0; n < whole; n += kRowsPerTile) {
          switch (t) {
            case 1: gemm_tile<1, Out>(w + n * K, xm, ym + n, K, N); break;
            case 2: gemm_tile<2, Out>(w + n * K, xm, ym + n, K, N); break;
            case 3: gemm_tile<3, Out>(w + n * K, xm, ym + n, K, N); break;
            case 4: gemm_tile<4, Out>(w + n * K, xm, ym + n, K, N); break;
            case 5: gemm_tile<5, Out>(w + n * K, xm, ym + n, K, N); break;
            default: gemm_tile<6, Out>(w + n * K, xm, ym + n, K, N); break;
          }
        }
        for (int64_t n = whole; n < n1; ++n)
          for (int64_t j = 0; j < t; ++j) store(ym + j * N + n, dot(w + n * K, xm + j * K, K));
      }
    }
  });
}

}  // namespace

template <typename Out>
void dispatch(const uint16_t* wp, const uint16_t* xp, Out* yp, int64_t M, int64_t K, int64_t N) {
  switch (M) {
    case 1: gemv<1>(wp, xp, yp, K, N); break;
    case 2: gemv<2>(wp, xp, yp, K, N); break;
    case 3: gemv<3>(wp, xp, yp, K, N); break;
    case 4: gemv<4>(wp, xp, yp, K, N); break;
    case 5: gemv<5>(wp, xp, yp, K, N); break;
    case 6: gemv<6>(wp, xp, yp, K, N); break;
    case 7: gemv<7>(wp, xp, yp, K, N); break;
    case 8: gemv<8>(wp, xp, yp, K, N); break;
    default: gemm(wp, xp, yp, M, K, N); break;
  }
}

// out_fp32: keep the fp32 accumulators (logits); otherwise round to bf16 like the rest of the model.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, bool out_fp32) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 inputs expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x [M, K], w [N, K]");
  TORCH_CHECK(x.size(0) >= 1, "x needs at least one row");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  if (out_fp32) {
    auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
    dispatch(wp, xp, y.data_ptr<float>(), M, K, N);
    return y;
  }
  auto y = torch::empty({M, N}, x.options());
  dispatch(wp, xp, y.data_ptr<at::BFloat16>(), M, K, N);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "bf16 x @ w.T for any number of rows, the same arithmetic per output element");
}
