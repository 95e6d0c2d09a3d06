// The torch-free core of llamaworks' CPU inference: GGUF/ggml block formats (Q4_0, Q4_1, Q8_0 and the x8
// row-interleaved layout), the fused dequantize-and-dot decode kernels, a thread pool, RMSNorm, RoPE and attention
// over a float16/float32 KV cache, and the transformer block over a batch of tokens (`blocks`). Everything works on
// raw pointers; numerics (int8 or float activations) are arguments, never process-wide state. Three programs
// include it: _kernels.cpp (torch ops for the torch backend), _lean.cpp (a plain C ABI for engine/native.py, which
// runs GGUF models without torch) and tests/native/kernel_check.cpp (every SIMD path against the scalar reference).
//
// Each kernel exists once as a portable scalar reference (namespace `ref`: the definition, compiled on every
// machine) and, where it matters for speed, as SIMD paths chosen at compile time for the target the library is
// built for (-march=native by default): AVX-512 (+VNNI), AVX2 + FMA + F16C (+AVX-VNNI), aarch64 NEON
// (+dotprod). Integer parts (activation quantization, block dot products, x8 regrouping, dequantization) give the
// same bits on every path; float sums differ only in summation order (bounds in tests/test_kernel_matrix.py).
// Parallel loops take the caller's `par(begin, end, grain, fn, align)`.
#pragma once

#include <sched.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// -- which SIMD paths this build has --------------------------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__) && !defined(LLAMAWORKS_NO_AVX512)
#define LW_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LW_AVX2 1  // also set on AVX-512 builds: the 256-bit kernels serve both
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define LW_NEON 1
#endif
#if defined(LW_AVX2) || defined(__F16C__) || defined(LW_AVX512)
#include <immintrin.h>
#endif
#if defined(LW_NEON)
#include <arm_neon.h>
#endif

// Everything has internal linkage (an unnamed namespace): several libraries may be loaded into one process (the
// torch kernels and torch-free libraries built for different targets), and shared symbols would merge their
// thread pools and scratch buffers.
namespace {
namespace lwcore {

[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error("llamaworks: " + message); }

// The SIMD level of each kernel family in this build, for reports ("matmul int8: avx2+avx-vnni, ...").
inline std::string isa_description() {
#if defined(LW_AVX512)
  const std::string dot = "avx512-vnni (x8 groups), ";
#else
  const std::string dot;
#endif
#if defined(LW_AVX2)
#if defined(LW_AVX512) || defined(__AVXVNNI__)
  return dot + "avx2+vnni (int8 dot), avx2-fma (float), f16c";
#else
  return dot + "avx2 (int8 dot: maddubs), avx2-fma (float), f16c";
#endif
#elif defined(LW_NEON) && defined(__ARM_FEATURE_DOTPROD)
  return "neon+dotprod (int8 dot), neon (float), fp16 conversions";
#elif defined(LW_NEON)
  return "neon (int8 dot: smull), neon (float), fp16 conversions";
#else
  return "scalar reference (no SIMD path for this target)";
#endif
}

// -- float16 ------------------------------------------------------------------------------------------------
namespace ref {
// IEEE half -> float, bit by bit.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do { m <<= 1; ++e; } while ((m & 1024) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((m & 1023) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float -> IEEE half, round to nearest even.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00 | (x > 0x7f800000u ? 0x200 : 0));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00);  // overflows to infinity
  if (x < 0x38800000u) {  // subnormal or zero
    if (x < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = x >> 23, m = (x & 0x7fffff) | 0x800000, shift = 126 - e;
    uint32_t h = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((x - 0x38000000u) >> 13);
  const uint32_t rest = x & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}
}  // namespace ref

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(LW_NEON)
  __fp16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
#else
  return ref::half_to_float(h);
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#elif defined(LW_NEON)
  const __fp16 v = static_cast<__fp16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
#else
  return ref::float_to_half(f);
#endif
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// n floats -> float16 bits (a KV cache row).
inline void floats_to_halves(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(LW_NEON)
  for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
#endif
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

// -- block formats --------------------------------------------------------------------------------------------
constexpr int64_t QK = 32;  // elements per block for every type handled here
constexpr int64_t GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q8_0 = 8;

// Row-interleaved ("x8") layout, made once at load for Q4_0/Q4_1 weights with a multiple of 8 rows. Per group
// of 8 consecutive rows and per 32-column block: the 8 rows' scales (fp16), Q4_1's 8 minimums, then 128 quant
// bytes in two 64-byte halves (a: columns 0-15, b: columns 16-31). Within a half, column c (of 16) of row i is
// in byte 4 * (2 * i + (c % 8) / 4) + c % 4, low nibble for c < 8, else high: row i owns the 32-bit lanes 2i and
// 2i + 1, and one nibble mask gives, for all 8 rows at once, 8 consecutive weights per row. The activation a
// step needs is then one broadcast qword of the int8 row, the same for every lane pair, and a kernel reads one
// contiguous stream per 8 rows with no horizontal sums. Same bytes in total, so the tensor keeps its
// (rows, row_bytes) shape; the ggml type code carries the flag.
constexpr int64_t kInterleaved = 256;
inline int64_t base_type(int64_t t) { return t & 255; }
inline bool interleaved(int64_t t) { return (t & kInterleaved) != 0; }

inline int64_t block_bytes(int64_t t) {
  t = base_type(t);
  if (t == GGML_Q4_0) return 18;
  if (t == GGML_Q4_1) return 20;
  if (t == GGML_Q8_0) return 34;
  fail("unsupported ggml block type " + std::to_string(t));
}

// Activation rows quantized to 32-element int8 blocks as ggml does for its dot products (scale = absmax / 127,
// q = round(x / scale)), made once per matmul: every weight block then meets them in integer dot products.
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> d, s;    // per block: scale, scale * sum(q)
  std::vector<int32_t> qsum;  // per block: sum(q)
  QuantRows() = default;
  QuantRows(int64_t m, int64_t k) : q(m * k), d(m * (k / QK)), s(m * (k / QK)), qsum(m * (k / QK)) {}
};

// ============================================================================================================
// The scalar reference: the definition of every kernel. The SIMD paths below are tested against these.
// ============================================================================================================
namespace ref {

// One block -> 32 floats: d * q + m rounded twice, exactly as ggml's reference dequantizers.
inline void dequant_block(int64_t t, const uint8_t* blk, float* out) {
  const float d = half_at(blk);
  if (t == GGML_Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < 32; ++j) out[j] = d * q[j];
    return;
  }
  const float m = t == GGML_Q4_1 ? half_at(blk + 2) : -8.0f * d;
  const uint8_t* q = blk + (t == GGML_Q4_1 ? 4 : 2);
  for (int j = 0; j < 16; ++j) {
    const float lo = d * (q[j] & 15), hi = d * (q[j] >> 4);
    out[j] = lo + m;
    out[j + 16] = hi + m;
  }
}

// Rows of x (m, k) -> int8 blocks. Rounds to nearest, ties to even (ggml's roundf sends exact ties away from
// zero: a tie needs x / scale to land exactly on .5, vanishingly rare for real activations).
inline void quantize_rows(const float* x, int64_t m, int64_t k, QuantRows& out) {
  for (int64_t b = 0; b < m * (k / QK); ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / 127.f, inv = scale != 0.f ? 1.f / scale : 0.f;
    int32_t sum = 0;
    for (int j = 0; j < QK; ++j) {
      const float v = std::nearbyint(xb[j] * inv);
      const int32_t q = static_cast<int32_t>(std::min(127.f, std::max(-128.f, v)));
      out.q[b * QK + j] = static_cast<int8_t>(q);
      sum += q;
    }
    out.d[b] = scale;
    out.qsum[b] = sum;
    out.s[b] = scale * static_cast<float>(sum);
  }
}

// The integer dot product of one weight block with one int8 activation block (Q4_0's weights already w - 8).
inline int32_t block_dot_i8(int64_t t, const uint8_t* blk, const int8_t* xq) {
  int32_t sum = 0;
  if (t == GGML_Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < 32; ++j) sum += q[j] * xq[j];
    return sum;
  }
  const uint8_t* q = blk + (t == GGML_Q4_1 ? 4 : 2);
  const int32_t off = t == GGML_Q4_0 ? 8 : 0;
  for (int j = 0; j < 16; ++j) sum += ((q[j] & 15) - off) * xq[j] + ((q[j] >> 4) - off) * xq[j + 16];
  return sum;
}

// One plain weight row . one quantized activation row: per block (dw * dx) * dot, plus Q4_1's mw * sx, summed in
// block order into one float.
inline float row_dot_q8(int64_t t, const uint8_t* row, const int8_t* xq, const float* xd, const float* xs,
                        int64_t nb) {
  const int64_t bb = block_bytes(t);
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * bb;
    acc += (half_at(blk) * xd[b]) * static_cast<float>(block_dot_i8(t, blk, xq + b * QK));
    if (t == GGML_Q4_1) acc += half_at(blk + 2) * xs[b];
  }
  return acc;
}

// One x8 group block -> the 8 rows' plain ggml blocks (row i's block at plain + i * row_stride).
// A plain block's quant byte p holds column p (low nibble) and p + 16 (high nibble).
inline void unpack_group_block(int64_t t, const uint8_t* gblk, uint8_t* plain, int64_t row_stride) {
  const bool q4_1 = base_type(t) == GGML_Q4_1;
  const int64_t qoff = q4_1 ? 4 : 2;
  const uint8_t* q = gblk + (q4_1 ? 32 : 16);
  for (int i = 0; i < 8; ++i) {
    uint8_t* row = plain + i * row_stride;
    std::memcpy(row, gblk + 2 * i, 2);
    if (q4_1) std::memcpy(row + 2, gblk + 16 + 2 * i, 2);
    for (int c = 0; c < 32; ++c) {
      const int half = c / 16, cc = c % 16;
      const uint8_t byte = q[64 * half + 4 * (2 * i + (cc % 8) / 4) + cc % 4];
      const uint8_t v = cc < 8 ? (byte & 15) : (byte >> 4);
      uint8_t& dst = row[qoff + c % 16];
      dst = c < 16 ? static_cast<uint8_t>((dst & 0xf0) | v) : static_cast<uint8_t>((dst & 0x0f) | (v << 4));
    }
  }
}

// The inverse of unpack_group_block.
inline void pack_group_block(int64_t t, const uint8_t* plain, int64_t row_stride, uint8_t* gblk) {
  const bool q4_1 = base_type(t) == GGML_Q4_1;
  const int64_t qoff = q4_1 ? 4 : 2;
  uint8_t* q = gblk + (q4_1 ? 32 : 16);
  std::memset(q, 0, 128);
  for (int i = 0; i < 8; ++i) {
    const uint8_t* row = plain + i * row_stride;
    std::memcpy(gblk + 2 * i, row, 2);
    if (q4_1) std::memcpy(gblk + 16 + 2 * i, row + 2, 2);
    for (int c = 0; c < 32; ++c) {
      const uint8_t v = c < 16 ? (row[qoff + c] & 15) : (row[qoff + c - 16] >> 4);
      const int half = c / 16, cc = c % 16;
      q[64 * half + 4 * (2 * i + (cc % 8) / 4) + cc % 4] |= static_cast<uint8_t>(cc < 8 ? v : v << 4);
    }
  }
}

// One x8 group (8 rows) . R int8 activation rows: out[r * ldo + i] = row_dot_q8 of row i (the definition).
inline void group_dot_q8(int64_t t, const uint8_t* group, const int8_t* xq, const float* xd, const float* xs,
                         int64_t nb, int64_t R, float* out, int64_t ldo) {
  const int64_t bb = block_bytes(t);
  std::vector<uint8_t> plain(8 * nb * bb);
  for (int64_t b = 0; b < nb; ++b) unpack_group_block(t, group + b * 8 * bb, plain.data() + b * bb, nb * bb);
  for (int64_t r = 0; r < R; ++r)
    for (int i = 0; i < 8; ++i)
      out[r * ldo + i] = row_dot_q8(t, plain.data() + i * nb * bb, xq + r * nb * QK, xd + r * nb, xs + r * nb, nb);
}

// softmax(q . keys * scale) . values for one query head; keys/values rows of D elements (float or float16 bits).
template <typename KV>
void attend_one_head(const float* q, const KV* keys, const KV* vals, const bool* visible, int64_t n_keys,
                     int64_t D, float scale, float* scores, float* out);
// nq queries sharing one key/value head: query i (D floats at q[i]) attends to keys [first[i], limit[i]) of
// `keys`/`vals` (rows of D) and writes D floats at out[i]. `work` is scratch.
template <typename KV>
void attend_queries(int64_t nq, const float* const* q, float* const* out, const int64_t* first, const int64_t* limit,
                    const KV* keys, const KV* vals, int64_t D, float scale, std::vector<float>& work);

}  // namespace ref

