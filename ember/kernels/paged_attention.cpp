// Attention straight from the paged KV cache for sequences with a short block of new queries each: one for
// decode, k+1 when verifying k drafted tokens, a few for a prefill chunk after a prefix hit. Keys and values
// are read from their blocks in place (no gather copy of the context per layer and step), and every sequence
// of a step goes through one call.
//
// q: [T, H, D] with sequence b's queries in rows [query_starts[b], query_starts[b + 1]); they are the last
// n_b positions of the sequence, so its query j sits at position p = key_ends[b] - n_b + j and sees the keys
// at [max(key_starts[b], p + 1 - window), p + 1) (causal; window 0: no sliding window). k_pool, v_pool:
// [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks] int64 (block i holds positions
// [i * block_size, (i + 1) * block_size)). Returns [T, H, D] in q's dtype; scores and the weighted value sum
// are kept in fp32.
//
// The pools hold either q's dtype, or quantized codes (int8, or fp8 e4m3 bits) with one fp32 scale per
// (token, kv head) in k_scales, v_scales: [num_blocks, block_size, Hkv]. Codes are widened to fp32 in
// registers and the scale is folded in once per vector: into the score (q . k = scale * (q . codes)) and
// into the softmax weight of the value.
//
// Batch invariance: a query row's result is one fixed sequence of fp32 operations over its own keys (each dot
// product one FMA chain over the chunks then a fixed reduction tree, the softmax's max, exps and sum over its
// own range in key order, the weighted sum in key order), whatever else is in the batch, how rows are tiled
// and which thread runs them. Keys outside a row's range but inside its tile's get weight exactly 0, which
// leaves the sums' values unchanged. So a decode row (n_b = 1) gives the same result alone, in any batch, or
// next to sequences with longer query blocks.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <immintrin.h>
#include "simd_reduce.h"
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

struct Fp8E4M3 {  // the bits of one torch.float8_e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa)
  uint8_t bits;
};

// 16 consecutive elements widened to fp32 (codes without their scale).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const Fp8E4M3* p) {
  // Sign-extended, so bit 31 is the code's sign bit.
  const __m512i bits = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7F));
  // Normal codes: exponent and mantissa move into fp32's fields, the exponent rebiased from 7 to 127.
  const __m512 normal =
      _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(magnitude, 20), _mm512_set1_epi32(120 << 23)));
  // Subnormal codes (exponent field 0) are mantissa * 2^-9: computed exactly, with no fp32 denormals.
  const __mmask16 is_subnormal = _mm512_cmplt_epi32_mask(magnitude, _mm512_set1_epi32(8));
  const __m512 value =
      _mm512_mask_mul_ps(normal, is_subnormal, _mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(1.f / 512.f));
  const __m512i sign = _mm512_and_si512(bits, _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));  // NaN codes are never written
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i) p[i] = at::BFloat16(tmp[i]);
}

// Where one (sequence, kv head) pair reads: pools of element type C, scales (nullptr: unquantized).
template <typename C>
struct KVView {
  const C* k_pool;
  const C* v_pool;
  const float* k_scales;
  const float* v_scales;
  const int64_t* table;
  int64_t block_size, kv_heads, kv_head;

  // Index of (position, kv head) among the pool's head vectors (and scales).
  int64_t row(int64_t pos) const {
    return (table[pos / block_size] * block_size + pos % block_size) * kv_heads + kv_head;
  }
};

// Rows (query j, head g of the kv head's group) are numbered r = j * group + g. Scores are kept transposed,
// [key][row], so the softmax runs 16 rows per vector, each lane a row's own sequential max and sum over its
// own keys. A tile of rows shares every key and value load.
constexpr int kRowTile = 8;  // rows of a score or value-sum tile
constexpr int kWidth = 2;    // 16-float chunks of a value row accumulated together (kRowTile * kWidth registers)
// Keys go through all row tiles a block at a time, so each key and value is read from memory once and the
// other tiles find it in L1 (64 bf16 vectors of 256 are 32 KB).
constexpr int64_t kKeyBlock = 64;

