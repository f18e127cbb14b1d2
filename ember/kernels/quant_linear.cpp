// Weight-only int4 / int8 matmul for CPU inference with AVX-512 VNNI (vpdpbusd: u8 x s8 -> int32).
//
// y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]), W stored as in quant_linear.py: tiles of 16 rows,
// each 64-byte vector = 16 rows x 4 consecutive k, so every int32 lane of vpdpbusd is one output row
// and no horizontal sums are needed. Per group of gk columns the int32 dot is exact; it is turned into
// fp32 once per group: y += scale[n, g] * xscale[m, g] * dot  (+ offset[n, g] * sum_g x[m, :] for int4).
//
// Activations are quantized per row and per group as x ~= xs * (256 hi + lo), hi and lo int8, so each
// dot is two vpdpbusd and carries ~16 bits of activation precision ("precise"); with precise=false
// only hi is used (llama.cpp-style int8 activations, cheaper at larger batches).
// int4 codes (0..15) are the unsigned operand and x the signed one. int8 codes are signed, so x is
// shifted to unsigned (x + 128) and 128 * sum_k w is subtracted; that sum comes from one extra
// vpdpbusd per weight vector, shared by all rows of x.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int kTile = 16;        // output rows per vector
constexpr int kBlockTiles = 4;   // rows are padded to 64 = one parallel work item
constexpr int kMaxChunk = 8;     // rows of x handled per pass over a weight block
constexpr int kPreciseChunk = 4; // precise mode holds two int32 accumulators per row: 4 rows fit 32 registers

struct Args {
  const uint8_t* w;     // packed weights
  const void* scales;   // [T, G, 16] float32, float16, or int8 multipliers of scale_d
  const void* offsets;  // [T, G, 16] like scales (int4) or null
  const float* scale_d; // [T, G/S, 16] super-block factors when scales are int8 (GGUF K-quants), else null
  const float* offset_d;
  const int8_t* xh;     // [M, K] quantized activations (int8, or +128 as uint8 for int8 weights)
  const int8_t* xl;
  const float* xs;      // [M, G] combined scale of (256 hi + lo)
  const float* xsum;    // [M, G] exact group sums of x (int4 offsets)
  const float* bias;    // [N] or null
  int64_t K, G, gk, N;
  int64_t tile_bytes;   // bytes of one tile of weights
  int scale_kind;       // 0 float32, 1 float16, 2 int8 x super-block float32
  int64_t super_groups; // S: groups per super-block (scale_kind 2)
};

// The 16 rows' scale for one group; i = (tile * G + g) * 16.
inline __m512 load_scales(const Args& a, const void* p, const float* d, int64_t i) {
  if (a.scale_kind == 0) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  if (a.scale_kind == 1)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  const __m512 mult = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(p) + i))));
  return _mm512_mul_ps(mult, _mm512_loadu_ps(d + i / kTile / a.super_groups * kTile));
}