// ============================================================================================================
// SIMD paths. Each function below has the signature of its ref:: definition and falls back to it.
// ============================================================================================================
#if defined(LW_AVX2)
inline float hsum256(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// acc + per 32-bit lane, the sum of the lane's 4 products u8 * s8 (vpdpbusd where the CPU has VNNI).
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(LW_AVX512)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else  // pairs to int16 (|u * s| sums stay below 2^15 for the operands used here), then pairs of those to int32
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// 8 int8 values -> 8 floats.
inline __m256 i8x8_to_ps(const void* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
#endif

#if defined(LW_NEON)
// acc + per 32-bit lane, the sum of the lane's 4 products s8 * s8.
inline int32x4_t dot_s8(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, a, b);
#else
  const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
  const int16x8_t hi = vmull_high_s8(a, b);
  return vpadalq_s16(acc, vpaddq_s16(lo, hi));  // products 4j..4j+3 land in lane j
#endif
}
#endif

inline void dequant_block(int64_t t, const uint8_t* blk, float* out) {
#if defined(LW_AVX2)
  const __m256 vd = _mm256_set1_ps(half_at(blk));
  if (t == GGML_Q8_0) {
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(vd, i8x8_to_ps(blk + 2 + 8 * j)));
    return;
  }
  const __m256 vm = _mm256_set1_ps(t == GGML_Q4_1 ? half_at(blk + 2) : -8.0f * half_at(blk));
  const __m128i low4 = _mm_set1_epi8(15);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (t == GGML_Q4_1 ? 4 : 2)));
  const __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int j = 0; j < 4; ++j)  // mul then add (no fma): the same rounding as the reference
    _mm256_storeu_ps(out + 8 * j, _mm256_add_ps(_mm256_mul_ps(vd, u8x8_to_ps(parts[j])), vm));
#elif defined(LW_NEON)
  const float d = half_at(blk);
  if (t == GGML_Q8_0) {
    const int8x16_t q0 = vld1q_s8(reinterpret_cast<const int8_t*>(blk + 2)), q1 = vld1q_s8(reinterpret_cast<const int8_t*>(blk + 18));
    const int16x8_t h[4] = {vmovl_s8(vget_low_s8(q0)), vmovl_s8(vget_high_s8(q0)), vmovl_s8(vget_low_s8(q1)), vmovl_s8(vget_high_s8(q1))};
    for (int j = 0; j < 4; ++j) {
      vst1q_f32(out + 8 * j, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[j]))), d));
      vst1q_f32(out + 8 * j + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(h[j]))), d));
    }
    return;
  }
  const float32x4_t vm = vdupq_n_f32(t == GGML_Q4_1 ? half_at(blk + 2) : -8.0f * d);
  const uint8x16_t q = vld1q_u8(blk + (t == GGML_Q4_1 ? 4 : 2));
  const uint8x16_t nib[2] = {vandq_u8(q, vdupq_n_u8(15)), vshrq_n_u8(q, 4)};
  for (int n = 0; n < 2; ++n) {
    const uint16x8_t h[2] = {vmovl_u8(vget_low_u8(nib[n])), vmovl_u8(vget_high_u8(nib[n]))};
    for (int j = 0; j < 2; ++j) {
      vst1q_f32(out + 16 * n + 8 * j, vaddq_f32(vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(h[j]))), d), vm));
      vst1q_f32(out + 16 * n + 8 * j + 4, vaddq_f32(vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_high_u16(h[j]))), d), vm));
    }
  }
#else
  ref::dequant_block(t, blk, out);
#endif
}

inline void quantize_rows(const float* x, int64_t m, int64_t k, QuantRows& out) {
#if defined(LW_AVX2)
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < m * (k / QK); ++b) {
    const float* xb = x + b * QK;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], sign_mask));
    }
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_movehdup_ps(r));
    const float scale = _mm_cvtss_f32(r) / 127.f;
    const __m256 inv = _mm256_set1_ps(scale != 0.f ? 1.f / scale : 0.f);
    __m256i q[4];  // nearest, ties to even (the MXCSR default), as std::nearbyint in the reference
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    // int32 -> int8 with saturation; packs interleave 128-bit lanes, the permutation restores element order
    const __m256i p16 = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16, p16b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + b * QK), p8);
    out.d[b] = scale;
    out.qsum[b] = _mm_cvtsi128_si32(s4);
    out.s[b] = scale * static_cast<float>(out.qsum[b]);
  }
#elif defined(LW_NEON)
  for (int64_t b = 0; b < m * (k / QK); ++b) {
    const float* xb = x + b * QK;
    float32x4_t v[8];
    float32x4_t amax = vdupq_n_f32(0.f);
    for (int j = 0; j < 8; ++j) {
      v[j] = vld1q_f32(xb + 4 * j);
      amax = vmaxq_f32(amax, vabsq_f32(v[j]));
    }
    const float scale = vmaxvq_f32(amax) / 127.f, inv = scale != 0.f ? 1.f / scale : 0.f;
    int32x4_t sum = vdupq_n_s32(0);
    int16x4_t h[8];
    for (int j = 0; j < 8; ++j) {
      const int32x4_t q = vcvtnq_s32_f32(vmulq_n_f32(v[j], inv));  // nearest, ties to even
      sum = vaddq_s32(sum, q);
      h[j] = vqmovn_s32(q);
    }
    for (int j = 0; j < 4; ++j) vst1_s8(out.q.data() + b * QK + 8 * j, vqmovn_s16(vcombine_s16(h[2 * j], h[2 * j + 1])));
    out.d[b] = scale;
    out.qsum[b] = vaddvq_s32(sum);
    out.s[b] = scale * static_cast<float>(out.qsum[b]);
  }
#else
  ref::quantize_rows(x, m, k, out);
#endif
}

// R plain weight rows (same type T) . one int8 activation row; R > 1 shares each activation block's loads.
// R > 1 assumes the rows are consecutive and prefetches the R rows after them, spread over the block loop:
// interleaved reads of R rows defeat the hardware's stream prefetcher once weights come from DRAM.
template <int64_t T, int R>
inline void rows_dot_q8(const uint8_t* const* rows, const int8_t* xq, const float* xd, const float* xs,
                        const int32_t* qsum, int64_t nb, float* out) {
#if defined(LW_AVX2)
  constexpr int64_t bb = T == GGML_Q4_0 ? 18 : T == GGML_Q4_1 ? 20 : 34;
  __m256 acc[R];
  float offset[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); offset[r] = 0.f; }
  const __m128i low4 = _mm_set1_epi8(15);
  constexpr int64_t ahead_lines = (R * bb + 63) / 64;  // lines of the next R rows per block step
  const uint8_t* ahead = rows[R - 1] + nb * bb;
  for (int64_t b = 0; b < nb; ++b) {
    if constexpr (R > 1)
      for (int64_t l = 0; l < ahead_lines; ++l) _mm_prefetch(reinterpret_cast<const char*>(ahead + (b * ahead_lines + l) * 64), _MM_HINT_T0);
    const __m256i vx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * QK));
    const float dx = xd[b];
    // Q4_0 stores w + 8: lane 0 starts at -8 * sum(x), so the lanes together give sum((w - 8) * x).
    const __m256i init = _mm256_setr_epi32(T == GGML_Q4_0 ? -8 * qsum[b] : 0, 0, 0, 0, 0, 0, 0, 0);
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows[r] + b * bb;
      __m256i dot;
      if constexpr (T == GGML_Q8_0) {  // u8 x s8 products: |w| times x carrying w's sign
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        dot = dot_u8s8(init, _mm256_sign_epi8(w, w), _mm256_sign_epi8(vx, w));
      } else {
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == GGML_Q4_1 ? 4 : 2)));
        const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low4), _mm_and_si128(q, low4));
        dot = dot_u8s8(init, w, vx);
        if constexpr (T == GGML_Q4_1) offset[r] += half_at(blk + 2) * xs[b];
      }
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half_at(blk) * dx), _mm256_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]) + offset[r];
#elif defined(LW_NEON)
  constexpr int64_t bb = T == GGML_Q4_0 ? 18 : T == GGML_Q4_1 ? 20 : 34;
  float32x4_t acc[R];
  float offset[R];
  for (int r = 0; r < R; ++r) { acc[r] = vdupq_n_f32(0.f); offset[r] = 0.f; }
  for (int64_t b = 0; b < nb; ++b) {
    const int8x16_t x0 = vld1q_s8(xq + b * QK), x1 = vld1q_s8(xq + b * QK + 16);
    const float dx = xd[b];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows[r] + b * bb;
      int8x16_t w0, w1;
      if constexpr (T == GGML_Q8_0) {
        w0 = vld1q_s8(reinterpret_cast<const int8_t*>(blk + 2)), w1 = vld1q_s8(reinterpret_cast<const int8_t*>(blk + 18));
      } else {
        const uint8x16_t q = vld1q_u8(blk + (T == GGML_Q4_1 ? 4 : 2));
        w0 = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), w1 = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
        if constexpr (T == GGML_Q4_0) w0 = vsubq_s8(w0, vdupq_n_s8(8)), w1 = vsubq_s8(w1, vdupq_n_s8(8));
        if constexpr (T == GGML_Q4_1) offset[r] += half_at(blk + 2) * xs[b];
      }
      const int32x4_t dot = dot_s8(dot_s8(vdupq_n_s32(0), w0, x0), w1, x1);
      acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(dot), half_at(blk) * dx);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = vaddvq_f32(acc[r]) + offset[r];
#else
  (void)qsum;
  for (int r = 0; r < R; ++r) out[r] = ref::row_dot_q8(T, rows[r], xq, xd, xs, nb);
#endif
}

