// Weight-only quantized matmuls that read GGUF/ggml blocks (Q4_0, Q4_1, Q8_0) in place.
//
// Weights stay in the file's own block layout (rows of `ceil(K/32)` blocks), so a memory-mapped GGUF is used
// without copying. Small batches (decode) run a fused dequantize-and-dot kernel; larger ones (prefill)
// dequantize a slab of rows to float and hand it to the BLAS gemm, where compute, not bandwidth, dominates.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;  // elements per block for every type handled here
constexpr int64_t GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q8_0 = 8;

inline int64_t block_bytes(int64_t t) {
  if (t == GGML_Q4_0) return 18;
  if (t == GGML_Q4_1) return 20;
  if (t == GGML_Q8_0) return 34;
  TORCH_CHECK(false, "llamaworks: unsupported ggml block type ", t);
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Expand one block to 32 floats (d * q + m rounded twice, exactly as ggml's reference dequantizers).
inline void dequant_block(int64_t t, const uint8_t* blk, float* out) {
  const float d = half_at(blk);
#if defined(__AVX512F__)
  const __m512 vd = _mm512_set1_ps(d);
  if (t == GGML_Q8_0) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
    _mm512_storeu_ps(out, _mm512_mul_ps(vd, lo));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(vd, hi));
    return;
  }
  const __m512 vm = _mm512_set1_ps(t == GGML_Q4_1 ? half_at(blk + 2) : -8.0f * d);
  const __m128i low4 = _mm_set1_epi8(15);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (t == GGML_Q4_1 ? 4 : 2)));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4)));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_mul_ps(vd, lo), vm));
  _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_mul_ps(vd, hi), vm));
#else
  if (t == GGML_Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < 32; ++j) out[j] = d * q[j];
    return;
  }
  const float m = t == GGML_Q4_1 ? half_at(blk + 2) : -8.0f * d;
  const uint8_t* q = blk + (t == GGML_Q4_1 ? 4 : 2);
  for (int j = 0; j < 16; ++j) {
    out[j] = d * (q[j] & 15) + m;
    out[j + 16] = d * (q[j] >> 4) + m;
  }
#endif
}

// Dot of one quantized row with one float vector; xsum holds each 32-block's sum of x (for the offset).
inline float row_dot(int64_t t, const uint8_t* row, const float* x, const float* xsum, int64_t nb) {
  const int64_t bb = block_bytes(t);
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  float offset = 0.f;
  const __m128i low4 = _mm_set1_epi8(15);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * bb;
    const float* xb = x + b * QK;
    const float d = half_at(blk);
    __m512 lo, hi;
    if (t == GGML_Q8_0) {
      lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
      hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
    } else {
      const int64_t qoff = t == GGML_Q4_1 ? 4 : 2;
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + qoff));
      lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4)));
      hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4)));
      offset += (t == GGML_Q4_1 ? half_at(blk + 2) : -8.0f * d) * xsum[b];
    }
    __m512 s = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
    s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), s);
    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
  }
  return _mm512_reduce_add_ps(acc) + offset;
#else
  // Portable path written so the compiler can vectorise the 16-wide inner loops.
  float acc[16] = {0};
  float offset = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * bb;
    const float* xb = x + b * QK;
    const float d = half_at(blk);
    float s[16];
    if (t == GGML_Q8_0) {
      const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
      for (int j = 0; j < 16; ++j) s[j] = q[j] * xb[j] + q[j + 16] * xb[j + 16];
    } else {
      const uint8_t* q = blk + (t == GGML_Q4_1 ? 4 : 2);
      for (int j = 0; j < 16; ++j) s[j] = (q[j] & 15) * xb[j] + (q[j] >> 4) * xb[j + 16];
      offset += (t == GGML_Q4_1 ? half_at(blk + 2) : -8.0f * d) * xsum[b];
    }
    for (int j = 0; j < 16; ++j) acc[j] += d * s[j];
  }
  float total = offset;
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total;
#endif
}

