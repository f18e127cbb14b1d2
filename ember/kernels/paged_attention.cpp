// Decode attention straight from the paged KV cache: one query per sequence, keys and values read from
// their blocks in place (no gather copy of the whole context per layer and step).
//
// q: [B, H, D]; k_pool, v_pool: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks] int64
// (block i holds positions [i * block_size, (i + 1) * block_size)); key_start, key_end: [B] int64, the
// positions each query attends to (key_start > 0 for a sliding window). Returns [B, H, D] in q's dtype.
// Scores and the weighted value sum are kept in fp32. Work is split over (sequence, kv head) pairs.
//
// The pools hold either q's dtype, or quantized codes (int8, or fp8 e4m3 bits) with one fp32 scale per
// (token, kv head) in k_scales, v_scales: [num_blocks, block_size, Hkv]. Codes are widened to fp32 in
// registers and the scale is folded in once per vector: into the score (q . k = scale * (q . codes)) and
// into the softmax weight of the value.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

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

constexpr int kTile = 4;   // query heads of one KV head handled together: their sums stay in registers
constexpr int kWidth = 4;  // 16-float chunks of a value row accumulated together (kTile * kWidth registers)

// Calls f(std::integral_constant<int, t>) for a tile of t = 1..kTile query heads (unrolled per size).
template <typename F>
inline void with_tile(int64_t t, F&& f) {
  switch (t) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// dots[j] = q_j . k for T fp32 query rows q ([T][D]); each key chunk is widened once for all T heads.
template <int T, typename C>
inline void dot_tile(const float* q, const C* k, int64_t D, float* dots) {
  __m512 sum[T];
  for (int j = 0; j < T; ++j) sum[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    const __m512 kk = load16(k + c);
    for (int j = 0; j < T; ++j) sum[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * D + c), kk, sum[j]);
  }
  for (int j = 0; j < T; ++j) dots[j] = _mm512_reduce_add_ps(sum[j]);
}

// out[j][c0, c0 + 16 W) = sum_i weights[j][i] * v_i[c0, c0 + 16 W) for T heads; weights: [T][n].
template <int T, int W, typename C>
inline void weighted_sum_tile(const float* weights, int64_t n, const C* v_pool, const int64_t* rows, int64_t D,
                              int64_t c0, float* out) {
  __m512 acc[T][W];
  for (int j = 0; j < T; ++j)
    for (int w = 0; w < W; ++w) acc[j][w] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const C* v = v_pool + rows[i] * D + c0;
    for (int w = 0; w < W; ++w) {
      const __m512 vv = load16(v + 16 * w);
      for (int j = 0; j < T; ++j) acc[j][w] = _mm512_fmadd_ps(_mm512_set1_ps(weights[j * n + i]), vv, acc[j][w]);
    }
  }
  for (int j = 0; j < T; ++j)
    for (int w = 0; w < W; ++w) store16(out + j * D + c0 + 16 * w, acc[j][w]);
}

struct Scratch {  // per-thread buffers, reused across (sequence, kv head) pairs
  std::vector<int64_t> rows;
  std::vector<float> q, scores, out;
};

template <typename Q, typename C>
void attend_one(const Q* q, const KVView<C>& kv, int64_t start, int64_t end, int64_t group, int64_t D, float scale,
                float softcap, Q* out, Scratch& s) {
  const int64_t n = end - start;
  s.rows.resize(n);
  for (int64_t i = 0; i < n; ++i) s.rows[i] = kv.row(start + i);
  s.q.resize(group * D);
  for (int64_t e = 0; e < group * D; e += 16) store16(s.q.data() + e, load16(q + e));
  s.scores.resize(group * n);
  s.out.resize(group * D);
  for (int64_t g0 = 0; g0 < group; g0 += kTile) {
    with_tile(std::min<int64_t>(kTile, group - g0), [&](auto tile) {
      constexpr int T = decltype(tile)::value;
      float dots[T];
      for (int64_t i = 0; i < n; ++i) {
        dot_tile<T>(s.q.data() + g0 * D, kv.k_pool + s.rows[i] * D, D, dots);
        const float key_scale = kv.k_scales ? kv.k_scales[s.rows[i]] * scale : scale;
        for (int j = 0; j < T; ++j) {
          float score = dots[j] * key_scale;
          if (softcap > 0.f) score = std::tanh(score / softcap) * softcap;
          s.scores[(g0 + j) * n + i] = score;
        }
      }
    });
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax per query head; a value's scale folds into its weight
    float* row = s.scores.data() + g * n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, row[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += (row[i] = std::exp(row[i] - mx));
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < n; ++i) row[i] *= kv.v_scales ? inv * kv.v_scales[s.rows[i]] : inv;
  }
  for (int64_t g0 = 0; g0 < group; g0 += kTile) {
    with_tile(std::min<int64_t>(kTile, group - g0), [&](auto tile) {
      constexpr int T = decltype(tile)::value;
      const float* weights = s.scores.data() + g0 * n;
      float* acc = s.out.data() + g0 * D;
      int64_t c0 = 0;
      for (; c0 + 16 * kWidth <= D; c0 += 16 * kWidth)
        weighted_sum_tile<T, kWidth>(weights, n, kv.v_pool, s.rows.data(), D, c0, acc);
      for (; c0 < D; c0 += 16) weighted_sum_tile<T, 1>(weights, n, kv.v_pool, s.rows.data(), D, c0, acc);
    });
  }
  for (int64_t e = 0; e < group * D; e += 16) store16(out + e, load16(s.out.data() + e));
}