inline void unpack_group_block(int64_t t, const uint8_t* gblk, uint8_t* plain, int64_t row_stride) {
#if defined(LW_AVX2)
  const bool q4_1 = base_type(t) == GGML_Q4_1;
  const int64_t qoff = q4_1 ? 4 : 2;
  for (int i = 0; i < 8; ++i) {
    std::memcpy(plain + i * row_stride, gblk + 2 * i, 2);
    if (q4_1) std::memcpy(plain + i * row_stride + 2, gblk + 16 + 2 * i, 2);
  }
  const uint8_t* q = gblk + (q4_1 ? 32 : 16);
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int h = 0; h < 2; ++h) {  // 32 bytes of each half: rows 4h .. 4h + 3
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * h));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 + 32 * h));
    // qword j: row 4h + j's plain bytes 0-7 (lo) and 8-15 (hi).
    const __m256i lo = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_slli_epi16(_mm256_and_si256(b, m4), 4));
    const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_andnot_si256(m4, b));
    alignas(32) uint8_t rows[2][32];
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[0]), _mm256_unpacklo_epi64(lo, hi));  // rows 4h, 4h + 2
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[1]), _mm256_unpackhi_epi64(lo, hi));  // rows 4h + 1, 4h + 3
    for (int j = 0; j < 4; ++j) std::memcpy(plain + (4 * h + j) * row_stride + qoff, rows[j & 1] + 16 * (j >> 1), 16);
  }
#else
  ref::unpack_group_block(t, gblk, plain, row_stride);
#endif
}

inline void pack_group_block(int64_t t, const uint8_t* plain, int64_t row_stride, uint8_t* gblk) {
#if defined(LW_AVX2)
  const bool q4_1 = base_type(t) == GGML_Q4_1;
  const int64_t qoff = q4_1 ? 4 : 2;
  uint8_t* q = gblk + (q4_1 ? 32 : 16);
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int i = 0; i < 8; ++i) {
    std::memcpy(gblk + 2 * i, plain + i * row_stride, 2);
    if (q4_1) std::memcpy(gblk + 16 + 2 * i, plain + i * row_stride + 2, 2);
  }
  for (int h = 0; h < 2; ++h) {
    alignas(32) uint8_t rows[2][32];
    for (int j = 0; j < 4; ++j) std::memcpy(rows[j & 1] + 16 * (j >> 1), plain + (4 * h + j) * row_stride + qoff, 16);
    const __m256i even = _mm256_load_si256(reinterpret_cast<const __m256i*>(rows[0]));
    const __m256i odd = _mm256_load_si256(reinterpret_cast<const __m256i*>(rows[1]));
    const __m256i lo = _mm256_unpacklo_epi64(even, odd), hi = _mm256_unpackhi_epi64(even, odd);
    const __m256i a = _mm256_or_si256(_mm256_and_si256(lo, m4), _mm256_slli_epi16(_mm256_and_si256(hi, m4), 4));
    const __m256i b = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 4), m4), _mm256_andnot_si256(m4, hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * h), a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 64 + 32 * h), b);
  }
#else
  ref::pack_group_block(t, plain, row_stride, gblk);
#endif
}

// Rows 8g .. 8g + 7 of an x8 weight (`group` points at them) as plain ggml rows, into plain[8 * nb * bb].
inline void unpack_group(int64_t t, const uint8_t* group, int64_t nb, uint8_t* plain) {
  const int64_t bb = block_bytes(t);
  for (int64_t b = 0; b < nb; ++b) unpack_group_block(t, group + b * 8 * bb, plain + b * bb, nb * bb);
}

inline int64_t load_i64(const int8_t* p) {  // 8 activation bytes (memcpy: no aliasing through int64_t*)
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// One x8 group (8 rows) . R int8 activation rows: out[r * ldo + 0..8). Per block, the nibble vectors hold in lanes
// 2i and 2i + 1 row i's weights for columns 8s + 0..3 and 8s + 4..7 (step s = 0..3), so the activation bytes a
// step needs are the row's qword s broadcast to every lane pair, and four dot steps give each row's block dot
// split over its two lanes, which take the same per-row scale and are added once at the end (AVX-512: added as
// integers per block, for the reference's bits, as group_gemm_q8 gives them). The nibbles are unpacked once per
// block for all R rows. Row r's data: xq + r * nb * 32 (int8), xd/xs/qsum + r * nb; each row sums in the same
// order whatever R is, so results do not depend on how rows are grouped.
template <int64_t T, int R>
inline void group_dot_q8(const uint8_t* group, const int8_t* xq, const float* xd, const float* xs,
                         const int32_t* qsum, int64_t nb, float* out, int64_t ldo) {
  constexpr int64_t gb = T == GGML_Q4_0 ? 144 : 160, qoff = T == GGML_Q4_0 ? 16 : 32;
#if defined(LW_AVX512)
  const __m512i m4 = _mm512_set1_epi8(15);
  __m256 acc[R];  // row i in lane i
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * gb;
    const __m512i lo = _mm512_loadu_si512(blk + qoff), hi = _mm512_loadu_si512(blk + qoff + 64);
    const __m512i w0 = _mm512_and_si512(lo, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(lo, 4), m4);
    const __m512i w2 = _mm512_and_si512(hi, m4), w3 = _mm512_and_si512(_mm512_srli_epi16(hi, 4), m4);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    __m256 mn = _mm256_setzero_ps();
    if constexpr (T == GGML_Q4_1) mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
    for (int r = 0; r < R; ++r) {
      const int64_t rb = r * nb + b;
      const int8_t* xb = xq + rb * QK;
      // Q4_0 stores w + 8: start each lane at -4 * sum(x), so a row's two lanes together subtract 8 * sum(x).
      __m512i dot = T == GGML_Q4_0 ? _mm512_set1_epi32(-4 * qsum[rb]) : _mm512_setzero_si512();
      dot = _mm512_dpbusd_epi32(dot, w0, _mm512_set1_epi64(load_i64(xb + 0)));
      dot = _mm512_dpbusd_epi32(dot, w1, _mm512_set1_epi64(load_i64(xb + 8)));
      dot = _mm512_dpbusd_epi32(dot, w2, _mm512_set1_epi64(load_i64(xb + 16)));
      dot = _mm512_dpbusd_epi32(dot, w3, _mm512_set1_epi64(load_i64(xb + 24)));
      // The row's two lanes added as integers (the low half of each qword, narrowed to 8 lanes), then the
      // reference's float steps in its order (mul, mul, add; Q4_1: mul, add): every row gets the reference's
      // bits, as from the prompt kernel (group_gemm_q8), so a token's logits do not depend on which one ran.
      const __m256i row_dot = _mm512_cvtepi64_epi32(_mm512_add_epi32(dot, _mm512_srli_epi64(dot, 32)));
      acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_mul_ps(d, _mm256_set1_ps(xd[rb])), _mm256_cvtepi32_ps(row_dot)));
      if constexpr (T == GGML_Q4_1) acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(mn, _mm256_set1_ps(xs[rb])));
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo, acc[r]);
#elif defined(LW_AVX2)
  // Two 256-bit registers per half: h = 0 holds rows 0-3, h = 1 rows 4-7.
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i pairs[2] = {_mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)};
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * gb;
    const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 m8 = T == GGML_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)))
                                     : _mm256_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + qoff + 32 * h));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + qoff + 64 + 32 * h));
      const __m256i w0 = _mm256_and_si256(lo, m4), w1 = _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4);
      const __m256i w2 = _mm256_and_si256(hi, m4), w3 = _mm256_and_si256(_mm256_srli_epi16(hi, 4), m4);
      const __m256 d = _mm256_permutevar8x32_ps(d8, pairs[h]);
      const __m256 mn = _mm256_permutevar8x32_ps(m8, pairs[h]);
      for (int r = 0; r < R; ++r) {
        const int64_t rb = r * nb + b;
        const int8_t* xb = xq + rb * QK;
        __m256i dot = T == GGML_Q4_0 ? _mm256_set1_epi32(-4 * qsum[rb]) : _mm256_setzero_si256();
#if defined(LW_AVX512) || defined(__AVXVNNI__)
        dot = dot_u8s8(dot, w0, _mm256_set1_epi64x(load_i64(xb + 0)));
        dot = dot_u8s8(dot, w1, _mm256_set1_epi64x(load_i64(xb + 8)));
        dot = dot_u8s8(dot, w2, _mm256_set1_epi64x(load_i64(xb + 16)));
        dot = dot_u8s8(dot, w3, _mm256_set1_epi64x(load_i64(xb + 24)));
#else  // four int16 pair sums of nibble x int8 stay below 4 * 2 * 15 * 128 < 2^15: one widening per block
        __m256i s16 = _mm256_maddubs_epi16(w0, _mm256_set1_epi64x(load_i64(xb + 0)));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w1, _mm256_set1_epi64x(load_i64(xb + 8))));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w2, _mm256_set1_epi64x(load_i64(xb + 16))));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w3, _mm256_set1_epi64x(load_i64(xb + 24))));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
#endif
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(xd[rb])), acc[r][h]);
        if constexpr (T == GGML_Q4_1) acc[r][h] = _mm256_fmadd_ps(mn, _mm256_set1_ps(0.5f * xs[rb]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {  // lane pairs -> rows: hadd gives (0 1 4 5 | 2 3 6 7), the permute restores order
    const __m256 sum = _mm256_hadd_ps(acc[r][0], acc[r][1]);
    _mm256_storeu_ps(out + r * ldo, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sum), 0xd8)));
  }
#elif defined(LW_NEON)
  // Four 128-bit registers per half: register p holds rows 2p and 2p + 1.
  const uint8x16_t m4 = vdupq_n_u8(15);
  float32x4_t acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < 4; ++p) acc[r][p] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * gb;
    const float16x8_t dh = vreinterpretq_f16_u8(vld1q_u8(blk));
    const float32x4_t dlo = vcvt_f32_f16(vget_low_f16(dh)), dhi = vcvt_high_f32_f16(dh);
    const float32x4_t dp[4] = {vzip1q_f32(dlo, dlo), vzip2q_f32(dlo, dlo), vzip1q_f32(dhi, dhi), vzip2q_f32(dhi, dhi)};
    float32x4_t mp[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
    if constexpr (T == GGML_Q4_1) {
      const float16x8_t mh = vreinterpretq_f16_u8(vld1q_u8(blk + 16));
      const float32x4_t mlo = vcvt_f32_f16(vget_low_f16(mh)), mhi = vcvt_high_f32_f16(mh);
      mp[0] = vzip1q_f32(mlo, mlo), mp[1] = vzip2q_f32(mlo, mlo), mp[2] = vzip1q_f32(mhi, mhi), mp[3] = vzip2q_f32(mhi, mhi);
    }
    int8x16_t w[4][4];  // [register][step]
    for (int p = 0; p < 4; ++p) {
      const uint8x16_t lo = vld1q_u8(blk + qoff + 16 * p), hi = vld1q_u8(blk + qoff + 64 + 16 * p);
      w[p][0] = vreinterpretq_s8_u8(vandq_u8(lo, m4)), w[p][1] = vreinterpretq_s8_u8(vshrq_n_u8(lo, 4));
      w[p][2] = vreinterpretq_s8_u8(vandq_u8(hi, m4)), w[p][3] = vreinterpretq_s8_u8(vshrq_n_u8(hi, 4));
    }
    for (int r = 0; r < R; ++r) {
      const int64_t rb = r * nb + b;
      const int8_t* xb = xq + rb * QK;
      int8x16_t xs8[4];
      for (int s = 0; s < 4; ++s) xs8[s] = vreinterpretq_s8_s64(vdupq_n_s64(load_i64(xb + 8 * s)));
      const float32x4_t dx = vdupq_n_f32(xd[rb]);
      for (int p = 0; p < 4; ++p) {
        int32x4_t dot = vdupq_n_s32(T == GGML_Q4_0 ? -4 * qsum[rb] : 0);
        for (int s = 0; s < 4; ++s) dot = dot_s8(dot, w[p][s], xs8[s]);
        acc[r][p] = vfmaq_f32(acc[r][p], vcvtq_f32_s32(dot), vmulq_f32(dp[p], dx));
        if constexpr (T == GGML_Q4_1) acc[r][p] = vfmaq_n_f32(acc[r][p], mp[p], 0.5f * xs[rb]);
      }
    }
  }
  for (int r = 0; r < R; ++r)  // lane pairs -> rows
    for (int p = 0; p < 4; ++p) vst1_f32(out + r * ldo + 2 * p, vpadd_f32(vget_low_f32(acc[r][p]), vget_high_f32(acc[r][p])));