// Calls f(t0, t, i0, i1) for each tile of t rows from t0 and its keys [i0, i1) within [b0, b1): from the tile's
// first row's first key to its last row's last (rows' ranges only move forward).
template <typename F>
inline void for_each_tile(const int32_t* lo, const int32_t* hi, int64_t nr, int64_t b0, int64_t b1, F&& f) {
  for (int64_t t0 = 0; t0 < nr; t0 += kRowTile) {
    const int64_t t = std::min<int64_t>(kRowTile, nr - t0);
    const int64_t i0 = std::max<int64_t>(b0, lo[t0]), i1 = std::min<int64_t>(b1, hi[t0 + t - 1]);
    if (i0 < i1) f(t0, t, i0, i1);
  }
}

// Calls f(std::integral_constant<int, t>) for a tile of t = 1..8 rows (unrolled per size).
template <typename F>
inline void with_tile(int64_t t, F&& f) {
  switch (t) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

using ember_simd::reduce16;  // simd_reduce.h: the fixed summation tree

// exp(x) for x <= 0 (a score minus its row's max): 2^k * e^r with k = round(x / ln 2), |r| <= ln 2 / 2, e^r
// by its degree-7 Taylor polynomial (truncation below 1e-8 relative, so the error is fp32 rounding, ~1 ulp),
// and scalef for 2^k (exact, underflowing to 0 below the smallest denormal). A vector instead of
// std::exp per score: at a few queries per sequence the exps cost as much as the dot products.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);  // e^-104 is below the smallest denormal; NaN stays NaN
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: k * hi is exact
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, k);
}

// scores[k * stride + j] = (q_j . key_k) * key_scales[k] for T fp32 query rows q ([T][D]) and K keys; each
// key chunk is widened once for all T rows. Every dot is one chain of FMAs over the chunks in order, then
// reduce16, whatever T and K are.
template <int T, int K, typename C>
inline void score_tile(const float* q, const C* const* keys, const float* key_scales, int64_t D, float* scores,
                       int64_t stride) {
  static_assert(T * K <= 16, "one vector of dots");
  __m512 sum[16];
  for (int x = 0; x < 16; ++x) sum[x] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    __m512 kk[K];
    for (int k = 0; k < K; ++k) kk[k] = load16(keys[k] + c);
    for (int j = 0; j < T; ++j) {
      const __m512 qq = _mm512_loadu_ps(q + j * D + c);
      for (int k = 0; k < K; ++k) sum[k * T + j] = _mm512_fmadd_ps(qq, kk[k], sum[k * T + j]);
    }
  }
  alignas(64) float dots[16];
  _mm512_store_ps(dots, reduce16(sum));
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < T; ++j) scores[k * stride + j] = dots[k * T + j] * key_scales[k];
}

// out[j][c0, c0 + 16 W) += sum_i weights[i * stride + j] * v_i[c0, c0 + 16 W) for T rows, i in [0, n) in order.
// (Continuing a sum through fp32 memory is exact: the same chain of FMAs as in registers.)
template <int T, int W, typename C>
inline void weighted_sum_tile(const float* weights, int64_t stride, int64_t n, const C* v_pool, const int64_t* rows,
                              int64_t D, int64_t c0, float* out) {
  __m512 acc[T][W];
  for (int j = 0; j < T; ++j)
    for (int w = 0; w < W; ++w) acc[j][w] = _mm512_loadu_ps(out + j * D + c0 + 16 * w);
  for (int64_t i = 0; i < n; ++i) {
    const C* v = v_pool + rows[i] * D + c0;
    __m512 vv[W];
    for (int w = 0; w < W; ++w) vv[w] = load16(v + 16 * w);
    for (int j = 0; j < T; ++j) {
      const __m512 weight = _mm512_set1_ps(weights[i * stride + j]);
      for (int w = 0; w < W; ++w) acc[j][w] = _mm512_fmadd_ps(weight, vv[w], acc[j][w]);
    }
  }
  for (int j = 0; j < T; ++j)
    for (int w = 0; w < W; ++w) store16(out + j * D + c0 + 16 * w, acc[j][w]);
}

