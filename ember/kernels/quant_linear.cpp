// Weight-only int4 / int8 matmul for CPU inference with AVX-512 VNNI (vpdpbusd: u8 x s8 -> int32), or AVX2
// (vpmaddubsw + vpmaddwd, exact for the operand ranges used here).
//
// y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]), W stored as in quant_linear.py: tiles of 16 rows,
// each 64-byte vector = 16 rows x 4 consecutive k, so every int32 lane of vpdpbusd is one output row
// and no horizontal sums are needed. Per group of gk columns the int32 dot is exact; it is turned into
// fp32 once per group: y += scale[n, g] * xscale[m, g] * dot  (+ offset[n, g] * sum_g x[m, :] for int4).
//
// Activations are quantized per row and per group as x ~= xs * (256 hi + lo), hi and lo int8, so each
// dot is two vpdpbusd and carries ~16 bits of activation precision ("precise"); with precise=false
// only hi is used (llama.cpp-style int8 activations, cheaper at larger batches).
// int4 codes (0..15) are the unsigned operand and x the signed one. int8 codes are signed: with VNNI, x is
// shifted to unsigned (x + 128) and 128 * sum_k w is subtracted; that sum comes from one extra
// vpdpbusd per weight vector, shared by all rows of x. AVX2 has no such instruction, and vpmaddubsw's int16
// pair sums would saturate on (x + 128) * w, so there |w| is the unsigned operand and x takes w's sign
// (|x| <= 127, |w| <= 128: pair sums stay within int16). Either way the integer dots are exact, so both
// paths compute the same y (up to the order of one float sum of x per group).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define EMBER_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EMBER_AVX512 0
#else
#error "quant_linear needs AVX-512 VNNI, or AVX2 with FMA and F16C"
#endif