void check_args(const at::Tensor& raw, int64_t t, int64_t k) {
  TORCH_CHECK(raw.dtype() == at::kByte && raw.dim() == 2, "llamaworks: raw weight must be a 2-D uint8 tensor");
  TORCH_CHECK(raw.stride(1) == 1, "llamaworks: raw weight rows must be contiguous");
  TORCH_CHECK(k % QK == 0, "llamaworks: in_features must be a multiple of 32, got ", k);
  TORCH_CHECK(raw.size(1) == (k / QK) * block_bytes(t), "llamaworks: raw row has ", raw.size(1),
              " bytes, expected ", (k / QK) * block_bytes(t));
}

// (N, K) float32 from (N, row_bytes) blocks.
at::Tensor ggml_dequantize(const at::Tensor& raw, int64_t t, int64_t k) {
  check_args(raw, t, k);
  const int64_t n = raw.size(0), nb = k / QK, bb = block_bytes(t), stride = raw.stride(0);
  auto out = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat).device(raw.device()));
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) dequant_block(t, src + r * stride + b * bb, dst + r * k + b * QK);
  });
  return out;
}

at::Tensor gemm_path(const at::Tensor& x, const at::Tensor& raw, int64_t t, int64_t k) {
  // Prefill: dequantize cache-sized slabs of rows and let the BLAS gemm do the work; the slab stays in L2.
  const int64_t n = raw.size(0), m = x.size(0);
  at::Tensor yt = at::empty({n, m}, x.options());  // rows of W^T x: each slab's output is contiguous
  const int64_t slab = std::max<int64_t>(64, (int64_t{1} << 18) / k);  // ~1 MiB of float32 per slab
  const at::Tensor xt = x.t();
  for (int64_t r0 = 0; r0 < n; r0 += slab) {
    const int64_t r1 = std::min(n, r0 + slab);
    at::Tensor w = ggml_dequantize(raw.slice(0, r0, r1), t, k);
    at::Tensor out = yt.slice(0, r0, r1);
    at::mm_out(out, w, xt);
  }
  return yt.t().contiguous();
}

// Per-32-block sums of x (M, K): the offset term of Q4_0/Q4_1 needs them once per input row.
std::vector<float> block_sums(const float* xp, int64_t m, int64_t k) {
  const int64_t nb = k / QK;
  std::vector<float> sums(m * nb);
  for (int64_t i = 0; i < m * nb; ++i) {
    float s = 0.f;
    for (int j = 0; j < QK; ++j) s += xp[i * QK + j];
    sums[i] = s;
  }
  return sums;
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLAMAWORKS_INT8_DOT 1
// Decode with integer dot products, as ggml does: the activation rows are quantized once per matmul to
// 32-element int8 blocks (scale = absmax / 127), and each weight block meets them in one VNNI dpbusd
// without being expanded to float. The logits drift slightly from the float path (see tests/test_quant.py).
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> d, s;  // per block: scale, scale * sum(q)
  QuantRows(const float* x, int64_t m, int64_t k) : q(m * k), d(m * (k / QK)), s(m * (k / QK)) {
    for (int64_t b = 0; b < m * (k / QK); ++b) {
      const float* xb = x + b * QK;
      float amax = 0.f;
      for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float scale = amax / 127.f;
      const float inv = scale != 0.f ? 1.f / scale : 0.f;
      int sum = 0;
      for (int j = 0; j < QK; ++j) {
        const int v = static_cast<int>(std::round(xb[j] * inv));
        q[b * QK + j] = static_cast<int8_t>(v);
        sum += v;
      }
      d[b] = scale;
      s[b] = scale * static_cast<float>(sum);
    }
  }
};

inline float row_dot_q8(int64_t t, const uint8_t* row, const int8_t* xq, const float* xd, const float* xs,
                        int64_t nb) {
  const int64_t bb = block_bytes(t);
  __m256 acc = _mm256_setzero_ps();
  float offset = 0.f;
  const __m128i low4 = _mm_set1_epi8(15);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * bb;
    const __m256i vx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * QK));
    const float d = half_at(blk);
    __m256i dot;
    if (t == GGML_Q8_0) {
      // dpbusd multiplies unsigned by signed bytes: |w| times x carrying w's sign.
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(vx, w));
    } else {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (t == GGML_Q4_1 ? 4 : 2)));
      const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low4), _mm_and_si128(q, low4));
      dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, vx);
      offset += (t == GGML_Q4_1 ? half_at(blk + 2) : -8.0f * d) * xs[b];
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[b]), _mm256_cvtepi32_ps(dot), acc);
  }
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_hadd_ps(r, r);
  r = _mm_hadd_ps(r, r);
  return _mm_cvtss_f32(r) + offset;
}
#endif