// One unit of work: rows [r0, r1) of one (sequence, kv head) pair.
struct Item {
  int64_t b, h, r0, r1, cost;
};

// Where one sequence's queries sit and which keys each sees.
struct Queries {
  int64_t first_pos;  // position of query 0
  int64_t key_start, window, group;
  int64_t lo(int64_t r) const {  // first key row r sees
    const int64_t hi_r = hi(r);
    return window > 0 ? std::max(key_start, hi_r - window) : key_start;
  }
  int64_t hi(int64_t r) const { return first_pos + r / group + 1; }  // one past its last key
};

struct Scratch {  // per-thread buffers, reused across items
  std::vector<int64_t> rows;
  std::vector<float> q, key_scales, scores, out;
  std::vector<int32_t> lo, hi;
  std::vector<uint32_t> packed_q;  // query rows as AMX tiles
};

// Scores of rows [0, nr) (s.q) against keys [0, n) (s.rows), stored transposed in s.scores ([n][stride]).
template <typename C>
void compute_scores(const KVView<C>& kv, int64_t nr, int64_t n, int64_t stride, int64_t D, float scale,
                    Scratch& s) {
  s.key_scales.resize(n);
  for (int64_t i = 0; i < n; ++i) s.key_scales[i] = kv.k_scales ? kv.k_scales[s.rows[i]] * scale : scale;
  auto tile_scores = [&](int64_t t0, int64_t t, int64_t i0, int64_t i1) {
    with_tile(t, [&](auto tile) {
      constexpr int T = decltype(tile)::value;
      auto keys = [&](auto count, int64_t i) {
        constexpr int K = decltype(count)::value;
        const C* k_rows[K];
        for (int k = 0; k < K; ++k) k_rows[k] = kv.k_pool + s.rows[i + k] * D;
        score_tile<T, K>(s.q.data() + t0 * D, k_rows, s.key_scales.data() + i, D, s.scores.data() + i * stride + t0,
                         stride);
      };
      constexpr int kKeys = T <= 4 ? 4 : 2;
      int64_t i = i0;
      for (; i + kKeys <= i1; i += kKeys) keys(std::integral_constant<int, kKeys>{}, i);
      for (; i < i1; ++i) keys(std::integral_constant<int, 1>{}, i);
    });
  };
  for (int64_t b0 = 0; b0 < n; b0 += kKeyBlock)
    for_each_tile(s.lo.data(), s.hi.data(), nr, b0, std::min(n, b0 + kKeyBlock), tile_scores);
}

void cap_scores(float softcap, int64_t nr, int64_t n, int64_t stride, Scratch& s) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < nr; ++r) {
      float& x = s.scores[i * stride + r];
      x = std::tanh(x / softcap) * softcap;
    }
}