namespace {

// 16 int32 / float lanes (one output row each): one AVX-512 register, or two AVX2 registers.
namespace v {
#if EMBER_AVX512
using I = __m512i;
using F = __m512;
constexpr bool kShiftedX = true;  // int8 weights: x is stored as x + 128 (see the top of the file)
constexpr int kMaxChunk = 8;      // rows of x handled per pass over a weight block
constexpr int kPreciseChunk = 4;  // precise mode holds two int32 accumulators per row: 4 rows fit 32 registers

inline I load_i(const void* p) { return _mm512_loadu_si512(p); }
inline I zero_i() { return _mm512_setzero_si512(); }
inline I set1_i8(char c) { return _mm512_set1_epi8(c); }
inline I set1_i32(int32_t c) { return _mm512_set1_epi32(c); }
inline I and_i(I a, I b) { return _mm512_and_si512(a, b); }
inline I srl16_4(I a) { return _mm512_srli_epi16(a, 4); }
inline I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
inline I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
inline I shl8_i(I a) { return _mm512_slli_epi32(a, 8); }
inline I min_i(I a, I b) { return _mm512_min_epi32(a, b); }
inline I max_i(I a, I b) { return _mm512_max_epi32(a, b); }
// acc + 4-byte dots of unsigned u with signed s.
inline I dot_us(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
// acc + dots of int4 codes (two halves) with x; the x-independent parts are shared by all rows.
inline I dot_int4(I acc, I wa, I xa, I wb, I xb) { return dot_us(dot_us(acc, wa, xa), wb, xb); }
// acc + dots of x (stored shifted) with int8 codes w; 128 * sum w is subtracted later.
inline I dot_int8(I acc, I x, I w) { return dot_us(acc, x, w); }
inline I add_128_sum(I acc, I w) { return dot_us(acc, set1_i8(static_cast<char>(0x80)), w); }  // acc + 128 sum w
inline void store_i8(int8_t* p, I a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a)); }

inline F zero_f() { return _mm512_setzero_ps(); }
inline F set1_f(float c) { return _mm512_set1_ps(c); }
inline F load_f(const float* p) { return _mm512_loadu_ps(p); }
inline F load_f(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline F load_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline F load_i8_f(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline F to_f(I a) { return _mm512_cvtepi32_ps(a); }
inline I round_i(F a) { return _mm512_cvtps_epi32(a); }  // round to nearest even
inline F add_f(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub_f(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul_f(F a, F b) { return _mm512_mul_ps(a, b); }
inline F max_f(F a, F b) { return _mm512_max_ps(a, b); }
inline F abs_f(F a) { return _mm512_abs_ps(a); }
inline F fmadd_f(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline float reduce_max(F a) { return _mm512_reduce_max_ps(a); }
inline float reduce_add(F a) { return _mm512_reduce_add_ps(a); }

inline __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
inline F load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline void store_first(float* y, F a, int64_t n) { _mm512_mask_storeu_ps(y, first(n), a); }
inline void store_first(at::BFloat16* y, F a, int64_t n) {
#ifdef __AVX512BF16__
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(a);
#else  // round to nearest even by integer ops, NaN -> 0x7FC0 (as c10::BFloat16)
  const __m512i bits = _mm512_castps_si512(a);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  const __m256i h = _mm512_cvtepi32_epi16(r);
#endif
  _mm256_mask_storeu_epi16(y, first(n), h);
}
#else
struct I { __m256i a, b; };  // lanes 0-7, 8-15
struct F { __m256 a, b; };
constexpr bool kShiftedX = false;
constexpr int kMaxChunk = 4;  // 16 registers: two per accumulator
constexpr int kPreciseChunk = 2;

inline I load_i(const void* p) {
  const __m256i* q = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
inline I zero_i() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline I set1_i8(char c) { return {_mm256_set1_epi8(c), _mm256_set1_epi8(c)}; }
inline I set1_i32(int32_t c) { return {_mm256_set1_epi32(c), _mm256_set1_epi32(c)}; }
inline I and_i(I x, I y) { return {_mm256_and_si256(x.a, y.a), _mm256_and_si256(x.b, y.b)}; }
inline I srl16_4(I x) { return {_mm256_srli_epi16(x.a, 4), _mm256_srli_epi16(x.b, 4)}; }
inline I add_i(I x, I y) { return {_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b)}; }
inline I sub_i(I x, I y) { return {_mm256_sub_epi32(x.a, y.a), _mm256_sub_epi32(x.b, y.b)}; }
inline I shl8_i(I x) { return {_mm256_slli_epi32(x.a, 8), _mm256_slli_epi32(x.b, 8)}; }
inline I min_i(I x, I y) { return {_mm256_min_epi32(x.a, y.a), _mm256_min_epi32(x.b, y.b)}; }
inline I max_i(I x, I y) { return {_mm256_max_epi32(x.a, y.a), _mm256_max_epi32(x.b, y.b)}; }
// int16 pairs of u8 x s8 products (exact while |sum| < 2^15) -> int32 sums of 4.
inline __m256i pairs_to_i32(__m256i p) { return _mm256_madd_epi16(p, _mm256_set1_epi16(1)); }
// int4 codes <= 15 and |x| <= 127: four products sum to at most 7620, exact in int16.
inline __m256i dot_int4_half(__m256i acc, __m256i wa, __m256i xa, __m256i wb, __m256i xb) {
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(wa, xa), _mm256_maddubs_epi16(wb, xb));
  return _mm256_add_epi32(acc, pairs_to_i32(p));
}
inline I dot_int4(I acc, I wa, I xa, I wb, I xb) {
  return {dot_int4_half(acc.a, wa.a, xa.a, wb.a, xb.a), dot_int4_half(acc.b, wa.b, xa.b, wb.b, xb.b)};
}
// |w| <= 128 unsigned times sign(w) * x, |x| <= 127: pair sums at most 32512.
inline __m256i dot_int8_half(__m256i acc, __m256i x, __m256i w) {
  return _mm256_add_epi32(acc, pairs_to_i32(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))));
}
inline I dot_int8(I acc, I x, I w) { return {dot_int8_half(acc.a, x.a, w.a), dot_int8_half(acc.b, x.b, w.b)}; }
inline I add_128_sum(I acc, I) { return acc; }  // x is not shifted: nothing to correct
inline void store_i8(int8_t* p, I x) {  // the low byte of each lane
  const __m256i m = _mm256_set1_epi32(0xFF);
  const __m256i w16 = _mm256_packus_epi32(_mm256_and_si256(x.a, m), _mm256_and_si256(x.b, m));  // a0-3 b0-3 a4-7 b4-7
  const __m256i ordered = _mm256_permute4x64_epi64(w16, 0xD8);
  const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(ordered), _mm256_extracti128_si256(ordered, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bytes);
}

inline F zero_f() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F set1_f(float c) { return {_mm256_set1_ps(c), _mm256_set1_ps(c)}; }
inline F load_f(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 bf16_to_f(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline F load_f(const at::BFloat16* p) { return {bf16_to_f(p), bf16_to_f(p + 8)}; }
inline __m256 f16_to_f(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline F load_f16(const uint16_t* p) { return {f16_to_f(p), f16_to_f(p + 8)}; }
inline __m256 i8_to_f(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline F load_i8_f(const int8_t* p) { return {i8_to_f(p), i8_to_f(p + 8)}; }
inline F to_f(I x) { return {_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)}; }
inline I round_i(F x) { return {_mm256_cvtps_epi32(x.a), _mm256_cvtps_epi32(x.b)}; }
inline F add_f(F x, F y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
inline F sub_f(F x, F y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
inline F mul_f(F x, F y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
inline F max_f(F x, F y) { return {_mm256_max_ps(x.a, y.a), _mm256_max_ps(x.b, y.b)}; }
inline F abs_f(F x) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(x.a, m), _mm256_and_ps(x.b, m)};
}
inline F fmadd_f(F x, F y, F z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_add(F x) { return hsum(_mm256_add_ps(x.a, x.b)); }
inline float reduce_max(F x) {
  alignas(32) float l[8];
  _mm256_store_ps(l, _mm256_max_ps(x.a, x.b));
  return *std::max_element(l, l + 8);
}

inline F load_first(const float* p, int64_t n) {
  if (n >= 16) return load_f(p);
  float buf[16] = {0};
  std::memcpy(buf, p, n * sizeof(float));
  return load_f(buf);
}
// 8 floats -> bfloat16, round to nearest even by integer ops, NaN -> 0x7FC0 (as c10::BFloat16).
inline __m128i to_bf16(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
template <typename Out>
inline void store_first(Out* y, F x, int64_t n) {
  Out buf[16];
  Out* dst = n >= 16 ? y : buf;
  if constexpr (std::is_same_v<Out, float>) {
    _mm256_storeu_ps(dst, x.a);
    _mm256_storeu_ps(dst + 8, x.b);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), to_bf16(x.a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), to_bf16(x.b));
  }
  if (n < 16) std::memcpy(y, buf, n * sizeof(Out));
}
#endif

inline I bcast(const int8_t* p) {
  int32_t c;
  std::memcpy(&c, p, 4);
  return set1_i32(c);
}
}  // namespace v

constexpr int kTile = 16;        // output rows per vector
constexpr int kBlockTiles = 4;   // rows are padded to 64 = one parallel work item

struct Args {
  const uint8_t* w;     // packed weights
  const void* scales;   // [T, G, 16] float32, float16, or int8 multipliers of scale_d
  const void* offsets;  // [T, G, 16] like scales (int4) or null
  const float* scale_d; // [T, G/S, 16] super-block factors when scales are int8 (GGUF K-quants), else null
  const float* offset_d;
  const int8_t* xh;     // [M, K] quantized activations (int8, or +128 as uint8 for int8 weights with VNNI)
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
inline v::F load_scales(const Args& a, const void* p, const float* d, int64_t i) {
  if (a.scale_kind == 0) return v::load_f(static_cast<const float*>(p) + i);
  if (a.scale_kind == 1) return v::load_f16(static_cast<const uint16_t*>(p) + i);
  return v::mul_f(v::load_i8_f(static_cast<const int8_t*>(p) + i), v::load_f(d + i / kTile / a.super_groups * kTile));
}

// T tiles (16 T rows) x M rows of x, starting at tile `tile0` and x row `m0`.
template <bool INT4, bool PRECISE, int M, int T, typename Out>
inline void tile_kernel(const Args& a, int64_t tile0, int64_t m0, Out* y) {
  using namespace v;
  constexpr bool CORR = !INT4 && kShiftedX;
  const int64_t K = a.K, G = a.G, gk = a.gk;
  const I nib = set1_i8(0x0F);
  F acc[T][M];
  for (int t = 0; t < T; ++t)
    for (int m = 0; m < M; ++m) acc[t][m] = zero_f();
  const int8_t* xh = a.xh + m0 * K;
  const int8_t* xl = a.xl + m0 * K;
  for (int64_t g = 0; g < G; ++g) {
    I hi[T][M], lo[T][M], corr[T];
    for (int t = 0; t < T; ++t) {
      corr[t] = zero_i();
      for (int m = 0; m < M; ++m) hi[t][m] = lo[t][m] = zero_i();
    }
    const int64_t k_end = (g + 1) * gk;
    if constexpr (INT4) {
      for (int64_t k = g * gk; k < k_end; k += 8) {
        for (int t = 0; t < T; ++t) {
          const I w = load_i(a.w + (tile0 + t) * a.tile_bytes + k * 8);
          const I wa = and_i(w, nib);
          const I wb = and_i(srl16_4(w), nib);
          for (int m = 0; m < M; ++m) {
            const int8_t* h = xh + m * K + k;
            const int8_t* l = xl + m * K + k;
            hi[t][m] = dot_int4(hi[t][m], wa, bcast(h), wb, bcast(h + 4));
            if constexpr (PRECISE) lo[t][m] = dot_int4(lo[t][m], wa, bcast(l), wb, bcast(l + 4));
          }
        }
      }
    } else {
      for (int64_t k = g * gk; k < k_end; k += 4) {
        for (int t = 0; t < T; ++t) {
          const I w = load_i(a.w + (tile0 + t) * a.tile_bytes + k * 16);
          if constexpr (CORR) corr[t] = add_128_sum(corr[t], w);
          for (int m = 0; m < M; ++m) {
            hi[t][m] = dot_int8(hi[t][m], bcast(xh + m * K + k), w);
            if constexpr (PRECISE) lo[t][m] = dot_int8(lo[t][m], bcast(xl + m * K + k), w);
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const int64_t at = ((tile0 + t) * G + g) * kTile;
      const F s = load_scales(a, a.scales, a.scale_d, at);
      F o;
      if constexpr (INT4) o = load_scales(a, a.offsets, a.offset_d, at);
      for (int m = 0; m < M; ++m) {
        I h = hi[t][m], l = lo[t][m];
        if constexpr (CORR) {
          h = sub_i(h, corr[t]);
          if constexpr (PRECISE) l = sub_i(l, corr[t]);
        }
        const I c = PRECISE ? add_i(shl8_i(h), l) : h;
        const float xs = a.xs[(m0 + m) * G + g];
        acc[t][m] = fmadd_f(to_f(c), mul_f(s, set1_f(xs)), acc[t][m]);
        if constexpr (INT4) acc[t][m] = fmadd_f(o, set1_f(a.xsum[(m0 + m) * G + g]), acc[t][m]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t n = (tile0 + t) * kTile;
    if (n >= a.N) break;
    const F b = a.bias ? load_first(a.bias + n, a.N - n) : zero_f();
    for (int m = 0; m < M; ++m) store_first(y + (m0 + m) * a.N + n, add_f(acc[t][m], b), a.N - n);
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
      constexpr int64_t step = PRECISE ? v::kPreciseChunk : v::kMaxChunk;
      for (int64_t m0 = 0; m0 < M; m0 += step)
        chunk<INT4, PRECISE, Out>(a, s0 * kBlockTiles, s1 * kBlockTiles, m0, std::min<int64_t>(step, M - m0), y);
    }
  });
}

// Per row and group: xs = absmax / (127 * 256), hi = round(x / (256 xs)), lo = round(x / xs - 256 hi).
template <typename In>
void quantize_rows(const In* x, int64_t M, int64_t K, int64_t gk, bool to_unsigned, int8_t* xh, int8_t* xl,
                   float* xs, float* xsum) {
  using namespace v;
  const int64_t G = K / gk;
  const I shift = set1_i32(to_unsigned ? 128 : 0);
  const I lo_min = set1_i32(-127), lo_max = set1_i32(127);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const In* xg = x + m * K + g * gk;
        F amax = zero_f(), sum = zero_f();
        for (int64_t k = 0; k < gk; k += 16) {
          const F e = load_f(xg + k);
          amax = max_f(amax, abs_f(e));
          sum = add_f(sum, e);
        }
        const float absmax = reduce_max(amax);
        const float inv = absmax > 0.f ? 127.f / absmax : 0.f;
        xs[m * G + g] = absmax / (127.f * 256.f);
        if (xsum) xsum[m * G + g] = reduce_add(sum);
        for (int64_t k = 0; k < gk; k += 16) {
          const F e = mul_f(load_f(xg + k), set1_f(inv));
          const I h = round_i(e);  // |e| <= 127
          const I l = min_i(max_i(round_i(mul_f(sub_f(e, to_f(h)), set1_f(256.f))), lo_min), lo_max);
          store_i8(xh + m * K + g * gk + k, add_i(h, shift));
          store_i8(xl + m * K + g * gk + k, add_i(l, shift));
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
    quantize_rows(x.data_ptr<float>(), M, K, gk, !int4 && v::kShiftedX, xh, xl, xs, xsum_p);
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, gk, !int4 && v::kShiftedX, xh, xl, xs, xsum_p);
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
