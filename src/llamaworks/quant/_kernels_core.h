// The torch-free core of llamaworks' CPU inference: GGUF/ggml block formats (Q4_0, Q4_1, Q8_0 and the x8
// row-interleaved layout), the fused dequantize-and-dot decode kernels, a spinning thread pool, RMSNorm, RoPE and
// attention over a float16/float32 KV cache. Everything works on raw pointers. Two libraries include it:
// _kernels.cpp (torch ops for the torch runtime) and _lean.cpp (a plain C ABI for llamaworks.lean, which runs
// GGUF models without importing torch). Parallel loops take the caller's `par(begin, end, grain, fn, align)`.
#pragma once

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
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

// Everything has internal linkage (an unnamed namespace): both libraries may be loaded into one process, and
// shared symbols would merge their switches (g_int8_decode) and scratch buffers.
namespace {
namespace lwcore {

[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error("llamaworks: " + message); }

// IEEE half -> float without F16C (the portable path).
inline float half_bits_to_float(uint16_t h) {
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

// float -> IEEE half, round to nearest even (the portable path).
inline uint16_t float_to_half_bits(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
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
#endif
}

constexpr int64_t QK = 32;  // elements per block for every type handled here
constexpr int64_t GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q8_0 = 8;

// Row-interleaved ("x8") layout, made once at load for Q4_0/Q4_1 weights with a multiple of 8 rows. Per group
// of 8 consecutive rows and per 32-column block: the 8 rows' scales (fp16), Q4_1's 8 minimums, then 128 quant
// bytes arranged so that one 64-byte load and a nibble mask give, for all 8 rows at once, 8 consecutive
// weights per row in two 32-bit lanes (row i in lanes 2i and 2i + 1: columns 0-3 and 4-7 of a step). The
// activation a step needs is then one broadcast qword of the int8 row, the same for every lane pair. A decode
// kernel reads one contiguous stream and finishes 8 rows x 32 columns with four dpbusd and no horizontal sums,
// instead of interleaving 8 row streams (which defeats the prefetchers). Same bytes in total, so the tensor keeps its
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

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);  // one instruction instead of the bit-twiddling software conversion
#else
  return half_bits_to_float(h);
#endif
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

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define LLAMAWORKS_INT8_DOT 1
#endif

#ifdef LLAMAWORKS_INT8_DOT
// One x8 group block -> the 8 rows' plain ggml blocks (row i's block at plain + i * row_stride).
// The group block's quant bytes are two 64-byte halves: a holds columns 0-15, b columns 16-31. Within a half,
// column c (of 16) of row i is in byte 4 * (2 * i + (c % 8) / 4) + c % 4 (qword i holds row i), low nibble
// for c < 8, else high.
// A plain ggml block's byte p holds column p (low nibble) and p + 16 (high nibble).
inline void unpack_group_block(int64_t t, const uint8_t* gblk, uint8_t* plain, int64_t row_stride) {
  const bool q4_1 = base_type(t) == GGML_Q4_1;
  const int64_t qoff = q4_1 ? 4 : 2;
  for (int i = 0; i < 8; ++i) {
    std::memcpy(plain + i * row_stride, gblk + 2 * i, 2);
    if (q4_1) std::memcpy(plain + i * row_stride + 2, gblk + 16 + 2 * i, 2);
  }
  const uint8_t* q = gblk + (q4_1 ? 32 : 16);
  const __m512i m4 = _mm512_set1_epi8(15);
  const __m512i a = _mm512_loadu_si512(q), b = _mm512_loadu_si512(q + 64);
  // qword i: row i's plain bytes 0-7 (lo) and 8-15 (hi).
  const __m512i lo = _mm512_or_si512(_mm512_and_si512(a, m4), _mm512_slli_epi16(_mm512_and_si512(b, m4), 4));
  const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(a, 4), m4), _mm512_andnot_si512(m4, b));
  alignas(64) uint8_t rows[2][64];
  _mm512_store_si512(rows[0], _mm512_unpacklo_epi64(lo, hi));  // rows 0, 2, 4, 6
  _mm512_store_si512(rows[1], _mm512_unpackhi_epi64(lo, hi));  // rows 1, 3, 5, 7
  for (int i = 0; i < 8; ++i) std::memcpy(plain + i * row_stride + qoff, rows[i & 1] + 16 * (i >> 1), 16);
}