#else
  (void)gb, (void)qoff, (void)qsum;
  ref::group_dot_q8(T, group, xq, xd, xs, nb, R, out, ldo);
#endif
}

#if defined(LW_AVX512)
// -- prompt chunks on AVX-512: the input rows in the vector lanes -----------------------------------------------------
// In group_dot_q8 a vector holds 8 weight rows x 8 columns, so every (input row, block) pays a float epilogue
// (offset, pair sum, convert, scale, accumulate) per 4 vpdpbusd, and the epilogue bounds its speed. From 14 input
// rows (a lane group of 16, padded) the roles swap: a vector holds 16 input rows x 4 columns (one int8 quad per lane), a weight row's 4
// bytes of that step are the broadcast memory operand, and 8 vpdpbusd give 16 rows' whole block dot, one row per
// lane, for one epilogue. vpdpbusd multiplies unsigned by signed bytes and only the signed operand can be a memory
// broadcast, so the activations are stored as x + 128 (unsigned), the weights as signed bytes (Q4_0: q - 8), and
// each weight row's block dot starts from -128 * sum(w). The float steps are the reference's, in its order: each
// row's result is bit-equal to ref::row_dot_q8, like group_dot_q8's on this target.
constexpr int64_t kLanes = 16;
struct alignas(64) Line { uint8_t bytes[64]; };  // one zmm's worth of aligned storage
// Input rows repacked once per matmul: [lane group of 16 rows][block][step of 4 columns].
struct PackedRows {
  int64_t nb = 0, groups = 0;
  std::vector<Line> q;     // lane r: the 4 bytes of row 16 * group + r, each + 128 (padding rows: x = 0)
  std::vector<Line> d, s;  // per [group][block], lane r (float): the row's block scale, scale * sum(q) (padding: 0)
};

inline void pack_rows(const QuantRows& qx, int64_t m, int64_t nb, PackedRows& p) {
  p.nb = nb, p.groups = (m + kLanes - 1) / kLanes;
  Line pad, zero{};
  std::memset(pad.bytes, 0x80, 64);
  p.q.assign(p.groups * nb * 8, pad);
  p.d.assign(p.groups * nb, zero);
  p.s.assign(p.groups * nb, zero);
  auto* q = reinterpret_cast<uint8_t*>(p.q.data());
  auto* d = reinterpret_cast<float*>(p.d.data());
  auto* sx = reinterpret_cast<float*>(p.s.data());
  for (int64_t r = 0; r < m; ++r) {
    const int64_t g = r / kLanes, lane = r % kLanes;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* src = qx.q.data() + (r * nb + b) * QK;
      uint8_t* dst = q + ((g * nb + b) * 8 * kLanes + lane) * 4;
      for (int st = 0; st < 8; ++st) {
        uint32_t v;
        std::memcpy(&v, src + 4 * st, 4);
        v ^= 0x80808080u;  // + 128 per byte
        std::memcpy(dst + st * kLanes * 4, &v, 4);
      }
      d[(g * nb + b) * kLanes + lane] = qx.d[r * nb + b];
      sx[(g * nb + b) * kLanes + lane] = qx.s[r * nb + b];
    }
  }
}

// One x8 group's weights as group_gemm_q8 reads them, unpacked once per call (a thread's scratch).
struct GroupBytes {
  std::vector<Line> q;     // [block][h]: qword j = row j's columns 8h .. 8h + 7 as signed bytes (the x8 lane pair)
  std::vector<int32_t> c;  // [block][row]: -128 * sum of the row's signed block bytes
  std::vector<float> d, mn;  // [block][row]: scale, Q4_1's minimum
};

template <int64_t T>
inline void unpack_group_bytes(const uint8_t* group, int64_t nb, GroupBytes& u) {
  constexpr int64_t gb = T == GGML_Q4_0 ? 144 : 160, qoff = T == GGML_Q4_0 ? 16 : 32;
  u.q.resize(nb * 4), u.c.resize(nb * 8), u.d.resize(nb * 8), u.mn.resize(nb * 8);
  const __m512i m4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * gb;
    const __m512i ha = _mm512_loadu_si512(blk + qoff), hb = _mm512_loadu_si512(blk + qoff + 64);
    // qword i of c0..c3: row i's columns 0-7, 8-15, 16-23, 24-31 (the x8 layout's lane pair 2i, 2i + 1)
    const __m512i c0 = _mm512_and_si512(ha, m4), c1 = _mm512_and_si512(_mm512_srli_epi16(ha, 4), m4);
    const __m512i c2 = _mm512_and_si512(hb, m4), c3 = _mm512_and_si512(_mm512_srli_epi16(hb, 4), m4);
    const __m512i sums = _mm512_add_epi64(_mm512_add_epi64(_mm512_sad_epu8(c0, zero), _mm512_sad_epu8(c1, zero)),
                                          _mm512_add_epi64(_mm512_sad_epu8(c2, zero), _mm512_sad_epu8(c3, zero)));
    __m512i v[4] = {c0, c1, c2, c3};
    __m256i sum8 = _mm512_cvtepi64_epi32(sums);
    if constexpr (T == GGML_Q4_0) {
      for (auto& x : v) x = _mm512_sub_epi8(x, _mm512_set1_epi8(8));
      sum8 = _mm256_sub_epi32(sum8, _mm256_set1_epi32(256));
    }
    for (int p = 0; p < 4; ++p) _mm512_store_si512(u.q[b * 4 + p].bytes, v[p]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(u.c.data() + 8 * b), _mm256_mullo_epi32(sum8, _mm256_set1_epi32(-128)));
    _mm256_storeu_ps(u.d.data() + 8 * b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk))));
    if constexpr (T == GGML_Q4_1)
      _mm256_storeu_ps(u.mn.data() + 8 * b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16))));
  }
}

// The group's 8 weight rows . the 16 input rows of lane group g: out[r * ldo + j] for r < rows. `ahead` (or null):
// the next x8 group's bytes, prefetched block by block while this one computes: the unpacking reads a whole group
// at once, so without it the weights' DRAM latency and this arithmetic would take turns instead of overlapping.
template <int64_t T>
inline void group_gemm_q8(const GroupBytes& u, const PackedRows& p, int64_t g, float* out, int64_t ldo, int64_t rows,
                          const uint8_t* ahead) {
  constexpr int64_t gb = T == GGML_Q4_0 ? 144 : 160;
  const int64_t nb = p.nb;
  const Line* xq = p.q.data() + g * nb * 8;
  const Line *xd = p.d.data() + g * nb, *xs = p.s.data() + g * nb;
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (ahead != nullptr)
      for (int64_t line = 0; line < gb; line += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + b * gb + line), _MM_HINT_T0);
    const uint8_t* w = u.q[b * 4].bytes;
    const int32_t* c = u.c.data() + 8 * b;
    __m512i d0 = _mm512_set1_epi32(c[0]), d1 = _mm512_set1_epi32(c[1]), d2 = _mm512_set1_epi32(c[2]),
            d3 = _mm512_set1_epi32(c[3]), d4 = _mm512_set1_epi32(c[4]), d5 = _mm512_set1_epi32(c[5]),
            d6 = _mm512_set1_epi32(c[6]), d7 = _mm512_set1_epi32(c[7]);
    for (int st = 0; st < 8; ++st) {
      const __m512i x = _mm512_load_si512(xq[b * 8 + st].bytes);
      const uint8_t* ws = w + 64 * (st / 2) + 4 * (st % 2);  // row j's quad at ws + 8 j
      // each weight row's quad as vpdpbusd's broadcast memory operand (GCC emits a separate vpbroadcastd)
#define LW_DPBUSD_BCAST(acc, j) \
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(x), "m"(*reinterpret_cast<const int32_t*>(ws + 8 * (j))))
      LW_DPBUSD_BCAST(d0, 0); LW_DPBUSD_BCAST(d1, 1); LW_DPBUSD_BCAST(d2, 2); LW_DPBUSD_BCAST(d3, 3);
      LW_DPBUSD_BCAST(d4, 4); LW_DPBUSD_BCAST(d5, 5); LW_DPBUSD_BCAST(d6, 6); LW_DPBUSD_BCAST(d7, 7);
#undef LW_DPBUSD_BCAST
    }
    const __m512i dot[8] = {d0, d1, d2, d3, d4, d5, d6, d7};
    const __m512 dx = _mm512_load_ps(xd[b].bytes);
    for (int j = 0; j < 8; ++j)
      acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(u.d[8 * b + j]), dx), _mm512_cvtepi32_ps(dot[j])));
    if constexpr (T == GGML_Q4_1)
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(_mm512_set1_ps(u.mn[8 * b + j]), _mm512_load_ps(xs[b].bytes)));
  }
  alignas(64) float t[8][kLanes];
  for (int j = 0; j < 8; ++j) _mm512_store_ps(t[j], acc[j]);
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < 8; ++j) out[r * ldo + j] = t[j][r];
}
#endif

