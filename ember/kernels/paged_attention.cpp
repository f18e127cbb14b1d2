// Decode attention straight from the paged KV cache: one query per sequence, keys and values read from
// their blocks in place (no gather copy of the whole context per layer and step).
//
// q: [B, H, D]; k_pool, v_pool: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks] int64
// (block i holds positions [i * block_size, (i + 1) * block_size)); key_start, key_end: [B] int64, the
// positions each query attends to (key_start > 0 for a sliding window). Returns [B, H, D] in q's dtype.
// Scores and the weighted value sum are kept in fp32. Work is split over (sequence, kv head) pairs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i) p[i] = at::BFloat16(tmp[i]);
}

template <typename T>
void attend_one(const T* q, const T* k_pool, const T* v_pool, const int64_t* table, int64_t start, int64_t end,
                int64_t block_size, int64_t kv_heads, int64_t kv_head, int64_t group, int64_t D, float scale,
                float softcap, T* out, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t n = end - start;
  scores.resize(group * n);
  acc.assign(group * D, 0.f);
  const int64_t chunks = D / 16;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = start + i;
    const T* k = k_pool + ((table[pos / block_size] * block_size + pos % block_size) * kv_heads + kv_head) * D;
    for (int64_t g = 0; g < group; ++g) {
      const T* qg = q + g * D;
      __m512 dot = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) dot = _mm512_fmadd_ps(load16(qg + c * 16), load16(k + c * 16), dot);
      float s = _mm512_reduce_add_ps(dot) * scale;
      if (softcap > 0.f) s = std::tanh(s / softcap) * softcap;
      scores[g * n + i] = s;
    }
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax per query head
    float* row = scores.data() + g * n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, row[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += (row[i] = std::exp(row[i] - mx));
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < n; ++i) row[i] *= inv;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = start + i;
    const T* v = v_pool + ((table[pos / block_size] * block_size + pos % block_size) * kv_heads + kv_head) * D;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 vv = load16(v + c * 16);
      for (int64_t g = 0; g < group; ++g) {
        float* a = acc.data() + g * D + c * 16;
        store16(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + i]), vv, load16(a)));
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < chunks; ++c) store16(out + g * D + c * 16, load16(acc.data() + g * D + c * 16));
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
         const torch::Tensor& tables, const torch::Tensor& key_start, const torch::Tensor& key_end, float scale,
         float softcap, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_pool.size(1), kv_heads = k_pool.size(2), group = H / kv_heads;
  const int64_t max_blocks = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* sp = key_start.data_ptr<int64_t>();
  const int64_t* ep = key_end.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * kv_heads, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores, acc;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / kv_heads, h = w % kv_heads;
      attend_one<T>(qp + (b * H + h * group) * D, kp, vp, tp + b * max_blocks, sp[b], ep[b], block_size, kv_heads,
                    h, group, D, scale, softcap, op + (b * H + h * group) * D, scores, acc);
    }
  });
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor tables, torch::Tensor key_start, torch::Tensor key_end,
                                     double scale, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && q.size(2) == k_pool.size(3), "bad shapes");
  TORCH_CHECK(q.size(2) % 16 == 0, "head_dim must be a multiple of 16");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && k_pool.scalar_type() == v_pool.scalar_type(), "dtypes");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "pools must be contiguous");
  q = q.contiguous();
  tables = tables.contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, k_pool, v_pool, tables, key_start, key_end, float(scale), float(softcap), out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "float32 or bfloat16 expected");
    run<at::BFloat16>(q, k_pool, v_pool, tables, key_start, key_end, float(scale), float(softcap), out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
