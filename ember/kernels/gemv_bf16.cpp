// Batch-1..8 bf16 matrix-vector products for CPU decode, near the memory-bandwidth roofline.
//
// y[m, n] = sum_k x[m, k] * W[n, k]; W is [N, K] bf16 row-major (the nn.Linear layout), x is [M, K] bf16,
// y is [M, N] fp32. Each weight row is streamed once and dotted with every x row using AVX-512 BF16
// (vdpbf16ps: pairs of bf16 products accumulated in fp32). Rows are split across torch's thread pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kMaxBatch = 8;
constexpr int kRowsPerTile = 4;

inline float reduce(__m512 v) { return _mm512_reduce_add_ps(v); }

inline void store(float* y, float v) { *y = v; }
inline void store(at::BFloat16* y, float v) { *y = at::BFloat16(v); }  // round to nearest even

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
    for (int r = 0; r < kRowsPerTile; ++r) {
      for (int m = 0; m < M; ++m) {
        float s = reduce(acc[r][m]);
        for (int64_t k = kv; k < K; ++k) {
          uint32_t wb = uint32_t(w[(n + r) * K + k]) << 16, xb = uint32_t(x[m * K + k]) << 16;
          float wf, xf;
          std::memcpy(&wf, &wb, 4);
          std::memcpy(&xf, &xb, 4);
          s += wf * xf;
        }
        store(y + m * N + n + r, s);
      }
    }
  }
  for (; n < n1; ++n) {  // leftover rows, scalar
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        uint32_t wb = uint32_t(w[n * K + k]) << 16, xb = uint32_t(x[m * K + k]) << 16;
        float wf, xf;
        std::memcpy(&wf, &wb, 4);
        std::memcpy(&xf, &xb, 4);
        s += wf * xf;
      }
      store(y + m * N + n, s);
    }
  }
}

template <int M, typename Out>
void gemv(const uint16_t* w, const uint16_t* x, Out* y, int64_t K, int64_t N) {
  // Grain: enough rows that each task streams a few hundred KB of weights.
  const int64_t grain = std::max<int64_t>(kRowsPerTile, (1 << 18) / (K * 2) / kRowsPerTile * kRowsPerTile);
  at::parallel_for(0, (N + kRowsPerTile - 1) / kRowsPerTile, grain / kRowsPerTile, [&](int64_t t0, int64_t t1) {
    gemv_rows<M, Out>(w, x, y, K, N, t0 * kRowsPerTile, std::min(N, t1 * kRowsPerTile));
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
    default: gemv<8>(wp, xp, yp, K, N); break;
  }
}

// out_fp32: keep the fp32 accumulators (logits); otherwise round to bf16 like the rest of the model.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, bool out_fp32) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 inputs expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x [M, K], w [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxBatch, "batch must be 1..8");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv_bf16", &gemv_bf16, "bf16 GEMV for batch 1..8"); }