// The inverse of unpack_group_block.
inline void pack_group_block(int64_t t, const uint8_t* plain, int64_t row_stride, uint8_t* gblk) {
  const bool q4_1 = base_type(t) == GGML_Q4_1;
  const int64_t qoff = q4_1 ? 4 : 2;
  alignas(64) uint8_t rows[2][64];
  for (int i = 0; i < 8; ++i) {
    std::memcpy(gblk + 2 * i, plain + i * row_stride, 2);
    if (q4_1) std::memcpy(gblk + 16 + 2 * i, plain + i * row_stride + 2, 2);
    std::memcpy(rows[i & 1] + 16 * (i >> 1), plain + i * row_stride + qoff, 16);
  }
  const __m512i m4 = _mm512_set1_epi8(15);
  const __m512i even = _mm512_load_si512(rows[0]), odd = _mm512_load_si512(rows[1]);
  const __m512i lo = _mm512_unpacklo_epi64(even, odd), hi = _mm512_unpackhi_epi64(even, odd);
  const __m512i a = _mm512_or_si512(_mm512_and_si512(lo, m4), _mm512_slli_epi16(_mm512_and_si512(hi, m4), 4));
  const __m512i b = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lo, 4), m4), _mm512_andnot_si512(m4, hi));
  uint8_t* q = gblk + (q4_1 ? 32 : 16);
  _mm512_storeu_si512(q, a);
  _mm512_storeu_si512(q + 64, b);
}

// Rows 8g .. 8g + 7 of an x8 weight (`group` points at them) as plain ggml rows, into plain[8 * nb * bb].
inline void unpack_group(int64_t t, const uint8_t* group, int64_t nb, uint8_t* plain) {
  const int64_t bb = block_bytes(t);
  for (int64_t b = 0; b < nb; ++b) unpack_group_block(t, group + b * 8 * bb, plain + b * bb, nb * bb);
}
#endif

// A switch's state after applying `mode` (-1: leave, 0: off, 1: on); always off when not compiled in.
inline bool flip(std::atomic<bool>& flag, bool compiled_in, int64_t mode) {
  if (!compiled_in) return false;
  if (mode >= 0) flag = mode != 0;
  return flag;
}


inline void cpu_relax() {  // the spin-wait hint
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class SpinPool {
 public:
  explicit SpinPool(int workers) : pid_(getpid()) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { work(i + 1); });
  }
  int parts() const { return static_cast<int>(threads_.size()) + 1; }
  void park() { parked_.store(true); }  // idle workers sleep now instead of spinning out kSpin
  pid_t pid() const { return pid_; }

  // fn(part) for part in [0, parts()), part 0 on the calling thread; returns when all are done.
  void run(const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> one_caller(run_mu_);
    parked_.store(false);
    task_ = &fn;
    remaining_.store(static_cast<int>(threads_.size()));
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }  // a worker between its check and its wait sees the new generation
      cv_.notify_all();
    }
    std::exception_ptr error;
    try {
      fn(0);
    } catch (...) {
      error = std::current_exception();
    }
    while (remaining_.load(std::memory_order_acquire) > 0) cpu_relax();  // fn must outlive every worker's use
    if (!error) error = std::exchange(worker_error_, nullptr);
    worker_error_ = nullptr;
    if (error) std::rethrow_exception(error);  // a failed check inside a region reaches Python as usual
  }

 private:
  static constexpr auto kSpin = std::chrono::milliseconds(2);

  void work(int part) {
    uint64_t seen = 0;
    for (;;) {
      auto spin_start = std::chrono::steady_clock::now();
      uint64_t g;
      for (int spins = 0; (g = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
        cpu_relax();
        if (parked_.load(std::memory_order_relaxed) ||
            ((spins & 255) == 255 && std::chrono::steady_clock::now() - spin_start > kSpin)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
          spin_start = std::chrono::steady_clock::now();
        }
      }
      seen = g;
      try {
        (*task_)(part);
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_mu_);
        if (!worker_error_) worker_error_ = std::current_exception();
      }
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> threads_;
  const std::function<void(int)>* task_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0}, sleepers_{0};
  std::atomic<bool> parked_{false};
  std::mutex error_mu_;
  std::exception_ptr worker_error_;  // the first exception a worker's part threw in this run
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  pid_t pid_;
};