// Whether decode uses the int8 path (when compiled in). Off by default: its drift can change greedy text
// (as llama.cpp's does); `int8_decode(1)` (Python: kernels.int8_decode(True)) switches it on.
std::atomic<bool> g_int8_decode{false};

bool int8_decode(int64_t mode) {
#ifdef LLAMAWORKS_INT8_DOT
  if (mode >= 0) g_int8_decode = mode != 0;
  return g_int8_decode;
#else
  (void)mode;
  return false;
#endif
}

// The activation rows of one decode matmul, prepared once: int8 blocks (VNNI) or per-block float sums.
struct DecodeRows {
  const float* x;
  int64_t k, nb;
  bool int8;
  std::vector<float> sums;
#ifdef LLAMAWORKS_INT8_DOT
  QuantRows qx;
  DecodeRows(const float* xp, int64_t m, int64_t k_)
      : x(xp), k(k_), nb(k_ / QK), int8(g_int8_decode), sums(int8 ? std::vector<float>() : block_sums(xp, m, k_)),
        qx(xp, int8 ? m : 0, k_) {}
#else
  DecodeRows(const float* xp, int64_t m, int64_t k_)
      : x(xp), k(k_), nb(k_ / QK), int8(false), sums(block_sums(xp, m, k_)) {}
#endif
  float dot(int64_t t, const uint8_t* row, int64_t i) const {
#ifdef LLAMAWORKS_INT8_DOT
    if (int8) return row_dot_q8(t, row, qx.q.data() + i * k, qx.d.data() + i * nb, qx.s.data() + i * nb, nb);
#endif
    return row_dot(t, row, x + i * k, sums.data() + i * nb, nb);
  }
};

constexpr int64_t kSmallBatch = 8;  // up to this many input rows the fused dequantize-dot kernel wins

at::Tensor as_float_rows(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK(x_in.size(-1) == k, "llamaworks: input has ", x_in.size(-1), " features, weight expects ", k);
  return x_in.reshape({-1, k}).to(at::kFloat).contiguous();
}

// Several weights sharing one input (q/k/v): one pass, outputs concatenated along the last dim.
at::Tensor ggml_linear_group(const at::Tensor& x_in, at::TensorList raws, at::IntArrayRef types, int64_t k) {
  TORCH_CHECK(raws.size() == types.size() && !raws.empty(), "llamaworks: one ggml type per weight expected");
  std::vector<int64_t> offsets{0};
  for (size_t i = 0; i < raws.size(); ++i) {
    check_args(raws[i], types[i], k);
    offsets.push_back(offsets.back() + raws[i].size(0));
  }
  const int64_t n_total = offsets.back();
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = n_total;
  at::Tensor x = as_float_rows(x_in, k);
  const int64_t m = x.size(0);
  at::Tensor y;
  if (m > kSmallBatch) {
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < raws.size(); ++i) parts.push_back(gemm_path(x, raws[i], types[i], k));
    y = at::cat(parts, 1);
  } else {
    y = at::empty({m, n_total}, x.options());
    const float* xp = x.data_ptr<float>();
    const DecodeRows rows(xp, m, k);
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, n_total, 32, [&](int64_t r0, int64_t r1) {
      size_t w = 0;
      for (int64_t r = r0; r < r1; ++r) {
        while (r >= offsets[w + 1]) ++w;
        const uint8_t* row = raws[w].data_ptr<uint8_t>() + (r - offsets[w]) * raws[w].stride(0);
        for (int64_t i = 0; i < m; ++i)
          yp[i * n_total + r] = rows.dot(types[w], row, i);
      }
    });
  }
  return y.to(x_in.scalar_type()).view(out_shape);
}

