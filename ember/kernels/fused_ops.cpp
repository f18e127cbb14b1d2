// The small per-token ops of a decoder step, each as one call: RMSNorm, the attention prologue (QK-norm +
// rotary), and greedy argmax over the vocabulary.
//
// At batch-1 decode a decoder layer's matmuls take a few microseconds each, and PyTorch's RMSNorm is ~10
// small ops (cast, pow, mean, add, rsqrt, mul, cast) costing ~11 us on 2 cores; rotary is another ~7 us
// per tensor, argmax over 262k logits ~140 us. These kernels do the same arithmetic
// in one pass over each row, in float32, rounding to the activation dtype exactly where the PyTorch path
// (ember/kernels/fused_ops.py's fallback) rounds:
//   gemma (unit offset):  y = round(x * rsqrt(mean(x^2) + eps) * (1 + w))
//   llama:                y = round(w * round(x * rsqrt(mean(x^2) + eps)))
//   rotary (signed sin):  y = round(round(x * cos) + swap_halves(x) * sin)
// Each row is computed by the same code whatever the batch, so results do not depend on batch size.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }  // RNE for bf16

// Sum of squares with 16 independent partial sums (vectorizes without reassociating a single chain).
template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) {
      float v = to_float(x[i + j]);
      acc[j] += v * v;
    }
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += to_float(x[i]) * to_float(x[i]);
  return s;
}

// Normalize one row into float `out` (already rounded to T, as the PyTorch path's outputs are).
template <typename T>
inline void norm_row(const T* x, const float* w, int64_t d, float eps, bool gemma, float* out) {
  const float inv = 1.f / std::sqrt(sum_squares(x, d) / static_cast<float>(d) + eps);
  if (gemma) {
    for (int64_t i = 0; i < d; ++i) out[i] = round_to<T>(to_float(x[i]) * inv * w[i]);
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = round_to<T>(w[i] * round_to<T>(to_float(x[i]) * inv));
  }
}

// Rotate one head: in = [x1, x2] (float), out = round(round(in * cos) + [x2, x1] * sin).
template <typename T>
inline void rope_row(const float* in, const T* cos, const T* sin, int64_t d, T* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float swapped = in[i < half ? i + half : i - half];
    out[i] = static_cast<T>(round_to<T>(in[i] * to_float(cos[i])) + swapped * to_float(sin[i]));
  }
}

template <typename T>
void rms_norm_impl(const torch::Tensor& x, const torch::Tensor& w, float eps, bool gemma, torch::Tensor& y) {
  const int64_t rows = x.size(0), d = x.size(1), stride = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(d);
    for (int64_t r = r0; r < r1; ++r) {
      norm_row(xp + r * stride, wp, d, eps, gemma, buf.data());
      for (int64_t i = 0; i < d; ++i) yp[r * d + i] = static_cast<T>(buf[i]);
    }
  });
}

template <typename T>
void qk_rope_impl(const torch::Tensor& x, const torch::Tensor* w, float eps, bool gemma, const torch::Tensor& cos,
                  const torch::Tensor& sin, torch::Tensor& y) {
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2);
  const int64_t st = x.stride(0), sh = x.stride(1);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const float* wp = w ? w->data_ptr<float>() : nullptr;
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(d);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const T* row = xp + t * st + h * sh;
        if (wp) {
          norm_row(row, wp, d, eps, gemma, buf.data());
        } else {
          for (int64_t i = 0; i < d; ++i) buf[i] = to_float(row[i]);
        }
        rope_row(buf.data(), cp + t * d, sp + t * d, d, yp + (t * heads + h) * d);
      }
    }
  });
}

// Index of the first maximum of one float32 row (the first NaN if there is one, as torch.argmax).
int64_t argmax_row(const float* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i best_idx = _mm512_setzero_si512();
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 nan = 0;
  int64_t i = 0;
  if (n < (int64_t(1) << 31)) {
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strict: each lane keeps its first max
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      best = _mm512_mask_mov_ps(best, gt, v);
      best_idx = _mm512_mask_mov_epi32(best_idx, gt, idx);
      idx = _mm512_add_epi32(idx, step);
    }
  }
  if (nan) i = 0;  // rare: find the first NaN with the scalar loop below
  float lanes[16];
  int32_t lane_idx[16];
  _mm512_storeu_ps(lanes, best);
  _mm512_storeu_si512(lane_idx, best_idx);
  float m = -INFINITY;
  int64_t at = 0;
  if (!nan) {
    for (int j = 0; j < 16; ++j)
      if (lanes[j] > m || (lanes[j] == m && lane_idx[j] < at)) m = lanes[j], at = lane_idx[j];
    if (m == -INFINITY) at = 0;  // all -inf so far: the first index, as torch
  }
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > m) m = x[i], at = i;
  }
  return at;
}

void check_float(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fused_ops kernels run on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "bfloat16 or float32 expected");
  TORCH_CHECK(x.stride(-1) == 1, "the last dimension must be contiguous");
}

void check_weight(const torch::Tensor& w, int64_t d) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == d, "float32 weight of size d expected");
}

}  // namespace

// x: [rows, d] (rows may be strided), w: float32 [d] (gemma: 1 + weight) -> contiguous [rows, d] in x's dtype.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps, bool gemma) {
  check_float(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D");
  check_weight(w, x.size(1));
  auto y = torch::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_impl<at::BFloat16>(x, w, static_cast<float>(eps), gemma, y);
  else
    rms_norm_impl<float>(x, w, static_cast<float>(eps), gemma, y);
  return y;
}

// x: [tokens, heads, d] with any token/head strides; optional per-head RMSNorm (w: float32 [d]) then rotary
// with cos and signed sin [tokens, d] in x's dtype -> contiguous [tokens, heads, d].
torch::Tensor qk_rope(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, bool gemma,
                      const torch::Tensor& cos, const torch::Tensor& sin) {
  check_float(x);
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x must be [tokens, heads, even d]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "cos/sin dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == x.size(0) * x.size(2) &&
                  sin.numel() == cos.numel(),
              "cos/sin must be contiguous [tokens, d]");
  if (w) check_weight(*w, x.size(2));
  auto y = torch::empty(x.sizes(), x.options());
  const torch::Tensor* wp = w ? &*w : nullptr;
  if (x.scalar_type() == at::kBFloat16)
    qk_rope_impl<at::BFloat16>(x, wp, static_cast<float>(eps), gemma, cos, sin, y);
  else
    qk_rope_impl<float>(x, wp, static_cast<float>(eps), gemma, cos, sin, y);
  return y;
}

// logits: float32 [rows, vocab] contiguous -> int64 [rows], torch.argmax(dim=-1) semantics.
torch::Tensor argmax(const torch::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous(),
              "argmax expects contiguous float32 [rows, vocab] on CPU");
  auto out = torch::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t n = logits.size(1);
  at::parallel_for(0, logits.size(0), 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) o[r] = argmax_row(x + r * n, n);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax", &argmax, "argmax over the last dim of float32 logits");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (gemma: unit-offset weight)");
  m.def("qk_rope", &qk_rope, "optional per-head RMSNorm, then rotary (rotate-half layout)");
}