// fn(lo, hi) over [begin, end) split as at::parallel_for does (at most one chunk per part, chunks of at least
// `grain`), on `pool`; align: chunk sizes are rounded up to a multiple of it (8 for output rows: an x8 group split
// between two threads would be computed by both).
template <typename F>
void pool_for(SpinPool& pool, int64_t begin, int64_t end, int64_t grain, const F& f, int64_t align = 1) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t tasks = std::min<int64_t>(pool.parts(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (tasks <= 1) return f(begin, end);
  const int64_t chunk = ((n + tasks - 1) / tasks + align - 1) / align * align;
  pool.run([&](int part) {
    const int64_t lo = begin + part * chunk, hi = std::min(end, lo + chunk);
    if (part < tasks && lo < hi) f(lo, hi);
  });
}

// Per-32-block sums of x (M, K): the offset term of Q4_0/Q4_1 needs them once per input row.
inline std::vector<float> block_sums(const float* xp, int64_t m, int64_t k) {
  const int64_t nb = k / QK;
  std::vector<float> sums(m * nb);
  for (int64_t i = 0; i < m * nb; ++i) {
    float s = 0.f;
    for (int j = 0; j < QK; ++j) s += xp[i * QK + j];
    sums[i] = s;
  }
  return sums;
}

#ifdef LLAMAWORKS_INT8_DOT
// Decode with integer dot products, as ggml does: the activation rows are quantized once per matmul to
// 32-element int8 blocks (scale = absmax / 127), and each weight block meets them in one VNNI dpbusd
// without being expanded to float. The logits drift slightly from the float path (see tests/test_quant.py).
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> d, s;       // per block: scale, scale * sum(q)
  std::vector<int32_t> minus8;   // per block, 8 lanes: -8 * (sum of the lane's 4 bytes), Q4_0's offset in int32
  std::vector<int32_t> qsum;     // per block: sum(q)
  QuantRows(const float* x, int64_t m, int64_t k)
      : q(m * k), d(m * (k / QK)), s(m * (k / QK)), minus8(m * (k / QK) * 8), qsum(m * (k / QK)) {
    const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < m * (k / QK); ++b) {
      const __m512 lo = _mm512_loadu_ps(x + b * QK), hi = _mm512_loadu_ps(x + b * QK + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(lo, sign_mask), _mm512_and_ps(hi, sign_mask)));
      const float scale = amax / 127.f;
      const __m512 inv = _mm512_set1_ps(scale != 0.f ? 1.f / scale : 0.f);
      // Nearest, ties to even (ggml's roundf sends ties away from zero: exact ties are vanishingly rare).
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
      const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + b * QK), _mm512_cvtsepi32_epi8(qlo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + b * QK + 16), _mm512_cvtsepi32_epi8(qhi));
      d[b] = scale;
      qsum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
      s[b] = scale * static_cast<float>(qsum[b]);
      const __m256i vx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.data() + b * QK));
      const __m256i sums8 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(8), vx);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(minus8.data() + b * 8), _mm256_sub_epi32(_mm256_setzero_si256(), sums8));
    }
  }
};