// y = x @ W^T for x (..., K) and W given as (N, row_bytes) blocks.
at::Tensor ggml_linear(const at::Tensor& x_in, const at::Tensor& raw, int64_t t, int64_t k) {
  return ggml_linear_group(x_in, {raw}, {t}, k);
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// SwiGLU's first half: silu(x @ Wgate^T) * (x @ Wup^T), both weights read in one pass.
at::Tensor ggml_swiglu(const at::Tensor& x_in, const at::Tensor& gate, int64_t tg, const at::Tensor& up, int64_t tu,
                       int64_t k) {
  check_args(gate, tg, k);
  check_args(up, tu, k);
  TORCH_CHECK(gate.size(0) == up.size(0), "llamaworks: gate and up projections differ in size");
  const int64_t n = gate.size(0);
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = n;
  at::Tensor x = as_float_rows(x_in, k);
  const int64_t m = x.size(0);
  at::Tensor y;
  if (m > kSmallBatch) {
    y = at::silu(gemm_path(x, gate, tg, k)).mul_(gemm_path(x, up, tu, k));
  } else {
    y = at::empty({m, n}, x.options());
    const float* xp = x.data_ptr<float>();
    const DecodeRows rows(xp, m, k);
    float* yp = y.data_ptr<float>();
    const uint8_t* gp = gate.data_ptr<uint8_t>();
    const uint8_t* upp = up.data_ptr<uint8_t>();
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t i = 0; i < m; ++i) {
          const float g = rows.dot(tg, gp + r * gate.stride(0), i);
          const float u = rows.dot(tu, upp + r * up.stride(0), i);
          yp[i * n + r] = silu(g) * u;
        }
    });
  }
  return y.to(x_in.scalar_type()).view(out_shape);
}


// Float dot product; vectorised explicitly because the compiler may not reorder a float reduction itself.
inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