// s.out ([nr][D]) = the rows' softmax weights (s.scores) times the values.
template <typename C>
void weighted_sums(const KVView<C>& kv, int64_t nr, int64_t n, int64_t stride, int64_t D, Scratch& s) {
  s.out.assign(nr * D, 0.f);
  auto tile_sums = [&](int64_t t0, int64_t t, int64_t i0, int64_t i1) {
    with_tile(t, [&](auto tile) {
      constexpr int T = decltype(tile)::value;
      const float* weights = s.scores.data() + i0 * stride + t0;
      const int64_t* rows = s.rows.data() + i0;
      float* acc = s.out.data() + t0 * D;
      int64_t c0 = 0;
      for (; c0 + 16 * kWidth <= D; c0 += 16 * kWidth)
        weighted_sum_tile<T, kWidth>(weights, stride, i1 - i0, kv.v_pool, rows, D, c0, acc);
      for (; c0 < D; c0 += 16) weighted_sum_tile<T, 1>(weights, stride, i1 - i0, kv.v_pool, rows, D, c0, acc);
    });
  };
  for (int64_t b0 = 0; b0 < n; b0 += kKeyBlock)
    for_each_tile(s.lo.data(), s.hi.data(), nr, b0, std::min(n, b0 + kKeyBlock), tile_sums);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// bf16 queries over a bf16 cache: the scores are a small matrix product, which AMX computes as 16 keys x 16 rows
// x 32 dims per instruction (TDPBF16PS: exact bf16 products summed in fp32 in dim order), several times the
// rate of the AVX-512 dot products. Linux hands the tile registers out only on request, once per process.
bool amx_available() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {  // the 64-byte operand of LDTILECFG
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile 0 holds 16 keys, tile 1 a query tile, tiles 2..7 the scores of up to 6 groups of 16 rows (tile numbers
// are immediates).
#define EMBER_C_TILES(op) \
  switch (g) {            \
    case 0: op(2); break; \
    case 1: op(3); break; \
    case 2: op(4); break; \
    case 3: op(5); break; \
    case 4: op(6); break; \
    default: op(7); break; \
  }
inline void zero_scores(int64_t g) {
#define EMBER_ZERO(t) _tile_zero(t)
  EMBER_C_TILES(EMBER_ZERO)
}
inline void add_scores(int64_t g) {
#define EMBER_DOT(t) _tile_dpbf16ps(t, 0, 1)
  EMBER_C_TILES(EMBER_DOT)
}
inline void store_scores(int64_t g, float* out, int64_t stride_bytes) {
#define EMBER_STORE(t) _tile_stored(t, out, stride_bytes)
  EMBER_C_TILES(EMBER_STORE)
}
constexpr int64_t kAmxGroups = 6;

// Query rows as B tiles: per 16-row group g and 32-dim chunk c, 16 x 16 bf16 pairs,
// packed[((g * chunks + c) * 16 + p) * 16 + j] = dims (2p, 2p + 1) of chunk c of row g * 16 + j (0 past nr).
template <typename RowPtr>
void pack_queries(RowPtr row, int64_t nr, int64_t groups, int64_t D, std::vector<uint32_t>& packed) {
  const int64_t chunks = D / 32;
  packed.assign(groups * chunks * 256, 0u);
  for (int64_t r = 0; r < nr; ++r) {
    const uint32_t* pairs = reinterpret_cast<const uint32_t*>(row(r));
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t p = 0; p < 16; ++p) packed[(((r / 16) * chunks + c) * 16 + p) * 16 + r % 16] = pairs[c * 16 + p];
  }
}

// s.scores[i * stride + r] = (q_r . key_i) * scale for keys [0, n16) from position `first` (a multiple of 16,
// so each 16 keys are consecutive slots of one block) and rows [0, stride).
void amx_tiles(const KVView<at::BFloat16>& kv, int64_t first, int64_t n16, int64_t stride, int64_t D, float scale,
               Scratch& s) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  const int64_t chunks = D / 32, groups = stride / 16, key_stride = kv.kv_heads * D * 2;
  for (int64_t i = 0; i < n16; i += 16) {
    const at::BFloat16* keys = kv.k_pool + kv.row(first + i) * D;
    for (int64_t g0 = 0; g0 < groups; g0 += kAmxGroups) {
      const int64_t count = std::min(kAmxGroups, groups - g0);
      for (int64_t g = 0; g < count; ++g) zero_scores(g);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(0, keys + c * 32, key_stride);
        for (int64_t g = 0; g < count; ++g) {
          _tile_loadd(1, s.packed_q.data() + ((g0 + g) * chunks + c) * 256, 64);
          add_scores(g);
        }
      }
      for (int64_t g = 0; g < count; ++g) store_scores(g, s.scores.data() + i * stride + (g0 + g) * 16, stride * 4);
    }
  }
  _tile_release();
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t e = 0; e < n16 * stride; e += 16)
    _mm512_storeu_ps(s.scores.data() + e, _mm512_mul_ps(_mm512_loadu_ps(s.scores.data() + e), factor));
}