template <typename Q, typename C>
void run(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool, const float* k_scales,
         const float* v_scales, const torch::Tensor& tables, const torch::Tensor& key_start,
         const torch::Tensor& key_end, float scale, float softcap, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_pool.size(1), kv_heads = k_pool.size(2), group = H / kv_heads;
  const int64_t max_blocks = tables.size(1);
  const Q* qp = q.data_ptr<Q>();
  const C* kp = static_cast<const C*>(k_pool.data_ptr());
  const C* vp = static_cast<const C*>(v_pool.data_ptr());
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* sp = key_start.data_ptr<int64_t>();
  const int64_t* ep = key_end.data_ptr<int64_t>();
  Q* op = out.data_ptr<Q>();
  at::parallel_for(0, B * kv_heads, 1, [&](int64_t w0, int64_t w1) {
    Scratch scratch;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / kv_heads, h = w % kv_heads;
      const KVView<C> kv{kp, vp, k_scales, v_scales, tp + b * max_blocks, block_size, kv_heads, h};
      attend_one<Q, C>(qp + (b * H + h * group) * D, kv, sp[b], ep[b], group, D, scale, softcap,
                       op + (b * H + h * group) * D, scratch);
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
template <typename Q>
void dispatch_cache(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                    const std::optional<torch::Tensor>& k_scales, const std::optional<torch::Tensor>& v_scales,
                    const torch::Tensor& tables, const torch::Tensor& key_start, const torch::Tensor& key_end,
                    float scale, float softcap, torch::Tensor& out) {
  const auto kind = k_pool.scalar_type();
  if (kind == q.scalar_type()) {
    run<Q, Q>(q, k_pool, v_pool, nullptr, nullptr, tables, key_start, key_end, scale, softcap, out);
    return;
  }
  const float* ks = scales_ptr(k_scales, k_pool);
  const float* vs = scales_ptr(v_scales, v_pool);
  if (kind == at::kChar) {
    run<Q, int8_t>(q, k_pool, v_pool, ks, vs, tables, key_start, key_end, scale, softcap, out);
  } else {
    TORCH_CHECK(kind == at::kFloat8_e4m3fn, "KV pool: q's dtype, int8 or float8_e4m3fn expected");
    run<Q, Fp8E4M3>(q, k_pool, v_pool, ks, vs, tables, key_start, key_end, scale, softcap, out);
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

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor tables, torch::Tensor key_start, torch::Tensor key_end,
                                     double scale, double softcap, std::optional<torch::Tensor> k_scales,
                                     std::optional<torch::Tensor> v_scales) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && q.size(2) == k_pool.size(3), "bad shapes");
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes(), "key and value pools differ in shape");
  TORCH_CHECK(q.size(2) % 16 == 0, "head_dim must be a multiple of 16");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type(), "key and value pools differ in dtype");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "pools must be contiguous");
  TORCH_CHECK(key_start.scalar_type() == at::kLong && key_end.scalar_type() == at::kLong, "int64 key ranges");
  q = q.contiguous();
  tables = tables.contiguous();
  key_start = key_start.contiguous();
  key_end = key_end.contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    dispatch_cache<float>(q, k_pool, v_pool, k_scales, v_scales, tables, key_start, key_end, float(scale),
                          float(softcap), out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "float32 or bfloat16 queries expected");
    dispatch_cache<at::BFloat16>(q, k_pool, v_pool, k_scales, v_scales, tables, key_start, key_end, float(scale),
                                 float(softcap), out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache",
        pybind11::arg("q"), pybind11::arg("k_pool"), pybind11::arg("v_pool"), pybind11::arg("tables"),
        pybind11::arg("key_start"), pybind11::arg("key_end"), pybind11::arg("scale"), pybind11::arg("softcap"),
        pybind11::arg("k_scales") = pybind11::none(), pybind11::arg("v_scales") = pybind11::none());
  m.def("quantize_write", &quantize_write, "quantize keys or values into a paged int8/fp8 pool and its scales");
}