inline float hsum256(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// R weight rows (same type T) against one int8 activation row; R > 1 shares each activation block's loads.
// R > 1 assumes the rows are consecutive and prefetches the R rows after them, spread over the block loop:
// interleaved reads of R rows defeat the hardware's stream prefetcher once weights come from DRAM.
template <int64_t T, int R>
inline void rows_dot_q8(const uint8_t* const* rows, const int8_t* xq, const float* xd, const float* xs,
                        const int32_t* xm8, int64_t nb, float* out) {
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
    __m256i init = _mm256_setzero_si256();
    if constexpr (T == GGML_Q4_0) init = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm8 + b * 8));
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows[r] + b * bb;
      __m256i dot;
      if constexpr (T == GGML_Q8_0) {
        // dpbusd multiplies unsigned by signed bytes: |w| times x carrying w's sign.
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        dot = _mm256_dpbusd_epi32(init, _mm256_abs_epi8(w), _mm256_sign_epi8(vx, w));
      } else {
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == GGML_Q4_1 ? 4 : 2)));
        const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low4), _mm_and_si128(q, low4));
        dot = _mm256_dpbusd_epi32(init, w, vx);  // Q4_0: init holds -8 * sum(x), so this is sum((w - 8) * x)
        if constexpr (T == GGML_Q4_1) offset[r] += half_at(blk + 2) * xs[b];
      }
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half_at(blk) * dx), _mm256_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]) + offset[r];
}

// One x8 group (8 rows) against R int8 activation rows: out[r * ldo + 0..8). Per block, the four nibble vectors
// hold in lanes 2i and 2i + 1 row i's weights for columns 8s + 0..3 and 8s + 4..7 (step s = 0..3), so the
// activation bytes a step needs are the row's qword s broadcast to every lane pair (no rearranged copy of the
// activations), and four dpbusd give each row's block dot split over its two lanes, which take the same per-row
// scale and are added once at the end. The nibbles are unpacked once per block for all R rows (a prompt chunk).
// Row r's data: xq + r * nb * 32 (int8), xd/xs/qsum + r * nb (QuantRows' layout); each row sums in the same
// order whatever R is, so results do not depend on how rows are grouped.
inline int64_t load_i64(const int8_t* p) {  // 8 activation bytes (memcpy: no aliasing through int64_t*)
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

template <int64_t T, int R>
inline void group_dot_q8(const uint8_t* group, const int8_t* xq, const float* xd, const float* xs,
                         const int32_t* qsum, int64_t nb, float* out, int64_t ldo) {
  constexpr int64_t gb = T == GGML_Q4_0 ? 144 : 160, qoff = T == GGML_Q4_0 ? 16 : 32;
  const __m512i m4 = _mm512_set1_epi8(15);
  const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);  // row i -> lanes 2i, 2i+1
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * gb;
    const __m512i lo = _mm512_loadu_si512(blk + qoff), hi = _mm512_loadu_si512(blk + qoff + 64);
    const __m512i w0 = _mm512_and_si512(lo, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(lo, 4), m4);
    const __m512i w2 = _mm512_and_si512(hi, m4), w3 = _mm512_and_si512(_mm512_srli_epi16(hi, 4), m4);
    const __m512 d = _mm512_permutexvar_ps(
        pairs, _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)))));
    __m512 mn = _mm512_setzero_ps();
    if constexpr (T == GGML_Q4_1)
      mn = _mm512_permutexvar_ps(
          pairs, _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)))));
    for (int r = 0; r < R; ++r) {
      const int64_t rb = r * nb + b;
      const int8_t* xb = xq + rb * QK;
      // Q4_0 stores w + 8: start each lane at -4 * sum(x), so a row's two lanes together subtract 8 * sum(x).
      __m512i dot = T == GGML_Q4_0 ? _mm512_set1_epi32(-4 * qsum[rb]) : _mm512_setzero_si512();
      dot = _mm512_dpbusd_epi32(dot, w0, _mm512_set1_epi64(load_i64(xb + 0)));
      dot = _mm512_dpbusd_epi32(dot, w1, _mm512_set1_epi64(load_i64(xb + 8)));
      dot = _mm512_dpbusd_epi32(dot, w2, _mm512_set1_epi64(load_i64(xb + 16)));
      dot = _mm512_dpbusd_epi32(dot, w3, _mm512_set1_epi64(load_i64(xb + 24)));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(xd[rb])), acc[r]);
      if constexpr (T == GGML_Q4_1) acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(0.5f * xs[rb]), acc[r]);  // + min * sum(x)
    }
  }
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int r = 0; r < R; ++r) {
    const __m512 sum = _mm512_add_ps(_mm512_permutexvar_ps(evens, acc[r]), _mm512_permutexvar_ps(odds, acc[r]));
    _mm256_storeu_ps(out + r * ldo, _mm512_castps512_ps256(sum));
  }
}
#endif