// Scores through AMX where it applies (bf16 queries and cache, D a multiple of 32, blocks of whole 16-key tiles);
// false where it does not. row(r): query row r.
template <typename Q, typename C, typename RowPtr>
bool amx_scores(RowPtr row, const KVView<C>& kv, int64_t nr, int64_t first, int64_t n16, int64_t stride, int64_t D,
                float scale, Scratch& s) {
  if constexpr (std::is_same_v<Q, at::BFloat16> && std::is_same_v<C, at::BFloat16>) {
    if (D % 32 != 0 || kv.block_size % 16 != 0 || !amx_available()) return false;
    pack_queries(row, nr, stride / 16, D, s.packed_q);
    amx_tiles(kv, first, n16, stride, D, scale, s);
    return true;
  }
  return false;
}
#else
template <typename Q, typename C, typename RowPtr>
bool amx_scores(RowPtr, const KVView<C>&, int64_t, int64_t, int64_t, int64_t, int64_t, float, Scratch&) {
  return false;
}
#endif

// Scores to softmax weights, 16 rows per vector: each lane takes its row's max, exps and sum over the row's own
// keys in key order; other keys get weight 0. A value's scale is folded into its weight.
void softmax(const float* v_scales, int64_t nr, int64_t n, int64_t stride, Scratch& s) {
  for (int64_t r0 = 0; r0 < nr; r0 += 16) {
    const __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(16, nr - r0)) - 1);
    const __m512i lo = _mm512_loadu_si512(s.lo.data() + r0), hi = _mm512_loadu_si512(s.hi.data() + r0);
    const int64_t i0 = s.lo[r0], i1 = s.hi[std::min(nr, r0 + 16) - 1];
    auto visible = [&](int64_t i) {
      const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(i));
      return static_cast<__mmask16>(live & _mm512_cmple_epi32_mask(lo, key) & _mm512_cmplt_epi32_mask(key, hi));
    };
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = i0; i < i1; ++i)
      mx = _mm512_mask_max_ps(mx, visible(i), mx, _mm512_loadu_ps(s.scores.data() + i * stride + r0));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = i0; i < i1; ++i) {
      float* x = s.scores.data() + i * stride + r0;
      const __mmask16 m = visible(i);
      const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(x), mx)));
      sum = _mm512_mask_add_ps(sum, m, sum, e);
      _mm512_storeu_ps(x, e);
    }
    const __m512 inv = _mm512_maskz_div_ps(live, _mm512_set1_ps(1.f), sum);
    for (int64_t i = i0; i < i1; ++i) {
      float* x = s.scores.data() + i * stride + r0;
      const __m512 factor = v_scales ? _mm512_mul_ps(inv, _mm512_set1_ps(v_scales[s.rows[i]])) : inv;
      _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_loadu_ps(x), factor));
    }
  }
}

// Rows [r0, r1) of one (sequence, kv head) pair. q_seq, out_seq point at the sequence's query 0, head 0;
// the rows' keys span [lo(r0), hi(r1 - 1)), indexed from lo(r0) in s.rows and s.scores.
template <typename Q, typename C>
void attend_rows(const Q* q_seq, Q* out_seq, int64_t H, const KVView<C>& kv, const Queries& qs, int64_t r0,
                 int64_t r1, int64_t D, float scale, float softcap, Scratch& s) {
  // Keys are indexed from a multiple of 16 at or before the first one seen, for AMX's 16-key tiles (when those
  // stay within the first key's block).
  const int64_t align = kv.block_size % 16 == 0 ? 16 : 1;
  const int64_t nr = r1 - r0, first = qs.lo(r0) / align * align, n = qs.hi(r1 - 1) - first, n16 = (n + 15) / 16 * 16;
  const int64_t stride = (nr + 15) / 16 * 16;  // rows padded to whole vectors
  const int64_t head0 = kv.kv_head * qs.group;
  auto q_offset = [&](int64_t r) { return ((r / qs.group) * H + head0 + r % qs.group) * D; };
  s.rows.resize(n);
  for (int64_t i = 0; i < n; ++i) s.rows[i] = kv.row(first + i);
  s.lo.assign(stride, 0);
  s.hi.assign(stride, 0);  // padding rows see no key
  for (int64_t r = 0; r < nr; ++r) {
    s.lo[r] = static_cast<int32_t>(qs.lo(r0 + r) - first);
    s.hi[r] = static_cast<int32_t>(qs.hi(r0 + r) - first);
  }
  s.scores.resize(n16 * stride);
  auto row = [&](int64_t r) { return q_seq + q_offset(r0 + r); };
  if (!amx_scores<Q>(row, kv, nr, first, n16, stride, D, scale, s)) {
    s.q.resize(nr * D);
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t e = 0; e < D; e += 16) store16(s.q.data() + r * D + e, load16(q_seq + q_offset(r0 + r) + e));
    compute_scores(kv, nr, n, stride, D, scale, s);
  }
  if (softcap > 0.f) cap_scores(softcap, nr, n, stride, s);
  softmax(kv.v_scales, nr, n, stride, s);
  weighted_sums(kv, nr, n, stride, D, s);
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t e = 0; e < D; e += 16) store16(out_seq + q_offset(r0 + r) + e, load16(s.out.data() + r * D + e));
}