// -- the thread pool ----------------------------------------------------------------------------------------------
inline void cpu_relax() {  // the spin-wait hint
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A fixed team of worker threads for the many short parallel regions of a forward pass. A region is split into
// tasks that the caller and whichever workers are awake take from a shared counter, so a worker that the OS has
// descheduled (cores oversubscribed by other processes) delays nobody: the caller does its tasks, and waits only
// for tasks already started. Idle workers spin briefly (regions follow each other within microseconds), yielding
// their core to other runnable threads while they spin, then sleep on a condition variable.
class SpinPool {
 public:
  explicit SpinPool(int workers) : pid_(getpid()) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }
  ~SpinPool() {  // the libraries keep theirs for the process's life; tests make and drop pools
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  SpinPool(const SpinPool&) = delete;
  SpinPool& operator=(const SpinPool&) = delete;
  int parts() const { return static_cast<int>(threads_.size()) + 1; }
  void park() { parked_.store(true); }  // idle workers sleep now instead of spinning out kSpin
  pid_t pid() const { return pid_; }

  // fn(task) for task in [0, tasks), by the calling thread and any workers that join; returns when all are done.
  // The first exception thrown by any task reaches the caller (the remaining tasks are skipped).
  void run(int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> one_caller(run_mu_);
    fn_ = &fn;
    tasks_ = tasks;
    next_.store(0, std::memory_order_relaxed);
    if (solo_left_ > 0) {  // the workers lost more than they gave lately: this region runs on the caller alone
      --solo_left_;
      take_tasks();
      std::exception_ptr error = std::exchange(error_, nullptr);
      if (error) std::rethrow_exception(error);
      return;
    }
    parked_.store(false);
    const uint64_t gen = (state_.load() >> 32) + 1;
    state_.store(gen << 32, std::memory_order_release);  // open, no worker joined yet
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }  // a worker between its check and its wait sees the new generation
      cv_.notify_all();
    }
    const auto t0 = std::chrono::steady_clock::now();
    take_tasks();
    const auto t1 = std::chrono::steady_clock::now();
    // Close the region to late workers, then wait for those inside (they hold tasks already started).
    uint64_t s = state_.fetch_or(kClosed, std::memory_order_acq_rel) | kClosed;
    for (int spins = 0; (s & kCount) != 0; ++spins) {
      if (spins < 2000) cpu_relax();
      else sched_yield();  // a joined worker may be waiting for this core
      s = state_.load(std::memory_order_acquire);
    }
    // A worker the OS preempted in the middle of a task makes the caller wait for a whole time slice. When
    // that happens often (other processes want these cores), waiting costs more than the workers' help: run
    // the next regions on the caller alone, then try the workers again. On idle cores the wait is at most one
    // small task, shorter than the caller's own share, so this never triggers.
    const auto t2 = std::chrono::steady_clock::now();
    stalls_ = (stalls_ << 1) | (t2 - t1 > t1 - t0 + std::chrono::microseconds(20) ? 1u : 0u);
    if (__builtin_popcount(stalls_ & 0xffffu) >= 3) {
      solo_left_ = kSoloRegions;
      stalls_ = 0;
    }
    std::exception_ptr error = std::exchange(error_, nullptr);
    if (error) std::rethrow_exception(error);  // a failed check inside a region reaches Python as usual
  }

 private:
  static constexpr uint64_t kClosed = uint64_t{1} << 31, kCount = kClosed - 1;
  static constexpr auto kSpin = std::chrono::milliseconds(2);
  static constexpr int kSoloRegions = 1024;  // about five tokens of a small model

  void take_tasks() {
    for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < tasks_;) {
      try {
        (*fn_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(tasks_);
      }
    }
  }

  void work() {
    uint64_t seen = 0;  // the last generation this worker joined or saw closed
    for (;;) {
      auto spin_start = std::chrono::steady_clock::now();
      uint64_t s;
      for (int spins = 0;; ++spins) {
        if (stop_.load(std::memory_order_relaxed)) return;
        s = state_.load(std::memory_order_acquire);
        if ((s >> 32) != seen && !(s & kClosed)) break;
        if ((s >> 32) != seen) seen = s >> 32;  // closed before we came: nothing left to do in it
        if (spins < 256) {
          cpu_relax();
          continue;
        }
        sched_yield();  // free the core for any other runnable thread (no cost when there is none)
        if (parked_.load(std::memory_order_relaxed) || std::chrono::steady_clock::now() - spin_start > kSpin) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return (state_.load() >> 32) != seen || stop_.load(); });
          sleepers_.fetch_sub(1);
          spin_start = std::chrono::steady_clock::now();
          spins = 0;
        }
      }
      // Join the open region: one CAS that fails if it closed (or a newer one began) meanwhile.
      if (!state_.compare_exchange_strong(s, s + 1, std::memory_order_acq_rel)) continue;
      seen = s >> 32;
      take_tasks();
      state_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> threads_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t tasks_ = 0;
  uint32_t stalls_ = 0;  // one bit per recent region: did the caller wait longer than it worked?
  int solo_left_ = 0;    // regions still to run without the workers
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> state_{0};  // generation << 32 | closed bit | number of workers inside
  std::atomic<int> sleepers_{0};
  std::atomic<bool> parked_{false}, stop_{false};
  std::mutex error_mu_;
  std::exception_ptr error_;  // the first exception a task threw in this run
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  pid_t pid_;
};

// fn(lo, hi) over [begin, end) in chunks of at least `grain` (about four per part, so that whoever is running
// picks up the share of a descheduled thread), on `pool`; align: chunk sizes are rounded up to a multiple of it
// (8 for output rows: an x8 group split between two chunks would be computed twice).
constexpr int64_t kChunksPerPart = 4;
template <typename F>
void pool_for(SpinPool& pool, int64_t begin, int64_t end, int64_t grain, const F& f, int64_t align = 1) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t chunks = std::min<int64_t>(kChunksPerPart * pool.parts(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1 || pool.parts() == 1) return f(begin, end);
  const int64_t chunk = ((n + chunks - 1) / chunks + align - 1) / align * align;
  pool.run((n + chunk - 1) / chunk, [&](int64_t c) { f(begin + c * chunk, std::min(end, begin + (c + 1) * chunk)); });
}

// Up to this many input rows the decode kernels (weights read once, every row dotted in cache) beat
// dequantizing to a gemm: with int8 activations up to 32, with the float kernels up to 8.
constexpr int64_t kSmallBatch = 32;
// Tokens per forward chunk with float activations: every weight group is dequantized once per chunk, so a longer
// chunk spreads that over more tokens.
constexpr int64_t kFloatChunk = 128;
// Tokens per forward chunk with int8 activations: each chunk reads every weight from memory once, and with
// group_gemm_q8 (AVX-512) the arithmetic per weight byte is cheap enough that 32-token chunks waited on memory
// (256 measured no faster than 128).
constexpr int64_t kInt8Chunk = 128;
constexpr int64_t kMaxChunk = std::max({kFloatChunk, kSmallBatch, kInt8Chunk});  // DecodeRows' most rows
#if defined(LW_AVX512)
constexpr int64_t kGroupRows = 8;
#else
constexpr int64_t kGroupRows = 4;
#endif
inline int64_t decode_rows_limit(bool int8) { return int8 ? kSmallBatch : 8; }
// Weight rows per plain-layout decode kernel call: they share each activation block's loads (2 rows measured
// faster than 4 or 8: more interleaved streams hurt the prefetchers).
constexpr int64_t kRows = 2;

// One weight matrix as the decode kernels see it: raw block rows.
struct WeightRef {
  const uint8_t* data;
  int64_t stride, type;
};

// The activation rows of one decode matmul, prepared once: int8 blocks (integer dot products, as llama.cpp does on
// every CPU; the drift from float is bounded in tests/test_native_backend.py) or the float rows themselves. The
// choice is the caller's, per call: there is no process-wide switch.
// out[i * ldo + j] = w[j * k, (j + 1) * k) . x[i * k, (i + 1) * k) for the 8 float rows of w and m input rows
// (defined with the vector helpers below).
inline void dot8_float_rows(const float* w, int64_t k, const float* x, int64_t m, float* out, int64_t ldo);

struct DecodeRows {
  const float* x;
  int64_t m, k, nb;
  bool int8;
  QuantRows qx;
#if defined(LW_AVX512)
  PackedRows px;  // the rows in vector lanes for group_gemm_q8 (int8 and at least kGemmRows rows)
  // A lane group of this many rows or more (a short last one is padded) beats group_dot_q8<8>'s time for them.
  static constexpr int64_t kGemmRows = 14;
#endif
  DecodeRows(const float* xp, int64_t m_, int64_t k_, bool int8_)
      : x(xp), m(m_), k(k_), nb(k_ / QK), int8(int8_), qx(int8 ? m_ : 0, k_) {
    if (int8) quantize_rows(xp, m_, k_, qx);
#if defined(LW_AVX512)
    if (int8 && m >= kGemmRows) pack_rows(qx, m, nb, px);
#endif
  }

  // Float activations: plain weight rows are dequantized 8 at a time and dotted with every input row by the same
  // kernel as the x8 groups, whatever the number of rows, so a token's sums do not depend on its chunk.
  bool dequant_once() const { return !int8; }

  // How many weight rows from `local` one dot_range call takes: an x8 group's rest, 8 dequantized plain rows, or
  // kRows plain rows.
  int64_t unit(const WeightRef& w, int64_t local) const {
    return interleaved(w.type) || dequant_once() ? 8 - local % 8 : kRows;
  }

  // out[i * ldo + j] = row (r0 + j) of w . input row i (int8 activations), for j < n (n <= kRows).
  void dot_rows(const WeightRef& w, int64_t r0, int64_t n, float* out, int64_t ldo) const {
    if (w.type == GGML_Q4_0) return q8_rows<GGML_Q4_0>(w, r0, n, out, ldo);
    if (w.type == GGML_Q4_1) return q8_rows<GGML_Q4_1>(w, r0, n, out, ldo);
    return q8_rows<GGML_Q8_0>(w, r0, n, out, ldo);
  }