void rms_norm(const float* x, const float* w, float* out, int64_t n, double eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float scale = float(1.0 / std::sqrt(ss / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

// Rotate adjacent pairs (0,1), (2,3), ... of each head by the position's angles (Meta/GGUF rotary layout).
void rope_inplace(float* v, int64_t heads, int64_t d, const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; ++h) {
    float* p = v + h * d;
    for (int64_t i = 0; i < d / 2; ++i) {
      const float a = p[2 * i], b = p[2 * i + 1];
      p[2 * i] = a * cos[i] - b * sin[i];
      p[2 * i + 1] = a * sin[i] + b * cos[i];
    }
  }
}

// One transformer block for one new token per row, entirely in C++: x (B, dim) -> x (B, dim).
// Keys/values are written at cache slot `slot`; a query sees the cache slots where `visible` (B, S) is true.
at::Tensor ggml_decode_layer(const at::Tensor& x_in, const at::Tensor& attn_norm, const at::Tensor& ffn_norm,
                             double eps, at::TensorList attn_w, at::IntArrayRef attn_t, at::TensorList ffn_w,
                             at::IntArrayRef ffn_t, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& visible, int64_t slot,
                             int64_t n_heads, int64_t n_kv_heads) {
  TORCH_CHECK(attn_w.size() == 4 && ffn_w.size() == 3, "llamaworks: expected wq, wk, wv, wo and w1, w3, w2");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "llamaworks: the fused decode layer needs contiguous float32 KV caches");
  at::Tensor x = x_in.to(at::kFloat).contiguous().clone();
  const int64_t B = x.size(0), dim = x.size(1), S = k_cache.size(2), D = k_cache.size(3);
  const int64_t G = n_heads / n_kv_heads, qdim = n_heads * D, kvdim = n_kv_heads * D;
  TORCH_CHECK(slot >= 0 && slot < S, "llamaworks: cache slot out of range");
  at::Tensor cosc = cos.to(at::kFloat).contiguous(), sinc = sin.to(at::kFloat).contiguous();
  at::Tensor vis = visible.to(at::kBool).contiguous();
  at::Tensor h = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const float* anw = attn_norm.data_ptr<float>();
  const float* fnw = ffn_norm.data_ptr<float>();

  for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * dim, anw, hp + b * dim, dim, eps);
  at::Tensor qkv = ggml_linear_group(h, {attn_w[0], attn_w[1], attn_w[2]}, {attn_t[0], attn_t[1], attn_t[2]}, dim);
  const int64_t qkv_n = qkv.size(1);
  float* qp = qkv.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* row = qp + b * qkv_n;
    rope_inplace(row, n_heads, D, cosc.data_ptr<float>() + b * (D / 2), sinc.data_ptr<float>() + b * (D / 2));
    rope_inplace(row + qdim, n_kv_heads, D, cosc.data_ptr<float>() + b * (D / 2),
                 sinc.data_ptr<float>() + b * (D / 2));
    for (int64_t g = 0; g < n_kv_heads; ++g) {
      std::memcpy(kc + ((b * n_kv_heads + g) * S + slot) * D, row + qdim + g * D, D * sizeof(float));
      std::memcpy(vc + ((b * n_kv_heads + g) * S + slot) * D, row + qdim + kvdim + g * D, D * sizeof(float));
    }
  }

  // Attention over slots [0, slot]: each query head reads its group's key/value head directly (no copies).
  at::Tensor attn = at::empty({B, qdim}, x.options());
  float* ap = attn.data_ptr<float>();
  const bool* vp = vis.data_ptr<bool>();
  const int64_t n_keys = slot + 1;
  const float scale = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, B * n_heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(n_keys);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / n_heads, head = i % n_heads, kvh = head / G;
      const float* q = qp + b * qkv_n + head * D;
      const float* keys = kc + (b * n_kv_heads + kvh) * S * D;
      const float* vals = vc + (b * n_kv_heads + kvh) * S * D;
      float mx = -INFINITY;
      for (int64_t s = 0; s < n_keys; ++s) {
        if (!vp[b * S + s]) { scores[s] = -INFINITY; continue; }
        const float dot = dot_f32(q, keys + s * D, D);
        scores[s] = dot * scale;
        mx = std::max(mx, scores[s]);
      }
      float total = 0.f;
      for (int64_t s = 0; s < n_keys; ++s) {
        scores[s] = scores[s] == -INFINITY ? 0.f : std::exp(scores[s] - mx);
        total += scores[s];
      }
      float* out = ap + b * qdim + head * D;
      for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
      for (int64_t s = 0; s < n_keys; ++s) {
        const float p = scores[s] / total;
        if (p == 0.f) continue;
        for (int64_t d = 0; d < D; ++d) out[d] += p * vals[s * D + d];
      }
    }
  });

  at::Tensor o = ggml_linear_group(attn, {attn_w[3]}, {attn_t[3]}, qdim);
  x.add_(o);
  for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * dim, fnw, hp + b * dim, dim, eps);
  at::Tensor act = ggml_swiglu(h, ffn_w[0], ffn_t[0], ffn_w[1], ffn_t[1], dim);
  x.add_(ggml_linear_group(act, {ffn_w[2]}, {ffn_t[2]}, act.size(1)));
  return x.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(llamaworks, lib) {
  lib.def("ggml_linear(Tensor x, Tensor raw, int ggml_type, int in_features) -> Tensor");
  lib.def("ggml_dequantize(Tensor raw, int ggml_type, int in_features) -> Tensor");
  lib.def("ggml_linear_group(Tensor x, Tensor[] raws, int[] ggml_types, int in_features) -> Tensor");
  lib.def("ggml_decode_layer(Tensor x, Tensor attn_norm, Tensor ffn_norm, float eps, Tensor[] attn_w, "
          "int[] attn_t, Tensor[] ffn_w, int[] ffn_t, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, "
          "Tensor sin, Tensor visible, int slot, int n_heads, int n_kv_heads) -> Tensor");
  lib.def("ggml_swiglu(Tensor x, Tensor gate, int gate_type, Tensor up, int up_type, int in_features) -> Tensor");
  lib.def("int8_decode(int mode) -> bool", &int8_decode);
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, lib) {
  lib.impl("ggml_linear", &ggml_linear);
  lib.impl("ggml_dequantize", &ggml_dequantize);
  lib.impl("ggml_linear_group", &ggml_linear_group);
  lib.impl("ggml_swiglu", &ggml_swiglu);
  lib.impl("ggml_decode_layer", &ggml_decode_layer);
}