// Splitting a pair costs a parallel region (microseconds on an idle machine, far more on a shared one) and a
// second read of its keys; below this many (row, key) scores it does not pay.
constexpr int64_t kSplitCost = 8192;

// The step's work: each (sequence, kv head) pair's rows, split into pieces when there are fewer pairs than
// threads (one sequence verifying drafts) and the pair is big enough; longest first so the threads finish
// together.
std::vector<Item> plan(const int64_t* query_starts, int64_t B, int64_t kv_heads, int64_t group,
                       const int64_t* key_ends, int64_t threads) {
  const int64_t most = std::max<int64_t>(1, (threads + B * kv_heads - 1) / (B * kv_heads));
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t rows = (query_starts[b + 1] - query_starts[b]) * group;
    const int64_t pieces = rows * key_ends[b] >= kSplitCost ? most : 1;
    const int64_t step = std::max<int64_t>(1, (rows + pieces - 1) / pieces);
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t r0 = 0; r0 < rows; r0 += step) {
        const int64_t r1 = std::min(rows, r0 + step);
        items.push_back({b, h, r0, r1, (r1 - r0) * key_ends[b]});
      }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

template <typename Q, typename C>
void run(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool, const float* k_scales,
         const float* v_scales, const torch::Tensor& tables, const torch::Tensor& query_starts,
         const torch::Tensor& key_starts, const torch::Tensor& key_ends, int64_t window, float scale, float softcap,
         const torch::Tensor& out) {
  const int64_t B = tables.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_pool.size(1), kv_heads = k_pool.size(2), group = H / kv_heads;
  const int64_t max_blocks = tables.size(1);
  const Q* qp = q.data_ptr<Q>();
  const C* kp = static_cast<const C*>(k_pool.data_ptr());
  const C* vp = static_cast<const C*>(v_pool.data_ptr());
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* qsp = query_starts.data_ptr<int64_t>();
  const int64_t* sp = key_starts.data_ptr<int64_t>();
  const int64_t* ep = key_ends.data_ptr<int64_t>();
  Q* op = out.data_ptr<Q>();
  const std::vector<Item> items = plan(qsp, B, kv_heads, group, ep, at::get_num_threads());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {  // one index per thread; items handed out in order
    Scratch scratch;
    for (int64_t w = next++; w < static_cast<int64_t>(items.size()); w = next++) {
      const Item& it = items[w];
      const int64_t n_b = qsp[it.b + 1] - qsp[it.b];
      const KVView<C> kv{kp, vp, k_scales, v_scales, tp + it.b * max_blocks, block_size, kv_heads, it.h};
      const Queries qs{ep[it.b] - n_b, sp[it.b], window, group};
      attend_rows<Q, C>(qp + qsp[it.b] * H * D, op + qsp[it.b] * H * D, H, kv, qs, it.r0, it.r1, D, scale, softcap,
                        scratch);
    }
  });
}