  // Like dot_rows for any weight layout and n <= 8; for an x8 weight rows r0 .. r0 + n must be in one group.
  void dot_range(const WeightRef& w, int64_t r0, int64_t n, float* out, int64_t ldo) const {
    if (!interleaved(w.type) && dequant_once()) {
      const int64_t bt = base_type(w.type);
      thread_local std::vector<float> wf;
      wf.assign(8 * k, 0.f);  // rows past n stay zero
      for (int64_t j = 0; j < n; ++j) dequant_row(bt, w.data + (r0 + j) * w.stride, wf.data() + j * k);
      if (n == 8) return dot8_float_rows(wf.data(), k, x, m, out, ldo);
      float tmp[kMaxChunk * 8];
      dot8_float_rows(wf.data(), k, x, m, tmp, 8);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) out[i * ldo + j] = tmp[i * 8 + j];
      return;
    }
    if (!interleaved(w.type)) {
      for (int64_t j = 0; j < n; j += kRows) dot_rows(w, r0 + j, std::min(kRows, n - j), out + j, ldo);
      return;
    }
    const int64_t g = r0 / 8, within = r0 % 8;
    if (within == 0 && n == 8) return dot_group(w, g, out, ldo);
    float tmp[kMaxChunk * 8];
    dot_group(w, g, tmp, 8);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) out[i * ldo + j] = tmp[i * 8 + within + j];
  }

  // out[i * ldo + j] = row 8g + j of the x8 weight w . input row i, for j < 8.
  void dot_group(const WeightRef& w, int64_t g, float* out, int64_t ldo) const {
    const uint8_t* group = w.data + g * 8 * w.stride;
    const int64_t bt = base_type(w.type);
    if (int8) {
      int64_t i = 0;
#if defined(LW_AVX512)
      if (px.groups > 0) {  // lane groups of 16 rows; a last one of few rows through group_dot_q8 (same bits)
        thread_local GroupBytes u;
        if (bt == GGML_Q4_0) unpack_group_bytes<GGML_Q4_0>(group, nb, u);
        else unpack_group_bytes<GGML_Q4_1>(group, nb, u);
        for (int64_t g = 0; g < px.groups; ++g) {
          const int64_t rows = std::min(kLanes, m - g * kLanes);
          if (rows < kGemmRows) break;
          const uint8_t* ahead = g == 0 ? group + 8 * w.stride : nullptr;  // the next group follows this one
          if (bt == GGML_Q4_0) group_gemm_q8<GGML_Q4_0>(u, px, g, out + i * ldo, ldo, rows, ahead);
          else group_gemm_q8<GGML_Q4_1>(u, px, g, out + i * ldo, ldo, rows, ahead);
          i += rows;
        }
      }
#endif
      while (i < m) {
        // rows share each block's unpacked nibbles: 8 where 32 vector registers hold them, else 4
        const int64_t r = kGroupRows > 4 && m - i >= kGroupRows ? kGroupRows : m - i >= 4 ? 4 : 1;
        const int8_t* xq = qx.q.data() + i * k;
        const float *xd = qx.d.data() + i * nb, *xs = qx.s.data() + i * nb;
        const int32_t* qs = qx.qsum.data() + i * nb;
        float* o = out + i * ldo;
        if (bt == GGML_Q4_0) {
          if (r == 8) group_dot_q8<GGML_Q4_0, 8>(group, xq, xd, xs, qs, nb, o, ldo);
          else if (r == 4) group_dot_q8<GGML_Q4_0, 4>(group, xq, xd, xs, qs, nb, o, ldo);
          else group_dot_q8<GGML_Q4_0, 1>(group, xq, xd, xs, qs, nb, o, ldo);
        } else {
          if (r == 8) group_dot_q8<GGML_Q4_1, 8>(group, xq, xd, xs, qs, nb, o, ldo);
          else if (r == 4) group_dot_q8<GGML_Q4_1, 4>(group, xq, xd, xs, qs, nb, o, ldo);
          else group_dot_q8<GGML_Q4_1, 1>(group, xq, xd, xs, qs, nb, o, ldo);
        }
        i += r;
      }
      return;
    }
    // Float activations: the group's 8 rows dequantized to float once (each element d * q + m, as the float
    // reference reads them), then every input row dotted with all 8 (one activation load feeds 8 multiply-adds).
    // Dequantizing per input row inside the dot instead made a 32-row prompt chunk cost 32 dequantizations.
    thread_local std::vector<uint8_t> plain;
    thread_local std::vector<float> wf;
    plain.resize(8 * w.stride);
    wf.resize(8 * k);
    unpack_group(bt, group, nb, plain.data());
    for (int64_t j = 0; j < 8; ++j) dequant_row(bt, plain.data() + j * w.stride, wf.data() + j * k);
    dot8_float_rows(wf.data(), k, x, m, out, ldo);
  }

  // One weight row's nb blocks -> k floats (each element d * q + m, as the float reference reads them).
  void dequant_row(int64_t t, const uint8_t* row, float* out) const {
    const int64_t bb = block_bytes(t);
    for (int64_t b = 0; b < nb; ++b) dequant_block(t, row + b * bb, out + b * QK);
  }

  template <int64_t T>
  void q8_rows(const WeightRef& w, int64_t r0, int64_t n, float* out, int64_t ldo) const {
    const uint8_t* rows[kRows];
    for (int64_t j = 0; j < n; ++j) rows[j] = w.data + (r0 + j) * w.stride;
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* xq = qx.q.data() + i * k;
      const float *xd = qx.d.data() + i * nb, *xs = qx.s.data() + i * nb;
      const int32_t* qs = qx.qsum.data() + i * nb;
      float* o = out + i * ldo;
      if (n == kRows) {
        rows_dot_q8<T, kRows>(rows, xq, xd, xs, qs, nb, o);
      } else {
        for (int64_t j = 0; j < n; ++j) rows_dot_q8<T, 1>(rows + j, xq, xd, xs, qs, nb, o + j);
      }
    }
  }
};