// Whether decode uses the int8 path (when compiled in). On by default, as in llama.cpp: its drift from the
// float path is bounded in tests/test_runtime.py; `int8_decode(0)` (Python: kernels.int8_decode(False)) or
// LLAMAWORKS_INT8_DECODE=0 selects the float dequantize-and-dot kernels.
std::atomic<bool> g_int8_decode{true};

#ifdef LLAMAWORKS_INT8_DOT
constexpr bool kHaveInt8Dot = true;
#else
constexpr bool kHaveInt8Dot = false;
#endif

inline bool int8_decode(int64_t mode) { return flip(g_int8_decode, kHaveInt8Dot, mode); }

// Up to this many input rows the decode kernels (weights read once, every row dotted in cache) beat
// dequantizing to a gemm: with int8 activations up to 32 (a 5632x2048 Q4_0 matmul of 16 rows: 1.6 against
// 3.2 ms; 24 against 36 us per row at 1536x576 even), with the float kernels up to 8.
constexpr int64_t kSmallBatch = 32;
inline int64_t decode_rows_limit() { return kHaveInt8Dot && g_int8_decode ? kSmallBatch : 8; }
// Weight rows per decode kernel call: they share each activation block's loads. Measured on the 1.1B model:
// 2 rows decode ~6% faster than 4 and ~15% faster than 8 (more interleaved streams hurt the prefetchers).
constexpr int64_t kRows = 2;

// One weight matrix as the decode kernels see it: raw block rows.
struct WeightRef {
  const uint8_t* data;
  int64_t stride, type;
};

// The activation rows of one decode matmul, prepared once: int8 blocks (VNNI) or per-block float sums.
struct DecodeRows {
  const float* x;
  int64_t m, k, nb;
  bool int8;
  std::vector<float> sums;
#ifdef LLAMAWORKS_INT8_DOT
  QuantRows qx;
  DecodeRows(const float* xp, int64_t m_, int64_t k_)
      : x(xp), m(m_), k(k_), nb(k_ / QK), int8(g_int8_decode),
        sums(int8 ? std::vector<float>() : block_sums(xp, m_, k_)), qx(xp, int8 ? m_ : 0, k_) {}
#else
  DecodeRows(const float* xp, int64_t m_, int64_t k_)
      : x(xp), m(m_), k(k_), nb(k_ / QK), int8(false), sums(block_sums(xp, m_, k_)) {}
#endif