const float* scales_ptr(const std::optional<torch::Tensor>& scales, const torch::Tensor& pool) {
  TORCH_CHECK(scales.has_value(), "a quantized pool needs its scales");
  TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous(), "scales must be contiguous float32");
  TORCH_CHECK(scales->dim() == 3 && scales->size(0) == pool.size(0) && scales->size(1) == pool.size(1) &&
                  scales->size(2) == pool.size(2),
              "scales must be [num_blocks, block_size, kv_heads]");
  return scales->data_ptr<float>();
}

// Picks the cache element type for a query type Q.
template <typename Q, typename... Args>
void dispatch_cache(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                    const std::optional<torch::Tensor>& k_scales, const std::optional<torch::Tensor>& v_scales,
                    const Args&... args) {
  const auto kind = k_pool.scalar_type();
  if (kind == q.scalar_type()) {
    run<Q, Q>(q, k_pool, v_pool, nullptr, nullptr, args...);
    return;
  }
  const float* ks = scales_ptr(k_scales, k_pool);
  const float* vs = scales_ptr(v_scales, v_pool);
  if (kind == at::kChar) {
    run<Q, int8_t>(q, k_pool, v_pool, ks, vs, args...);
  } else {
    TORCH_CHECK(kind == at::kFloat8_e4m3fn, "KV pool: q's dtype, int8 or float8_e4m3fn expected");
    run<Q, Fp8E4M3>(q, k_pool, v_pool, ks, vs, args...);
  }
}

// Every query sees at least one key, and every block it reads is in the table and the pool.
void check_ranges(const torch::Tensor& tables, const torch::Tensor& query_starts, const torch::Tensor& key_starts,
                  const torch::Tensor& key_ends, int64_t tokens, int64_t block_size, int64_t num_blocks) {
  const int64_t B = tables.size(0), max_blocks = tables.size(1);
  const int64_t* qs = query_starts.data_ptr<int64_t>();
  const int64_t* sp = key_starts.data_ptr<int64_t>();
  const int64_t* ep = key_ends.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  TORCH_CHECK(qs[0] == 0 && qs[B] == tokens, "query_starts must run from 0 to the number of query rows");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = qs[b + 1] - qs[b];
    TORCH_CHECK(n >= 0 && sp[b] >= 0 && sp[b] <= ep[b] - n, "sequence ", b, ": a query would see no key");
    const int64_t used = (ep[b] + block_size - 1) / block_size;
    TORCH_CHECK(used <= max_blocks, "sequence ", b, ": block table shorter than its keys");
    for (int64_t i = sp[b] / block_size; i < used; ++i)
      TORCH_CHECK(tp[b * max_blocks + i] >= 0 && tp[b * max_blocks + i] < num_blocks, "block id out of range");
  }
}

// Quantize-and-write of new keys or values, the same arithmetic as KVQuantScheme.quantize (so results are
// bitwise equal): one pass per head vector instead of ~10 PyTorch ops per layer and step.
template <typename X, typename C, typename Encode>
void quantize_rows(const X* x, const int64_t* slots, int64_t T, int64_t kv_heads, int64_t D, C* codes, float* scales,
                   float max_code, Encode encode) {
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const X* v = x + (t * kv_heads + h) * D;
        float absmax = 0.f;
        for (int64_t d = 0; d < D; ++d) absmax = std::max(absmax, std::abs(static_cast<float>(v[d])));
        const float scale = absmax / max_code;
        const float divisor = scale > 0.f ? scale : 1.f;  // an all-zero vector keeps scale 0
        const int64_t row = slots[t] * kv_heads + h;
        scales[row] = scale;
        C* out = codes + row * D;
        for (int64_t d = 0; d < D; ++d)
          out[d] = encode(std::min(std::max(static_cast<float>(v[d]) / divisor, -max_code), max_code));
      }
    }
  });
}