inline void decode_columns(const DecodeRows& rows, const std::vector<WeightRef>& ws, const std::vector<int64_t>& offsets,
                           int64_t c0, int64_t c1, float* y, int64_t ldy) {
  size_t w = 0;
  for (int64_t c = c0; c < c1;) {
    while (c >= offsets[w + 1]) ++w;
    const int64_t local = c - offsets[w];
    const int64_t n = std::min<int64_t>({rows.unit(ws[w], local), c1 - c, offsets[w + 1] - c});
    rows.dot_range(ws[w], local, n, y + c, ldy);
    c += n;
  }
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// RMSNorm and RoPE are written once, portably: a few hundred multiplies per token and head that the compiler
// vectorises where it can (RoPE) or that must keep their order (the norm's double-precision sum).
inline void rms_norm(const float* x, const float* w, float* out, int64_t n, double eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float scale = float(1.0 / std::sqrt(ss / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

// Rotate adjacent pairs (0,1), (2,3), ... of each head by the position's angles (Meta/GGUF rotary layout).
inline void rope_inplace(float* v, int64_t heads, int64_t d, const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; ++h) {
    float* p = v + h * d;
    for (int64_t i = 0; i < d / 2; ++i) {
      const float a = p[2 * i], b = p[2 * i + 1];
      p[2 * i] = a * cos[i] - b * sin[i];
      p[2 * i + 1] = a * sin[i] + b * cos[i];
    }
  }
}

// -- attention ------------------------------------------------------------------------------------------------------
// KV cache elements: float32, or float16 (half the memory, as llama.cpp keeps it); math is float32 either way.
inline float as_float(float v) { return v; }
struct Half {  // a float16 KV element (the bits; torch's c10::Half has the same layout)
  uint16_t bits;
};
inline float as_float(Half v) { return half_to_float(v.bits); }

inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(Half* dst, const float* src, int64_t n) { floats_to_halves(src, reinterpret_cast<uint16_t*>(dst), n); }

template <typename KV>
void ref::attend_one_head(const float* q, const KV* keys, const KV* vals, const bool* visible, int64_t n_keys,
                          int64_t D, float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < n_keys; ++s) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * as_float(keys[s * D + d]);
    scores[s] = visible != nullptr && !visible[s] ? -INFINITY : dot * scale;
    mx = std::max(mx, scores[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < n_keys; ++s) {
    scores[s] = scores[s] == -INFINITY ? 0.f : std::exp(scores[s] - mx);
    total += scores[s];
  }
  const float inv_total = 1.f / total;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t s = 0; s < n_keys; ++s) {
    if (scores[s] == 0.f) continue;
    for (int64_t d = 0; d < D; ++d) out[d] += scores[s] * as_float(vals[s * D + d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] *= inv_total;
}

template <typename KV>
void ref::attend_queries(int64_t nq, const float* const* q, float* const* out, const int64_t* first,
                         const int64_t* limit, const KV* keys, const KV* vals, int64_t D, float scale,
                         std::vector<float>& work) {
  for (int64_t i = 0; i < nq; ++i) {
    work.resize(static_cast<size_t>(limit[i] - first[i]));
    ref::attend_one_head(q[i], keys + first[i] * D, vals + first[i] * D, nullptr, limit[i] - first[i], D, scale,
                         work.data(), out[i]);
  }
}

#if defined(LW_AVX2) || defined(LW_NEON)
// The SIMD attention, written once over an 8-float vector for AVX2 (one ymm register) and NEON (two q
// registers): GCC/Clang vector extensions, with the ISA's instructions only where the extensions have no word.
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
// Loads and stores through the ISA's unaligned moves: a 32-byte memcpy becomes two 16-byte moves under generic
// x86 tuning, and a 32-byte load of two 16-byte stores fails store forwarding (~14x slower attention, measured).
inline v8f v8_load(const float* p) {
#if defined(LW_AVX2)
  return (v8f)_mm256_loadu_ps(p);
#else
  v8f v;
  std::memcpy(&v, p, 32);
  return v;
#endif
}
inline void v8_store(float* p, v8f v) {
#if defined(LW_AVX2)
  _mm256_storeu_ps(p, (__m256)v);
#else
  std::memcpy(p, &v, 32);
#endif
}
inline v8f v8_load(const Half* p) {
#if defined(LW_AVX2)
  return (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(p)));
  const float32x4_t lo = vcvt_f32_f16(vget_low_f16(h)), hi = vcvt_high_f32_f16(h);
  v8f v;
  std::memcpy(&v, &lo, 16);
  std::memcpy(reinterpret_cast<char*>(&v) + 16, &hi, 16);
  return v;
#endif
}
inline float v8_sum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
inline v8f v8_set(float x) { return v8f{x, x, x, x, x, x, x, x}; }
// {x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7} (AVX's hadd order).
inline v8f v8_pairsum(v8f x, v8f y) {
  return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
}
// The sums of 8 vectors at once: lane j is the sum of a[j]'s lanes.
inline v8f v8_sum8(const v8f* a) {
  const v8f h0 = v8_pairsum(v8_pairsum(a[0], a[1]), v8_pairsum(a[2], a[3]));  // a0..a3: low halves, high halves
  const v8f h1 = v8_pairsum(v8_pairsum(a[4], a[5]), v8_pairsum(a[6], a[7]));
  return __builtin_shufflevector(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(h0, h1, 4, 5, 6, 7, 12, 13, 14, 15);
}
inline v8f v8_fma(v8f a, v8f b, v8f c) {  // a * b + c, fused (the file is built with -ffp-contract=off)
#if defined(LW_AVX2)
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  float32x4_t r[2];
  for (int h = 0; h < 2; ++h) {
    float32x4_t x, y, z;
    std::memcpy(&x, reinterpret_cast<const char*>(&a) + 16 * h, 16);
    std::memcpy(&y, reinterpret_cast<const char*>(&b) + 16 * h, 16);
    std::memcpy(&z, reinterpret_cast<const char*>(&c) + 16 * h, 16);
    r[h] = vfmaq_f32(z, x, y);
  }
  v8f out;
  std::memcpy(&out, r, 32);
  return out;
#endif
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), Cephes' expf polynomial: within ~2 ulp.
inline v8f v8_exp_nonpositive(v8f x) {
  x = x < v8_set(-87.f) ? v8_set(-87.f) : x;
  const v8f t = x * v8_set(1.44269504088896341f) - v8_set(0.5f);
  v8i n = __builtin_convertvector(t, v8i);  // truncation of t >= -126 - 0.5, i.e. round(x * log2(e)) for x <= 0
  n = t < __builtin_convertvector(n, v8f) ? n - 1 : n;
  n = n < -126 ? v8i{} - 126 : n;  // keeps 2^n normal (x = -87 would give -127)
  const v8f nf = __builtin_convertvector(n, v8f);
  v8f r = x - nf * v8_set(0.693359375f);
  r = r - nf * v8_set(-2.12194440e-4f);
  v8f p = v8_set(1.9875691500e-4f);
  p = p * r + v8_set(1.3981999507e-3f);
  p = p * r + v8_set(8.3334519073e-3f);
  p = p * r + v8_set(4.1665795894e-2f);
  p = p * r + v8_set(1.6666665459e-1f);
  p = p * r + v8_set(5.0000001201e-1f);
  p = p * r * r + (r + v8_set(1.f));
  const v8i scale = (n + 127) << 23;  // 2^n, n >= -126: a normal float
  return p * (v8f)scale;  // the bits, reinterpreted
}
#endif

// One query head against keys/values [0, n_keys) of its key/value head (rows of D elements), softmax in float32.
template <typename KV>
void attend_one_head(const float* q, const KV* keys, const KV* vals, const bool* visible, int64_t n_keys,
                     int64_t D, float scale, float* scores, float* out) {
#if defined(LW_AVX2) || defined(LW_NEON)
  if (D % 8 != 0 || D > 256) return ref::attend_one_head(q, keys, vals, visible, n_keys, D, scale, scores, out);
  const int64_t nd = D / 8;
  v8f qv[32];
  for (int64_t c = 0; c < nd; ++c) qv[c] = v8_load(q + 8 * c) * v8_set(scale);
  // Scores 8 keys at a time: their 8 partial-sum vectors reduce together (one transpose-and-add) instead of one
  // horizontal sum per key, which cost as much as the key's dot product.
  v8f vmx = v8_set(-INFINITY);
  int64_t first_tail = 0;
  for (; first_tail + 8 <= n_keys; first_tail += 8) {
    v8f a[8];
    for (int j = 0; j < 8; ++j) {
      const KV* k = keys + (first_tail + j) * D;
      a[j] = qv[0] * v8_load(k);
      for (int64_t c = 1; c < nd; ++c) a[j] = v8_fma(qv[c], v8_load(k + 8 * c), a[j]);
    }
    v8f r = v8_sum8(a);
    if (visible != nullptr)
      for (int j = 0; j < 8; ++j)
        if (!visible[first_tail + j]) r[j] = -INFINITY;
    v8_store(scores + first_tail, r);
    vmx = vmx > r ? vmx : r;
  }
  float mx = -INFINITY;
  for (int j = 0; j < 8; ++j) mx = std::max(mx, vmx[j]);
  for (int64_t t = first_tail; t < n_keys; ++t) {
    const KV* k = keys + t * D;
    v8f a = qv[0] * v8_load(k);
    for (int64_t c = 1; c < nd; ++c) a = v8_fma(qv[c], v8_load(k + 8 * c), a);
    scores[t] = visible != nullptr && !visible[t] ? -INFINITY : v8_sum(a);
    mx = std::max(mx, scores[t]);
  }
  int64_t s = 0;
  v8f vtotal = v8_set(0.f);
  for (; s + 8 <= n_keys; s += 8) {
    const v8f x = v8_load(scores + s);
    const v8f e = x == v8_set(-INFINITY) ? v8_set(0.f) : v8_exp_nonpositive(x - v8_set(mx));
    v8_store(scores + s, e);
    vtotal += e;
  }
  float total = v8_sum(vtotal);
  for (; s < n_keys; ++s) {
    scores[s] = scores[s] == -INFINITY ? 0.f : std::exp(scores[s] - mx);
    total += scores[s];
  }
  v8f acc[32];
  for (int64_t c = 0; c < nd; ++c) acc[c] = v8_set(0.f);
  for (s = 0; s < n_keys; ++s) {
    if (scores[s] == 0.f) continue;
    const v8f p = v8_set(scores[s]);
    for (int64_t c = 0; c < nd; ++c) acc[c] = v8_fma(p, v8_load(vals + s * D + 8 * c), acc[c]);
  }
  const v8f inv_total = v8_set(1.f / total);
  for (int64_t c = 0; c < nd; ++c) {
    const v8f o = acc[c] * inv_total;
    v8_store(out + 8 * c, o);
  }
#else
  ref::attend_one_head(q, keys, vals, visible, n_keys, D, scale, scores, out);
#endif
}

#if defined(LW_AVX2) || defined(LW_NEON)
// o[0, 8 * CB) += sum over j < n of w[j] * rows[j * ld + (0, 8 * CB)] (float or float16 rows, converted in the
// load), with CB accumulators kept in registers.
template <int CB, typename Row>
inline void weighted_rows(float* o, const float* w, int64_t n, const Row* rows, int64_t ld) {
  v8f acc[CB];
  for (int u = 0; u < CB; ++u) acc[u] = v8_load(o + 8 * u);
  for (int64_t j = 0; j < n; ++j) {
    if (w[j] == 0.f) continue;
    const v8f p = v8_set(w[j]);
    for (int u = 0; u < CB; ++u) acc[u] = v8_fma(p, v8_load(rows + j * ld + 8 * u), acc[u]);
  }
  for (int u = 0; u < CB; ++u) v8_store(o + 8 * u, acc[u]);
}
#endif

#if defined(LW_AVX2) || defined(LW_NEON)
// T input rows against the 8 weight rows, R weight rows per pass: the R * T accumulators stay in registers and each
// load feeds R or T multiply-adds (one input row at a time, 9 loads fed 8 and the loads were the limit). Every
// (weight row, input row) accumulator takes the same fused multiply-adds in the same order and the same lane
// reduction whatever R and T are, so the result does not depend on the blocking.
// An empty asm that takes v in a vector register: the compiler then loads it once instead of folding the load
// into every multiply-add that reads it (which made T loads of each weight vector).
inline void keep_in_register(v8f& v) {
#if defined(__AVX512VL__)
  asm("" : "+v"(v));  // any of the 32 ymm registers
#elif defined(LW_AVX2)
  asm("" : "+x"(v));
#endif
}

template <int R, int T>
inline void dot8_float_block(const float* w, int64_t k, const float* x, float* out, int64_t ldo) {
  v8f sums[T][8];
  for (int h = 0; h < 8; h += R) {
    v8f acc[T][R];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[t][r] = v8_set(0.f);
    for (int64_t c = 0; c < k; c += 8) {
      v8f xv[T];
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) xv[t] = v8_load(x + t * k + c);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        v8f wv = v8_load(w + (h + r) * k + c);
        keep_in_register(wv);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[t][r] = v8_fma(wv, xv[t], acc[t][r]);
      }
    }
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) sums[t][h + r] = acc[t][r];
  }
  for (int t = 0; t < T; ++t) v8_store(out + t * ldo, v8_sum8(sums[t]));
}
#endif

inline void dot8_float_rows(const float* w, int64_t k, const float* x, int64_t m, float* out, int64_t ldo) {
#if defined(LW_AVX2) || defined(LW_NEON)
  if (k % 8 == 0) {
    // Register budgets: AVX-512VL's 32 ymm registers hold 8 x 3 accumulators; AVX2's 16 ymm and NEON's 32 q
    // registers (two per v8f) hold 4 x 2 of them plus the loads.
#if defined(__AVX512VL__)
    constexpr int R = 8, T = 3;
#else
    constexpr int R = 4, T = 2;
#endif
    int64_t i = 0;
    for (; i + T <= m; i += T) dot8_float_block<R, T>(w, k, x + i * k, out + i * ldo, ldo);
    for (; i < m; ++i) dot8_float_block<8, 1>(w, k, x + i * k, out + i * ldo, ldo);
    return;
  }
#endif
  for (int64_t i = 0; i < m; ++i)
    for (int j = 0; j < 8; ++j) {
      float sum = 0.f;
      for (int64_t c = 0; c < k; ++c) sum += w[j * k + c] * x[i * k + c];
      out[i * ldo + j] = sum;
    }
}

// ref::attend_queries, with 8 keys' scores reduced together. Every query reads the keys and values where they are,
// float16 converted in the load (a float copy shared by the call's queries was slower, even for a prompt chunk's
// 24: docs/performance.md). Only a last block shorter than 8 keys is copied, with zeros for the missing keys, so
// that no read passes the cache's end. A query's result does not depend on which queries share its call (a prompt
// chunk's tokens, a decoding token alone: their windows may start at different keys).
template <typename KV>
void attend_queries(int64_t nq, const float* const* q, float* const* out, const int64_t* first, const int64_t* limit,
                    const KV* keys, const KV* vals, int64_t D, float scale, std::vector<float>& work) {
#if defined(LW_AVX2) || defined(LW_NEON)
  if (D % 8 != 0 || D > 256 || nq < 1) return ref::attend_queries(nq, q, out, first, limit, keys, vals, D, scale, work);
  const int64_t nd = D / 8;
  int64_t lo = first[0], hi = limit[0];
  for (int64_t i = 1; i < nq; ++i) lo = std::min(lo, first[i]), hi = std::max(hi, limit[i]);
  lo = lo / 8 * 8;  // blocks at multiples of 8: each key's lane, and so each sum's order, is the same in any call
  const int64_t span = (hi - lo + 7) / 8 * 8;
  work.resize(static_cast<size_t>(nq * span + 8 * D + nq));
  float* const sc = work.data();  // (nq, span) scores of keys lo.., then weights
  float* const kb = sc + nq * span;  // a last short block of keys as float
  float* const totals = kb + 8 * D;
  const auto convert = [&](const KV* rows, int64_t s0, int64_t n) {
    for (int64_t j = 0; j < 8; ++j)
      for (int64_t c = 0; c < nd; ++c) {
        const v8f v = j < n ? v8_load(rows + (s0 + j) * D + 8 * c) : v8_set(0.f);
        v8_store(kb + j * D + 8 * c, v);
      }
  };
  // The 8 keys' dot products with query i, from their rows (float or float16) at k.
  const auto dots = [&](int64_t i, const auto* k) {
    v8f a[8];
    for (int64_t c = 0; c < nd; ++c) {
      const v8f qc = v8_load(q[i] + 8 * c);
      for (int j = 0; j < 8; ++j) a[j] = c == 0 ? qc * v8_load(k + j * D) : v8_fma(qc, v8_load(k + j * D + 8 * c), a[j]);
    }
    return v8_sum8(a);
  };
  for (int64_t s0 = lo; s0 < hi; s0 += 8) {
    const bool in_place = s0 + 8 <= hi;
    if (!in_place) convert(keys, s0, hi - s0);
    for (int64_t i = 0; i < nq; ++i) {
      v8f r = v8_set(-INFINITY);
      if (s0 < limit[i] && s0 + 8 > first[i]) {
        r = (in_place ? dots(i, keys + s0 * D) : dots(i, static_cast<const float*>(kb))) * v8_set(scale);
        for (int j = 0; j < 8; ++j)
          if (s0 + j < first[i] || s0 + j >= limit[i]) r[j] = -INFINITY;
      }
      v8_store(sc + i * span + (s0 - lo), r);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {  // softmax weights (not yet normalised); keys outside get 0
    float* row = sc + i * span;
    v8f vmx = v8_set(-INFINITY);
    for (int64_t s = 0; s < span; s += 8) {
      const v8f x = v8_load(row + s);
      vmx = vmx > x ? vmx : x;
    }
    float mx = -INFINITY;
    for (int j = 0; j < 8; ++j) mx = std::max(mx, vmx[j]);
    v8f vtotal = v8_set(0.f);
    for (int64_t s = 0; s < span; s += 8) {
      const v8f x = v8_load(row + s);
      const v8f e = x == v8_set(-INFINITY) ? v8_set(0.f) : v8_exp_nonpositive(x - v8_set(mx));
      v8_store(row + s, e);
      vtotal += e;
    }
    totals[i] = v8_sum(vtotal);
    std::memset(out[i], 0, D * sizeof(float));
  }
  for (int64_t s0 = lo; s0 < hi; s0 += 8) {
    const int64_t n = std::min<int64_t>(8, hi - s0);
    const KV* v = vals + s0 * D;
    for (int64_t i = 0; i < nq; ++i) {
      if (s0 >= limit[i] || s0 + 8 <= first[i]) continue;
      const float* w = sc + i * span + (s0 - lo);
      int64_t c = 0;  // accumulators in registers: a fixed number of 8-float chunks at a time
      for (; c + 8 <= nd; c += 8) weighted_rows<8>(out[i] + 8 * c, w, n, v + 8 * c, D);
      for (; c + 4 <= nd; c += 4) weighted_rows<4>(out[i] + 8 * c, w, n, v + 8 * c, D);
      for (; c < nd; ++c) weighted_rows<1>(out[i] + 8 * c, w, n, v + 8 * c, D);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const v8f inv = v8_set(1.f / totals[i]);
    for (int64_t c = 0; c < nd; ++c) {
      const v8f o = v8_load(out[i] + 8 * c) * inv;
      v8_store(out[i] + 8 * c, o);
    }
  }
#else
  ref::attend_queries(nq, q, out, first, limit, keys, vals, D, scale, work);
#endif
}

// RoPE on B new q/k rows, their cache writes, and attention. Row b of qp (qkv_n floats: q, then k, then v) is the
// token at position slot[b] of cache row seq[b], with angles cos/sin (B, D/2); kc/vc point at this layer's
// (n_kv_heads, S, D) block of cache row 0, and one cache row is row_stride elements further on. Its queries see
// positions (slot - window, slot] (window 0: all up to slot). Every token's keys/values are written before any
// attends, so consecutive tokens of one row in a batch see each other. Each query head reads its group's key/value
// head directly (no copies).
template <typename KV, typename Par>
void attention_rows(const Par& par, float* qp, int64_t qkv_n, KV* kc, KV* vc, int64_t row_stride, const float* cos,
                    const float* sin, int64_t window, int64_t B, const int64_t* seq, const int64_t* slot, int64_t S,
                    int64_t D, int64_t n_heads, int64_t n_kv_heads, float* ap) {
  const int64_t G = n_heads / n_kv_heads, qdim = n_heads * D, kvdim = n_kv_heads * D;
  for (int64_t b = 0; b < B; ++b) {
    if (slot[b] < 0 || slot[b] >= S) fail("cache slot out of range");
    float* row = qp + b * qkv_n;
    rope_inplace(row, n_heads, D, cos + b * (D / 2), sin + b * (D / 2));
    rope_inplace(row + qdim, n_kv_heads, D, cos + b * (D / 2), sin + b * (D / 2));
    for (int64_t g = 0; g < n_kv_heads; ++g) {
      const int64_t at = seq[b] * row_stride + (g * S + slot[b]) * D;
      store_row(kc + at, row + qdim + g * D, D);
      store_row(vc + at, row + qdim + kvdim + g * D, D);
    }
  }
  const float scale = 1.0f / std::sqrt(float(D));
  // Work items: up to kTile tokens of one cache row (position order) with one key/value head: the tokens' G query
  // heads share each key and value. Items go out longest first from a shared counter, so a long prompt's items
  // start early and short decoding rows fill the gaps.
  constexpr int64_t kTile = 8;
  std::vector<int64_t> order(B);
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return seq[x] != seq[y] ? seq[x] < seq[y] : slot[x] < slot[y];
  });
  struct Item { int64_t t0, nt, kvh, cost; };
  std::vector<Item> items;
  for (int64_t i = 0; i < B;) {
    int64_t j = i + 1;
    while (j < B && seq[order[j]] == seq[order[i]] && j - i < kTile) ++j;
    for (int64_t kvh = 0; kvh < n_kv_heads; ++kvh) items.push_back({i, j - i, kvh, (j - i) * (slot[order[j - 1]] + 1)});
    i = j;
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  par(0, n_items, 1, [&](int64_t, int64_t) {
    thread_local std::vector<float> work;
    std::vector<const float*> qs;
    std::vector<float*> outs;
    std::vector<int64_t> firsts, limits;
    for (int64_t k = next.fetch_add(1); k < n_items; k = next.fetch_add(1)) {
      const Item& it = items[k];
      qs.clear(), outs.clear(), firsts.clear(), limits.clear();
      for (int64_t t = it.t0; t < it.t0 + it.nt; ++t) {
        const int64_t b = order[t];
        for (int64_t head = it.kvh * G; head < (it.kvh + 1) * G; ++head) {
          qs.push_back(qp + b * qkv_n + head * D);
          outs.push_back(ap + b * qdim + head * D);
          firsts.push_back(window > 0 ? std::max<int64_t>(0, slot[b] - window + 1) : 0);
          limits.push_back(slot[b] + 1);
        }
      }
      const int64_t base = seq[order[it.t0]] * row_stride + it.kvh * S * D;
      attend_queries(static_cast<int64_t>(qs.size()), qs.data(), outs.data(), firsts.data(), limits.data(),
                     kc + base, vc + base, D, scale, work);
    }
  }, 1);
}

// y (m, offsets.back()) = the decode rows against several weights laid side by side (q/k/v: one pass).
template <typename Par>
void decode_linear(const Par& par, const DecodeRows& rows, const std::vector<WeightRef>& ws,
                   const std::vector<int64_t>& offsets, float* y) {
  const int64_t n_total = offsets.back();
  par(0, n_total, 32, [&](int64_t c0, int64_t c1) { decode_columns(rows, ws, offsets, c0, c1, y, n_total); }, 8);
}

// y (m, n) = silu(rows @ gate^T) * (rows @ up^T), both weights read in one pass.
template <typename Par>
void decode_swiglu(const Par& par, const DecodeRows& rows, const WeightRef& gate, const WeightRef& up, int64_t n,
                   float* y) {
  const int64_t m = rows.m;
  par(0, n, 16, [&](int64_t r0, int64_t r1) {
    float gv[kMaxChunk * 8], uv[kMaxChunk * 8];
    for (int64_t r = r0; r < r1;) {
      const int64_t c = std::min({rows.unit(gate, r), rows.unit(up, r), r1 - r});
      rows.dot_range(gate, r, c, gv, 8);
      rows.dot_range(up, r, c, uv, 8);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < c; ++j) y[i * n + r + j] = silu(gv[i * 8 + j]) * uv[i * 8 + j];
      r += c;
    }
  }, 8);
}

// Regroup a contiguous Q4_0/Q4_1 weight of n_rows (a multiple of 8) rows into the x8 layout, in place.
template <typename Par>
void interleave_rows(const Par& par, uint8_t* base, int64_t n_rows, int64_t t, int64_t k) {
  if ((t != GGML_Q4_0 && t != GGML_Q4_1) || n_rows % 8 != 0 || k % QK != 0)
    fail("only Q4_0/Q4_1 weights with a multiple of 8 rows can be interleaved");
  const int64_t nb = k / QK, bb = block_bytes(t), row_bytes = nb * bb;
  par(0, n_rows / 8, 4, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> plain(8 * row_bytes);
    for (int64_t g = g0; g < g1; ++g) {
      uint8_t* group = base + g * 8 * row_bytes;
      std::memcpy(plain.data(), group, 8 * row_bytes);
      for (int64_t b = 0; b < nb; ++b) pack_group_block(t, plain.data() + b * bb, row_bytes, group + b * 8 * bb);
    }
  }, 1);
}

// -- the transformer block ---------------------------------------------------------------------------------------
// A GGUF llama model as the forward pass reads it. Mirrored by ctypes structures in llamaworks/quant/lean_kernels.py
// (the torch-free library passes them in): keep the field order in step.
struct Layer {
  const float* attn_norm;
  const float* ffn_norm;
  const uint8_t* weight[7];  // wq, wk, wv, wo, w1 (gate), w3 (up), w2 (down): rows of ggml blocks
  int64_t type[7];           // ggml type codes (| 256 for x8 rows)
};

struct Model {
  int64_t dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, vocab, ctx, window;  // window 0: none
  int64_t max_rows;  // KV cache rows, each ctx positions
  double eps;
  const float* inv_freq;  // head_dim / 2 rotary inverse frequencies
  const uint8_t* embedding;
  int64_t embedding_type;  // plain rows
  const uint8_t* output;   // the embedding's bytes when tied
  int64_t output_type;
  const float* output_norm;
  const Layer* layers;
  // (max_rows, n_layers, n_kv_heads, ctx, head_dim) each, float16 (or float32 with kv_float32): one row contiguous,
  // so a released row's pages are whole spans.
  void* k_cache;
  void* v_cache;
  int64_t kv_float32;
  int64_t int8_activations;  // int8 activation blocks in every matmul (else float32)
};

inline int64_t cache_row_elems(const Model& m) { return m.n_layers * m.n_kv_heads * m.ctx * m.head_dim; }

struct Scratch {  // the activations of one chunk of tokens
  std::vector<float> x, h, qkv, attn, act, tmp, cos, sin;
  Scratch(const Model& m, int64_t n)
      : x(n * m.dim), h(n * m.dim), qkv(n * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim),
        attn(n * m.n_heads * m.head_dim), act(n * m.hidden), tmp(n * m.dim), cos(n * m.head_dim / 2),
        sin(n * m.head_dim / 2) {}
};

// Tokens [0, n) of one chunk, token i at position pos[i] of cache row row[i]: the residual stream s.x through every
// block. Tokens of different rows share each weight read; their arithmetic is independent (each row's activations
// are quantized on their own, attention reads only its row), so a token's result does not depend on its batch.
template <typename KV, typename Par>
void blocks(const Par& par, const Model& m, KV* k_cache, KV* v_cache, Scratch& s, int64_t n, const int64_t* row,
            const int64_t* pos) {
  const int64_t dim = m.dim, D = m.head_dim, qdim = m.n_heads * D, kvdim = m.n_kv_heads * D;
  const int64_t qkv_n = qdim + 2 * kvdim, layer_cache = m.n_kv_heads * m.ctx * D, row_stride = cache_row_elems(m);
  const bool int8 = m.int8_activations != 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < D / 2; ++j) {
      const float angle = static_cast<float>(pos[i]) * m.inv_freq[j];  // float32, as the torch runtime
      s.cos[i * (D / 2) + j] = std::cos(angle);
      s.sin[i * (D / 2) + j] = std::sin(angle);
    }
  }
  const auto add = [&](const std::vector<float>& y) {
    for (int64_t i = 0; i < n * dim; ++i) s.x[i] += y[i];
  };
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const Layer& L = m.layers[l];
    const auto w = [&](int i, int64_t k) { return WeightRef{L.weight[i], k / QK * block_bytes(L.type[i]), L.type[i]}; };
    for (int64_t i = 0; i < n; ++i) rms_norm(&s.x[i * dim], L.attn_norm, &s.h[i * dim], dim, m.eps);
    decode_linear(par, DecodeRows(s.h.data(), n, dim, int8), {w(0, dim), w(1, dim), w(2, dim)},
                  {0, qdim, qdim + kvdim, qkv_n}, s.qkv.data());
    attention_rows(par, s.qkv.data(), qkv_n, k_cache + l * layer_cache, v_cache + l * layer_cache, row_stride,
                   s.cos.data(), s.sin.data(), m.window, n, row, pos, m.ctx, D, m.n_heads, m.n_kv_heads,
                   s.attn.data());
    decode_linear(par, DecodeRows(s.attn.data(), n, qdim, int8), {w(3, qdim)}, {0, dim}, s.tmp.data());
    add(s.tmp);
    for (int64_t i = 0; i < n; ++i) rms_norm(&s.x[i * dim], L.ffn_norm, &s.h[i * dim], dim, m.eps);
    decode_swiglu(par, DecodeRows(s.h.data(), n, dim, int8), w(4, dim), w(5, dim), m.hidden, s.act.data());
    decode_linear(par, DecodeRows(s.act.data(), n, m.hidden, int8), {w(6, m.hidden)}, {0, dim}, s.tmp.data());
    add(s.tmp);
  }
}

}  // namespace lwcore
}  // namespace