  // out[i * ldo + j] = row (r0 + j) of w . input row i, for j < n (n <= kRows).
  void dot_rows(const WeightRef& w, int64_t r0, int64_t n, float* out, int64_t ldo) const {
#ifdef LLAMAWORKS_INT8_DOT
    if (int8) {
      if (w.type == GGML_Q4_0) return q8_rows<GGML_Q4_0>(w, r0, n, out, ldo);
      if (w.type == GGML_Q4_1) return q8_rows<GGML_Q4_1>(w, r0, n, out, ldo);
      return q8_rows<GGML_Q8_0>(w, r0, n, out, ldo);
    }
#endif
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i)
        out[i * ldo + j] = row_dot(w.type, w.data + (r0 + j) * w.stride, x + i * k, sums.data() + i * nb, nb);
  }

  // Like dot_rows for any weight layout and n <= 8; for an x8 weight rows r0 .. r0 + n must be in one group.
  void dot_range(const WeightRef& w, int64_t r0, int64_t n, float* out, int64_t ldo) const {
    if (!interleaved(w.type)) {
      for (int64_t j = 0; j < n; j += kRows) dot_rows(w, r0 + j, std::min(kRows, n - j), out + j, ldo);
      return;
    }
    const int64_t g = r0 / 8, within = r0 % 8;
    if (within == 0 && n == 8) return dot_group(w, g, out, ldo);
    float tmp[kSmallBatch * 8];
    dot_group(w, g, tmp, 8);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) out[i * ldo + j] = tmp[i * 8 + within + j];
  }

  // out[i * ldo + j] = row 8g + j of the x8 weight w . input row i, for j < 8.
  void dot_group(const WeightRef& w, int64_t g, float* out, int64_t ldo) const {
#ifdef LLAMAWORKS_INT8_DOT
    const uint8_t* group = w.data + g * 8 * w.stride;
    const int64_t bt = base_type(w.type);
    if (int8) {
      for (int64_t i = 0; i < m;) {
        const int64_t r = m - i >= 4 ? 4 : 1;  // four rows share each block's unpacked nibbles
        const int8_t* xq = qx.q.data() + i * k;
        const float *xd = qx.d.data() + i * nb, *xs = qx.s.data() + i * nb;
        const int32_t* qs = qx.qsum.data() + i * nb;
        float* o = out + i * ldo;
        if (bt == GGML_Q4_0) {
          if (r == 4) group_dot_q8<GGML_Q4_0, 4>(group, xq, xd, xs, qs, nb, o, ldo);
          else group_dot_q8<GGML_Q4_0, 1>(group, xq, xd, xs, qs, nb, o, ldo);
        } else {
          if (r == 4) group_dot_q8<GGML_Q4_1, 4>(group, xq, xd, xs, qs, nb, o, ldo);
          else group_dot_q8<GGML_Q4_1, 1>(group, xq, xd, xs, qs, nb, o, ldo);
        }
        i += r;
      }
      return;
    }
    // Float activations: unpack the group to plain rows (in cache) and use the float kernel.
    thread_local std::vector<uint8_t> plain;
    plain.resize(8 * w.stride);
    unpack_group(bt, group, nb, plain.data());
    for (int64_t j = 0; j < 8; ++j)
      for (int64_t i = 0; i < m; ++i)
        out[i * ldo + j] = row_dot(bt, plain.data() + j * w.stride, x + i * k, sums.data() + i * nb, nb);
#else
    fail("interleaved weights need the AVX-512 VNNI kernels");
#endif
  }

#ifdef LLAMAWORKS_INT8_DOT
  template <int64_t T>
  void q8_rows(const WeightRef& w, int64_t r0, int64_t n, float* out, int64_t ldo) const {
    const uint8_t* rows[kRows];
    for (int64_t j = 0; j < n; ++j) rows[j] = w.data + (r0 + j) * w.stride;
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* xq = qx.q.data() + i * k;
      const float *xd = qx.d.data() + i * nb, *xs = qx.s.data() + i * nb;
      const int32_t* xm8 = qx.minus8.data() + i * nb * 8;
      float* o = out + i * ldo;
      if (n == kRows) {
        rows_dot_q8<T, kRows>(rows, xq, xd, xs, xm8, nb, o);
      } else {
        for (int64_t j = 0; j < n; ++j) rows_dot_q8<T, 1>(rows + j, xq, xd, xs, xm8, nb, o + j);
      }
    }
  }
#endif
};

inline void decode_columns(const DecodeRows& rows, const std::vector<WeightRef>& ws, const std::vector<int64_t>& offsets,
                           int64_t c0, int64_t c1, float* y, int64_t ldy) {
  size_t w = 0;
  for (int64_t c = c0; c < c1;) {
    while (c >= offsets[w + 1]) ++w;
    const int64_t local = c - offsets[w];
    const int64_t unit = interleaved(ws[w].type) ? 8 - local % 8 : kRows;  // x8: up to the group's end
    const int64_t n = std::min<int64_t>({unit, c1 - c, offsets[w + 1] - c});
    rows.dot_range(ws[w], local, n, y + c, ldy);
    c += n;
  }
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

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

#if defined(__AVX512F__)
// exp(x) for x <= 0 (softmax after subtracting the maximum), Cephes' expf polynomial: within ~2 ulp.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// The four horizontal sums of a0..a3, as one vector [sum a0, sum a1, sum a2, sum a3] (13 ops, not 4 x 8).
inline __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

// KV cache elements: float32, or float16 (half the memory, as llama.cpp keeps it); math is float32 either way.
inline float as_float(float v) { return v; }
// A float16 KV element (the bits; torch's c10::Half has the same layout).
struct Half {
  uint16_t bits;
};
inline float as_float(Half v) { return half_at(reinterpret_cast<const uint8_t*>(&v.bits)); }
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(Half* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i].bits = float_to_half_bits(src[i]);
}