template <typename X>
void quantize_write_as(const torch::Tensor& x, const torch::Tensor& slots, torch::Tensor& codes,
                       torch::Tensor& scales) {
  const int64_t T = x.size(0), kv_heads = x.size(1), D = x.size(2);
  const X* xp = x.data_ptr<X>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  float* scp = scales.data_ptr<float>();
  if (codes.scalar_type() == at::kChar) {
    quantize_rows(xp, sp, T, kv_heads, D, codes.data_ptr<int8_t>(), scp, 127.f,
                  [](float y) { return static_cast<int8_t>(std::nearbyint(y)); });  // ties to even, as torch.round
  } else {
    TORCH_CHECK(codes.scalar_type() == at::kFloat8_e4m3fn, "int8 or float8_e4m3fn codes expected");
    quantize_rows(xp, sp, T, kv_heads, D, static_cast<Fp8E4M3*>(codes.data_ptr()), scp, 448.f,
                  [](float y) { return Fp8E4M3{c10::Float8_e4m3fn(y).x}; });
  }
}

}  // namespace

// x: [T, Hkv, D] new keys or values; slots: [T] flat positions (block * block_size + offset) in
// codes [num_blocks, block_size, Hkv, D] and scales [num_blocks, block_size, Hkv].
void quantize_write(torch::Tensor x, torch::Tensor slots, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 3 && codes.dim() == 4 && x.size(1) == codes.size(2) && x.size(2) == codes.size(3), "shapes");
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kFloat, "pools");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.size(0) == x.size(0), "one int64 slot per token");
  x = x.contiguous();
  slots = slots.contiguous();
  const int64_t num_slots = codes.size(0) * codes.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.numel(); ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot out of range");
  if (x.scalar_type() == at::kFloat) {
    quantize_write_as<float>(x, slots, codes, scales);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "float32 or bfloat16 keys/values expected");
    quantize_write_as<at::BFloat16>(x, slots, codes, scales);
  }
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor tables,
                              torch::Tensor query_starts, torch::Tensor key_starts, torch::Tensor key_ends,
                              double scale, int64_t window, double softcap, std::optional<torch::Tensor> k_scales,
                              std::optional<torch::Tensor> v_scales) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && q.size(2) == k_pool.size(3), "bad shapes");
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes(), "key and value pools differ in shape");
  TORCH_CHECK(q.size(2) % 16 == 0, "head_dim must be a multiple of 16");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type(), "key and value pools differ in dtype");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "pools must be contiguous");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kLong, "block tables: [B, max_blocks] int64");
  const int64_t B = tables.size(0);
  for (const auto* t : {&query_starts, &key_starts, &key_ends})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1, "int64 query starts and key ranges");
  TORCH_CHECK(query_starts.size(0) == B + 1 && key_starts.size(0) == B && key_ends.size(0) == B,
              "query_starts: [B + 1], key_starts and key_ends: [B]");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  q = q.contiguous();
  tables = tables.contiguous();
  query_starts = query_starts.contiguous();
  key_starts = key_starts.contiguous();
  key_ends = key_ends.contiguous();
  check_ranges(tables, query_starts, key_starts, key_ends, q.size(0), k_pool.size(1), k_pool.size(0));
  auto out = torch::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    dispatch_cache<float>(q, k_pool, v_pool, k_scales, v_scales, tables, query_starts, key_starts, key_ends, window,
                          float(scale), float(softcap), out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "float32 or bfloat16 queries expected");
    dispatch_cache<at::BFloat16>(q, k_pool, v_pool, k_scales, v_scales, tables, query_starts, key_starts, key_ends,
                                 window, float(scale), float(softcap), out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "attention of short query blocks over a paged KV cache",
        pybind11::arg("q"), pybind11::arg("k_pool"), pybind11::arg("v_pool"), pybind11::arg("tables"),
        pybind11::arg("query_starts"), pybind11::arg("key_starts"), pybind11::arg("key_ends"), pybind11::arg("scale"),
        pybind11::arg("window"), pybind11::arg("softcap"), pybind11::arg("k_scales") = pybind11::none(),
        pybind11::arg("v_scales") = pybind11::none());
  m.def("quantize_write", &quantize_write, "quantize keys or values into a paged int8/fp8 pool and its scales");
}