inline __m512i bcast(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline void store_rows(float* y, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(y, mask, v); }
inline void store_rows(at::BFloat16* y, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// T tiles (16 T rows) x M rows of x, starting at tile `tile0` and x row `m0`.
template <bool INT4, bool PRECISE, int M, int T, typename Out>
inline void tile_kernel(const Args& a, int64_t tile0, int64_t m0, Out* y) {
  const int64_t K = a.K, G = a.G, gk = a.gk;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[T][M];
  for (int t = 0; t < T; ++t)
    for (int m = 0; m < M; ++m) acc[t][m] = _mm512_setzero_ps();
  const int8_t* xh = a.xh + m0 * K;
  const int8_t* xl = a.xl + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    __m512i hi[T][M], lo[T][M], corr[T];
    for (int t = 0; t < T; ++t) {
      corr[t] = _mm512_setzero_si512();
      for (int m = 0; m < M; ++m) hi[t][m] = lo[t][m] = _mm512_setzero_si512();
    }
    const int64_t k_end = (g + 1) * gk;
    if constexpr (INT4) {
      for (int64_t k = g * gk; k < k_end; k += 8) {
        for (int t = 0; t < T; ++t) {
          const __m512i w = _mm512_loadu_si512(a.w + (tile0 + t) * a.tile_bytes + k * 8);
          const __m512i wa = _mm512_and_si512(w, nib);
          const __m512i wb = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
          for (int m = 0; m < M; ++m) {
            hi[t][m] = _mm512_dpbusd_epi32(hi[t][m], wa, bcast(xh + m * K + k));
            hi[t][m] = _mm512_dpbusd_epi32(hi[t][m], wb, bcast(xh + m * K + k + 4));
            if constexpr (PRECISE) {
              lo[t][m] = _mm512_dpbusd_epi32(lo[t][m], wa, bcast(xl + m * K + k));
              lo[t][m] = _mm512_dpbusd_epi32(lo[t][m], wb, bcast(xl + m * K + k + 4));
            }
          }
        }
      }
    } else {
      for (int64_t k = g * gk; k < k_end; k += 4) {
        for (int t = 0; t < T; ++t) {
          const __m512i w = _mm512_loadu_si512(a.w + (tile0 + t) * a.tile_bytes + k * 16);
          corr[t] = _mm512_dpbusd_epi32(corr[t], u128, w);
          for (int m = 0; m < M; ++m) {
            hi[t][m] = _mm512_dpbusd_epi32(hi[t][m], bcast(xh + m * K + k), w);
            if constexpr (PRECISE) lo[t][m] = _mm512_dpbusd_epi32(lo[t][m], bcast(xl + m * K + k), w);
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const int64_t at = ((tile0 + t) * G + g) * kTile;
      const __m512 s = load_scales(a, a.scales, a.scale_d, at);
      __m512 o;
      if constexpr (INT4) o = load_scales(a, a.offsets, a.offset_d, at);
      for (int m = 0; m < M; ++m) {
        __m512i h = hi[t][m], l = lo[t][m];
        if constexpr (!INT4) {
          h = _mm512_sub_epi32(h, corr[t]);
          if constexpr (PRECISE) l = _mm512_sub_epi32(l, corr[t]);
        }
        const __m512i c = PRECISE ? _mm512_add_epi32(_mm512_slli_epi32(h, 8), l) : h;
        const float xs = a.xs[(m0 + m) * G + g];
        acc[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), _mm512_mul_ps(s, _mm512_set1_ps(xs)), acc[t][m]);
        if constexpr (INT4) acc[t][m] = _mm512_fmadd_ps(o, _mm512_set1_ps(a.xsum[(m0 + m) * G + g]), acc[t][m]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t n = (tile0 + t) * kTile;
    if (n >= a.N) break;
    const __mmask16 mask = a.N - n >= kTile ? __mmask16(0xFFFF) : __mmask16((1u << (a.N - n)) - 1);
    const __m512 b = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) store_rows(y + (m0 + m) * a.N + n, _mm512_add_ps(acc[t][m], b), mask);
  }
}

// One tile at a time: the int32 accumulators restart every group, so out-of-order execution already
// overlaps consecutive groups; interleaving 2 or 4 tiles measured 10-40% slower (register copies, spills).
constexpr int tiles_for(int) { return 1; }

template <bool INT4, bool PRECISE, int M, typename Out>
void block_rows(const Args& a, int64_t tile_begin, int64_t tile_end, int64_t m0, Out* y) {
  constexpr int T = tiles_for(M);
  for (int64_t t = tile_begin; t < tile_end; t += T) tile_kernel<INT4, PRECISE, M, T, Out>(a, t, m0, y);
}

template <bool INT4, bool PRECISE, typename Out>
void chunk(const Args& a, int64_t tile_begin, int64_t tile_end, int64_t m0, int64_t mc, Out* y) {
  switch (mc) {
    case 1: block_rows<INT4, PRECISE, 1>(a, tile_begin, tile_end, m0, y); break;
    case 2: block_rows<INT4, PRECISE, 2>(a, tile_begin, tile_end, m0, y); break;
    case 3: block_rows<INT4, PRECISE, 3>(a, tile_begin, tile_end, m0, y); break;
    case 4: block_rows<INT4, PRECISE, 4>(a, tile_begin, tile_end, m0, y); break;
    case 5: block_rows<INT4, PRECISE, 5>(a, tile_begin, tile_end, m0, y); break;
    case 6: block_rows<INT4, PRECISE, 6>(a, tile_begin, tile_end, m0, y); break;
    case 7: block_rows<INT4, PRECISE, 7>(a, tile_begin, tile_end, m0, y); break;
    default: block_rows<INT4, PRECISE, 8>(a, tile_begin, tile_end, m0, y); break;
  }
}

template <bool INT4, bool PRECISE, typename Out>
void run(const Args& a, int64_t M, Out* y, int64_t min_task_bytes) {
  const int64_t blocks = (a.N + kTile * kBlockTiles - 1) / (kTile * kBlockTiles);
  const int64_t block_bytes = a.tile_bytes * kBlockTiles;
  // Small matrices run on one thread: waking the pool costs more than the bandwidth it adds.
  const int64_t grain = std::max<int64_t>(1, min_task_bytes / block_bytes);
  // Weights of a super-block stay in L2 while every chunk of x rows passes over them.
  const int64_t super = std::max<int64_t>(1, (256 << 10) / block_bytes);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t s0 = b0; s0 < b1; s0 += super) {
      const int64_t s1 = std::min(b1, s0 + super);
      constexpr int64_t step = PRECISE ? kPreciseChunk : kMaxChunk;
      for (int64_t m0 = 0; m0 < M; m0 += step)
        chunk<INT4, PRECISE, Out>(a, s0 * kBlockTiles, s1 * kBlockTiles, m0, std::min<int64_t>(step, M - m0), y);
    }
  });
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Per row and group: xs = absmax / (127 * 256), hi = round(x / (256 xs)), lo = round(x / xs - 256 hi).
template <typename In>
void quantize_rows(const In* x, int64_t M, int64_t K, int64_t gk, bool to_unsigned, int8_t* xh, int8_t* xl,
                   float* xs, float* xsum) {
  const int64_t G = K / gk;
  const __m512i shift = _mm512_set1_epi32(to_unsigned ? 128 : 0);
  const __m512i lo_min = _mm512_set1_epi32(-127), lo_max = _mm512_set1_epi32(127);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const In* xg = x + m * K + g * gk;
        __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < gk; k += 16) {
          const __m512 v = load16(xg + k);
          amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
          sum = _mm512_add_ps(sum, v);
        }
        const float absmax = _mm512_reduce_max_ps(amax);
        const float inv = absmax > 0.f ? 127.f / absmax : 0.f;
        xs[m * G + g] = absmax / (127.f * 256.f);
        if (xsum) xsum[m * G + g] = _mm512_reduce_add_ps(sum);
        for (int64_t k = 0; k < gk; k += 16) {
          const __m512 v = _mm512_mul_ps(load16(xg + k), _mm512_set1_ps(inv));
          const __m512i h = _mm512_cvtps_epi32(v);  // round to nearest even; |v| <= 127
          __m512i l = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_cvtepi32_ps(h)), _mm512_set1_ps(256.f)));
          l = _mm512_min_epi32(_mm512_max_epi32(l, lo_min), lo_max);
          _mm_storeu_si128((__m128i*)(xh + m * K + g * gk + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(h, shift)));
          _mm_storeu_si128((__m128i*)(xl + m * K + g * gk + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(l, shift)));
        }
      }
    }
  });
}