// One query head against keys/values [0, n_keys) of its key/value head (rows of D elements), softmax in float32.
template <typename KV>
void attend_one_head(const float* q, const KV* keys, const KV* vals, const bool* visible, int64_t n_keys,
                     int64_t D, float scale, float* scores, float* out) {
  int64_t s = 0;
#if defined(__AVX512F__)
  const bool vec = D % 16 == 0 && D <= 128;
  if (vec) {
    const int64_t nd = D / 16;
    __m512 qv[8];
    for (int64_t c = 0; c < nd; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + c * 16), _mm512_set1_ps(scale));
    for (; s + 4 <= n_keys; s += 4) {
      __m512 a[4];
      for (int j = 0; j < 4; ++j) {
        const KV* k = keys + (s + j) * D;
        a[j] = _mm512_mul_ps(qv[0], load16(k));
        for (int64_t c = 1; c < nd; ++c) a[j] = _mm512_fmadd_ps(qv[c], load16(k + c * 16), a[j]);
      }
      _mm_storeu_ps(scores + s, hsum4(a[0], a[1], a[2], a[3]));
    }
  }
#endif
  for (; s < n_keys; ++s) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * as_float(keys[s * D + d]);
    scores[s] = dot * scale;
  }
  float mx = -INFINITY;
  for (s = 0; s < n_keys; ++s) {
    if (visible != nullptr && !visible[s]) scores[s] = -INFINITY;
    mx = std::max(mx, scores[s]);
  }
  float total = 0.f;
  s = 0;
#if defined(__AVX512F__)
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vtotal = _mm512_setzero_ps();
  for (; s + 16 <= n_keys; s += 16) {
    const __m512 x = _mm512_loadu_ps(scores + s);
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(x, vmx)));
    _mm512_storeu_ps(scores + s, e);
    vtotal = _mm512_add_ps(vtotal, e);
  }
  total = _mm512_reduce_add_ps(vtotal);
#endif
  for (; s < n_keys; ++s) {
    scores[s] = scores[s] == -INFINITY ? 0.f : std::exp(scores[s] - mx);
    total += scores[s];
  }
  const float inv_total = 1.f / total;
#if defined(__AVX512F__)
  if (vec) {
    const int64_t nd = D / 16;
    __m512 acc[8];
    for (int64_t c = 0; c < nd; ++c) acc[c] = _mm512_setzero_ps();
    for (s = 0; s < n_keys; ++s) {
      if (scores[s] == 0.f) continue;
      const __m512 p = _mm512_set1_ps(scores[s]);
      for (int64_t c = 0; c < nd; ++c) acc[c] = _mm512_fmadd_ps(p, load16(vals + s * D + c * 16), acc[c]);
    }
    for (int64_t c = 0; c < nd; ++c) _mm512_storeu_ps(out + c * 16, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv_total)));
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (s = 0; s < n_keys; ++s) {
    if (scores[s] == 0.f) continue;
    for (int64_t d = 0; d < D; ++d) out[d] += scores[s] * as_float(vals[s * D + d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] *= inv_total;
}

// RoPE on B new q/k rows, their cache writes, and attention. Row b of qp (qkv_n floats: q, then k, then v) is
// cache sequence seq[b]'s token at slot slot[b], with angles cos/sin (B, D/2). Its queries see the slots where
// visible (B, S) is true or, with visible == nullptr, slots (slot - window, slot] (window 0: all up to slot).
// Every row's keys/values are written before any row attends, so consecutive rows of one sequence (a prefill
// chunk) see each other. Each query head reads its group's key/value head directly (no copies).
template <typename KV, typename Par>
void attention_rows(const Par& par, float* qp, int64_t qkv_n, KV* kc, KV* vc, const float* cos, const float* sin,
                    const bool* visible, int64_t window, int64_t B, const int64_t* seq, const int64_t* slot,
                    int64_t S, int64_t D, int64_t n_heads, int64_t n_kv_heads, float* ap) {
  const int64_t G = n_heads / n_kv_heads, qdim = n_heads * D, kvdim = n_kv_heads * D;
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (slot[b] < 0 || slot[b] >= S) fail("cache slot out of range");
    float* row = qp + b * qkv_n;
    rope_inplace(row, n_heads, D, cos + b * (D / 2), sin + b * (D / 2));
    rope_inplace(row + qdim, n_kv_heads, D, cos + b * (D / 2), sin + b * (D / 2));
    for (int64_t g = 0; g < n_kv_heads; ++g) {
      store_row(kc + ((seq[b] * n_kv_heads + g) * S + slot[b]) * D, row + qdim + g * D, D);
      store_row(vc + ((seq[b] * n_kv_heads + g) * S + slot[b]) * D, row + qdim + kvdim + g * D, D);
    }
    max_keys = std::max(max_keys, slot[b] + 1);
  }
  const float scale = 1.0f / std::sqrt(float(D));
  par(0, B * n_heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(max_keys);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / n_heads, head = i % n_heads, kvh = head / G;
      const int64_t first = visible == nullptr && window > 0 ? std::max<int64_t>(0, slot[b] - window + 1) : 0;
      const int64_t base = ((seq[b] * n_kv_heads + kvh) * S + first) * D;
      attend_one_head(qp + b * qkv_n + head * D, kc + base, vc + base,
                      visible == nullptr ? nullptr : visible + b * S + first, slot[b] + 1 - first, D, scale,
                      scores.data(), ap + b * qdim + head * D);
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
  const bool x8 = interleaved(gate.type) || interleaved(up.type);
  const int64_t m = rows.m;
  par(0, n, 16, [&](int64_t r0, int64_t r1) {
    float gv[kSmallBatch * 8], uv[kSmallBatch * 8];
    for (int64_t r = r0; r < r1;) {
      const int64_t c = std::min<int64_t>(x8 ? 8 - r % 8 : kRows, r1 - r);
      rows.dot_range(gate, r, c, gv, 8);
      rows.dot_range(up, r, c, uv, 8);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < c; ++j) y[i * n + r + j] = silu(gv[i * 8 + j]) * uv[i * 8 + j];
      r += c;
    }
  }, 8);
}

// Whether this build can use the x8 layout (its decode kernel needs AVX-512 VNNI).
inline bool can_interleave() { return kHaveInt8Dot; }

// Regroup a contiguous Q4_0/Q4_1 weight of n_rows (a multiple of 8) rows into the x8 layout, in place.
template <typename Par>
void interleave_rows(const Par& par, uint8_t* base, int64_t n_rows, int64_t t, int64_t k) {
  if (!can_interleave() || (t != GGML_Q4_0 && t != GGML_Q4_1) || n_rows % 8 != 0 || k % QK != 0)
    fail("only Q4_0/Q4_1 weights with a multiple of 8 rows can be interleaved here");
#ifdef LLAMAWORKS_INT8_DOT
  const int64_t nb = k / QK, bb = block_bytes(t), row_bytes = nb * bb;
  par(0, n_rows / 8, 4, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> plain(8 * row_bytes);
    for (int64_t g = g0; g < g1; ++g) {
      uint8_t* group = base + g * 8 * row_bytes;
      std::memcpy(plain.data(), group, 8 * row_bytes);
      for (int64_t b = 0; b < nb; ++b) pack_group_block(t, plain.data() + b * bb, row_bytes, group + b * 8 * bb);
    }
  }, 1);
#endif
}

}  // namespace lwcore
}  // namespace