// Super-block factors of int8 scales: float32 [T, G/S, 16]; returns S.
int64_t check_super(const torch::Tensor& scales, const c10::optional<torch::Tensor>& d) {
  TORCH_CHECK(d.has_value() && d->defined() && d->scalar_type() == at::kFloat && d->is_contiguous() && d->dim() == 3 &&
                  d->size(0) == scales.size(0) && d->size(1) > 0 && scales.size(1) % d->size(1) == 0,
              "int8 scales need float32 super-block factors [T, G/S, 16]");
  return scales.size(1) / d->size(1);
}

torch::Tensor quant_linear_impl(bool int4, torch::Tensor x, const torch::Tensor& qweight, const torch::Tensor& scales,
                                const c10::optional<torch::Tensor>& offsets, const c10::optional<torch::Tensor>& scale_d,
                                const c10::optional<torch::Tensor>& offset_d, const c10::optional<torch::Tensor>& bias,
                                int64_t N, bool out_fp32, bool precise, int64_t min_task_bytes) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bf16 or fp32");
  const auto st = scales.scalar_type();
  const int scale_kind = st == at::kFloat ? 0 : st == at::kHalf ? 1 : st == at::kChar ? 2 : -1;
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && scale_kind >= 0, "bad packed weight");
  int64_t super_groups = 1;
  if (scale_kind == 2) {
    super_groups = check_super(scales, scale_d);
    if (int4) TORCH_CHECK(check_super(scales, offset_d) == super_groups, "offset factors must match scale factors");
  }
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), T = qweight.size(0), G = scales.size(1);
  TORCH_CHECK(qweight.size(1) * (int4 ? 8 : 4) == K && qweight.size(2) == 64, "qweight does not match x");
  TORCH_CHECK(T % kBlockTiles == 0 && T * kTile >= N && scales.size(0) == T && K % G == 0, "bad packed shapes");
  const int64_t gk = K / G;
  TORCH_CHECK(gk % 16 == 0 && gk <= 128, "kernel group must be a multiple of 16, at most 128");

  auto opts = x.options();
  // One scratch allocation for the quantized activations: [M, K] hi, [M, K] lo, [M, G] scales and sums.
  const int64_t mk = (M * K + 63) / 64 * 64;
  auto scratch = torch::empty({2 * mk + 8 * M * G}, opts.dtype(at::kByte));
  int8_t* xh = reinterpret_cast<int8_t*>(scratch.data_ptr<uint8_t>());
  int8_t* xl = xh + mk;
  float* xs = reinterpret_cast<float*>(xl + mk);
  float* xsum_p = int4 ? xs + M * G : nullptr;
  if (x.scalar_type() == at::kFloat)
    quantize_rows(x.data_ptr<float>(), M, K, gk, !int4, xh, xl, xs, xsum_p);
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, gk, !int4, xh, xl, xs, xsum_p);
  if (!precise)  // hi alone then stands for x / (256 xs)
    for (int64_t i = 0; i < M * G; ++i) xs[i] *= 256.f;

  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "bias must have N elements");
  }
  torch::Tensor off;
  if (int4) {
    TORCH_CHECK(offsets.has_value() && offsets->sizes() == scales.sizes() && offsets->scalar_type() == scales.scalar_type(),
                "int4 needs offsets shaped and typed like scales");
    off = offsets->contiguous();
  }
  const float* sd = scale_kind == 2 ? scale_d->data_ptr<float>() : nullptr;
  const float* od = scale_kind == 2 && int4 ? offset_d->data_ptr<float>() : nullptr;
  Args a{reinterpret_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr(), int4 ? off.data_ptr() : nullptr, sd, od,
         xh, xl, xs, xsum_p, b.defined() ? b.data_ptr<float>() : nullptr, K, G, gk, N, qweight.size(1) * 64,
         scale_kind, super_groups};

  auto y = torch::empty({M, N}, opts.dtype(out_fp32 ? at::kFloat : at::kBFloat16));
  auto go = [&](auto* yp) {
    using Out = std::remove_pointer_t<decltype(yp)>;
    if (int4) precise ? run<true, true, Out>(a, M, yp, min_task_bytes) : run<true, false, Out>(a, M, yp, min_task_bytes);
    else precise ? run<false, true, Out>(a, M, yp, min_task_bytes) : run<false, false, Out>(a, M, yp, min_task_bytes);
  };
  if (out_fp32) go(y.data_ptr<float>());
  else go(y.data_ptr<at::BFloat16>());
  return y;
}

}  // namespace

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor offsets,
                          c10::optional<torch::Tensor> scale_d, c10::optional<torch::Tensor> offset_d,
                          c10::optional<torch::Tensor> bias, int64_t N, bool out_fp32, bool precise, int64_t min_task_bytes) {
  return quant_linear_impl(true, x, qweight, scales, offsets, scale_d, offset_d, bias, N, out_fp32, precise, min_task_bytes);
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> scale_d,
                          c10::optional<torch::Tensor> bias, int64_t N, bool out_fp32, bool precise, int64_t min_task_bytes) {
  return quant_linear_impl(false, x, qweight, scales, c10::nullopt, scale_d, c10::nullopt, bias, N, out_fp32, precise,
                           min_task_bytes);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "y = x W^T for a packed int4 weight");
  m.def("int8_linear", &int8_linear, "y = x W^T for a packed int8 weight");
}
