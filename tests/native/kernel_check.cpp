// Every SIMD path of the kernel core against its scalar reference (namespace ref), for whichever target this
// file is compiled for: tests/test_kernel_matrix.py builds it for scalar x86-64-v2, AVX2 (x86-64-v3), the
// machine's own CPU and aarch64 NEON with and without dotprod (run under qemu-user), and runs each.
//
// Exact where the arithmetic is exact (float16 conversions, dequantization, activation quantization, x8
// regrouping, and so the integer part of every int8 dot product); float sums may differ only in order, bounded by
// the classic worst case of float summation: |a - b| <= 2 * n * 2^-24 * sum|terms| for n sequential additions.
// Inputs come from a fixed-seed generator, so every target sees the same vectors; the digest line hashes the
// reference's exact outputs, which must be equal on every target (tests/test_kernel_matrix.py compares them).
// Prints one line per check, the ISA paths compiled in, and "N passed, N failed".
#include "_kernels_core.h"

#include <cinttypes>
#include <cstdio>
#include <memory>

using namespace lwcore;

namespace {

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
uint64_t next_u64() {  // splitmix64
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next_u64() >> 40) / 16777216.f; }

int passed = 0, failed = 0;
uint64_t digest = 1469598103934665603ull;  // FNV-1a over the reference's exact outputs
void hash_bytes(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) digest = (digest ^ b[i]) * 1099511628211ull;
}

void check(bool ok, const char* name, const std::string& detail = "") {
  if (ok) {
    ++passed;
    std::printf("PASS %s\n", name);
  } else {
    ++failed;
    std::printf("FAIL %s: %s\n", name, detail.c_str());
  }
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b)); }

// Worst-case float summation bound for n sequential additions over terms of total magnitude mag.
double sum_bound(double n, double mag) { return 2.0 * n * std::ldexp(1.0, -24) * mag + 1e-30; }

// Random weight rows of type t: nb blocks each, sane float16 scales (and Q4_1 minimums), random quant bytes.
std::vector<uint8_t> random_rows(int64_t t, int64_t rows, int64_t nb) {
  const int64_t bb = block_bytes(t);
  std::vector<uint8_t> raw(rows * nb * bb);
  for (auto& byte : raw) byte = static_cast<uint8_t>(next_u64());
  for (int64_t b = 0; b < rows * nb; ++b) {
    uint8_t* blk = raw.data() + b * bb;
    const uint16_t d = ref::float_to_half(uniform(1e-3f, 5e-2f) * (next_u64() & 1 ? 1.f : -1.f));
    std::memcpy(blk, &d, 2);
    if (t == GGML_Q4_1) {
      const uint16_t m = ref::float_to_half(uniform(-0.2f, 0.2f));
      std::memcpy(blk + 2, &m, 2);
    }
  }
  if (t == GGML_Q8_0) raw[2] = 0x80;  // -128: the one value whose |w| needs all 8 bits
  return raw;
}

// Activations: mostly N(0, 1)-like, one all-zero block, one block with a single large outlier.
std::vector<float> random_activations(int64_t m, int64_t k) {
  std::vector<float> x(m * k);
  for (auto& v : x) v = uniform(-1.f, 1.f) + uniform(-1.f, 1.f) + uniform(-1.f, 1.f);
  if (k >= 64) {
    for (int j = 0; j < 32; ++j) x[32 + j] = 0.f;
    x[k - 3] = 97.f;
  }
  return x;
}

void check_half() {
  bool ok = true;
  std::string detail;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = half_to_float(static_cast<uint16_t>(h)), b = ref::half_to_float(static_cast<uint16_t>(h));
    hash_bytes(&b, 4);
    if (!same_bits(a, b)) {
      ok = false;
      detail = "half " + std::to_string(h);
      break;
    }
  }
  check(ok, "float16 -> float32, all 65536 values", detail);
  std::vector<float> xs = {0.f, -0.f, 1.f, 65504.f, 65520.f, 1e9f, -1e9f, 6.1e-5f, 5.96e-8f, 2.98e-8f, 2.99e-8f,
                           1.00048828125f, 1.000732421875f, INFINITY, -INFINITY, NAN};
  for (int i = 0; i < 20000; ++i) {
    uint32_t bits = static_cast<uint32_t>(next_u64());
    float f;
    std::memcpy(&f, &bits, 4);
    xs.push_back(f);
  }
  std::vector<uint16_t> fast(xs.size());
  floats_to_halves(xs.data(), fast.data(), static_cast<int64_t>(xs.size()));
  ok = true;
  for (size_t i = 0; i < xs.size(); ++i) {
    const uint16_t want = ref::float_to_half(xs[i]);
    hash_bytes(&want, 2);
    const bool nan = std::isnan(xs[i]);
    if ((nan ? (fast[i] & 0x7c00) != 0x7c00 || (fast[i] & 0x3ff) == 0 : fast[i] != want) ||
        (!nan && float_to_half(xs[i]) != want)) {
      ok = false;
      detail = "float #" + std::to_string(i);
      break;
    }
  }
  check(ok, "float32 -> float16 (round to nearest even), 20016 values", detail);
}

void check_dequant() {
  for (int64_t t : {GGML_Q4_0, GGML_Q4_1, GGML_Q8_0}) {
    const auto raw = random_rows(t, 1, 64);
    bool ok = true;
    for (int64_t b = 0; b < 64 && ok; ++b) {
      float a[32], r[32];
      dequant_block(t, raw.data() + b * block_bytes(t), a);
      ref::dequant_block(t, raw.data() + b * block_bytes(t), r);
      hash_bytes(r, sizeof r);
      for (int j = 0; j < 32; ++j) ok = ok && same_bits(a[j], r[j]);
    }
    check(ok, ("dequantize " + std::to_string(t) + ", bit for bit").c_str());
  }
}

void check_quantize_rows() {
  const int64_t m = 5, k = 512;
  const auto x = random_activations(m, k);
  QuantRows a(m, k), r(m, k);
  quantize_rows(x.data(), m, k, a);
  ref::quantize_rows(x.data(), m, k, r);
  hash_bytes(r.q.data(), r.q.size());
  hash_bytes(r.d.data(), r.d.size() * 4);
  hash_bytes(r.s.data(), r.s.size() * 4);
  bool ok = a.q == r.q && a.qsum == r.qsum;
  for (size_t b = 0; b < r.d.size(); ++b) ok = ok && same_bits(a.d[b], r.d[b]) && same_bits(a.s[b], r.s[b]);
  check(ok, "activation int8 quantization, bit for bit");
}

void check_regrouping() {
  for (int64_t t : {GGML_Q4_0, GGML_Q4_1}) {
    const int64_t nb = 6, bb = block_bytes(t), row = nb * bb;
    const auto plain = random_rows(t, 8, nb);
    std::vector<uint8_t> packed(8 * row), packed_ref(8 * row), back(8 * row), back_ref(8 * row);
    for (int64_t b = 0; b < nb; ++b) {
      pack_group_block(t, plain.data() + b * bb, row, packed.data() + b * 8 * bb);
      ref::pack_group_block(t, plain.data() + b * bb, row, packed_ref.data() + b * 8 * bb);
      unpack_group_block(t, packed_ref.data() + b * 8 * bb, back.data() + b * bb, row);
      ref::unpack_group_block(t, packed_ref.data() + b * 8 * bb, back_ref.data() + b * bb, row);
    }
    hash_bytes(packed_ref.data(), packed_ref.size());
    check(packed == packed_ref, ("x8 regrouping " + std::to_string(t) + ", bit for bit").c_str());
    check(back == back_ref && back_ref == plain, ("x8 ungrouping " + std::to_string(t) + ", lossless").c_str());
    // Layout spot check from the definition: row 3, column 5 (half a, qword 3, lane 7, byte 1, low nibble).
    const uint8_t* q = packed_ref.data() + (t == GGML_Q4_1 ? 32 : 16);
    const uint8_t want = plain[3 * row + (t == GGML_Q4_1 ? 4 : 2) + 5] & 15;
    check((q[4 * (2 * 3 + 1) + 1] & 15) == want, ("x8 layout " + std::to_string(t) + ": row 3 column 5").c_str());
  }
}

// sum over blocks of |d| * sum|q * x| + |m * sum(x)|: the magnitude the float-activation row dot sums.
double float_magnitude(int64_t t, const uint8_t* row, const float* x, int64_t nb) {
  double mag = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * block_bytes(t);
    const float* xb = x + b * QK;
    double qx = 0, xsum = 0;
    for (int j = 0; j < 32; ++j) {
      const int q = t == GGML_Q8_0 ? reinterpret_cast<const int8_t*>(blk + 2)[j]
                                   : j < 16 ? blk[(t == GGML_Q4_1 ? 4 : 2) + j] & 15 : blk[(t == GGML_Q4_1 ? 4 : 2) + j - 16] >> 4;
      qx += std::fabs(double(q) * xb[j]);
      xsum += xb[j];
    }
    const double m = t == GGML_Q4_1 ? half_at(blk + 2) : t == GGML_Q4_0 ? -8.0 * half_at(blk) : 0.0;
    mag += std::fabs(double(half_at(blk))) * qx + std::fabs(m * xsum);
  }
  return mag;
}

// The float-activation dot's definition: the row as the reference dequantizes it (d * q + m per element) times x,
// summed in double.
double float_dot(int64_t t, const uint8_t* row, const float* x, int64_t nb) {
  double sum = 0;
  float w[QK];
  for (int64_t b = 0; b < nb; ++b) {
    ref::dequant_block(t, row + b * block_bytes(t), w);
    for (int j = 0; j < QK; ++j) sum += double(w[j]) * x[b * QK + j];
  }
  return sum;
}

// sum over blocks of |dw * dx| * sum|w * x| (Q4_0: |w + 8| |x| + 8 |x|, the two halves its kernels may split the
// dot into) + |mw * sx|: the magnitude the int8 row dot sums, however a path splits its integer dot into lanes.
double q8_magnitude(int64_t t, const uint8_t* row, const QuantRows& qx, int64_t i, int64_t nb) {
  double mag = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * block_bytes(t);
    const int8_t* xq = qx.q.data() + (i * nb + b) * QK;
    double products = 0;
    for (int j = 0; j < 32; ++j) {
      const int q = t == GGML_Q8_0 ? reinterpret_cast<const int8_t*>(blk + 2)[j]
                                   : j < 16 ? blk[(t == GGML_Q4_1 ? 4 : 2) + j] & 15 : blk[(t == GGML_Q4_1 ? 4 : 2) + j - 16] >> 4;
      products += std::abs(q * xq[j]) + (t == GGML_Q4_0 ? 8 * std::abs(xq[j]) : 0);
    }
    mag += std::fabs(double(half_at(blk)) * qx.d[i * nb + b]) * products;
    if (t == GGML_Q4_1) mag += std::fabs(double(half_at(blk + 2)) * qx.s[i * nb + b]);
  }
  return mag;
}

template <int64_t T>
void check_int8_rows(int64_t k) {
  const int64_t nb = k / QK, m = 3;
  const auto raw = random_rows(T, 2, nb);
  const auto x = random_activations(m, k);
  QuantRows qx(m, k);
  ref::quantize_rows(x.data(), m, k, qx);
  bool ok = true;
  std::string detail;
  for (int64_t i = 0; i < m; ++i) {
    const uint8_t* rows[2] = {raw.data(), raw.data() + nb * block_bytes(T)};
    float pair[2], single;
    const int8_t* xq = qx.q.data() + i * k;
    const float *xd = qx.d.data() + i * nb, *xs = qx.s.data() + i * nb;
    const int32_t* qs = qx.qsum.data() + i * nb;
    rows_dot_q8<T, 2>(rows, xq, xd, xs, qs, nb, pair);
    rows_dot_q8<T, 1>(rows + 1, xq, xd, xs, qs, nb, &single);
    for (int r = 0; r < 2; ++r) {
      const float want = ref::row_dot_q8(T, rows[r], xq, xd, xs, nb);
      hash_bytes(&want, 4);
      const double tol = sum_bound(2 * nb + 8, q8_magnitude(T, rows[r], qx, i, nb));
      if (std::fabs(double(pair[r]) - want) > tol || (r == 1 && !same_bits(single, pair[1]))) {
        ok = false;
        detail = "input row " + std::to_string(i) + ", weight row " + std::to_string(r) + ": " +
                 std::to_string(pair[r]) + " vs " + std::to_string(want) + " (bound " + std::to_string(tol) + ")";
      }
    }
  }
  check(ok, ("int8 dot, plain rows, type " + std::to_string(T) + ", k " + std::to_string(k)).c_str(), detail);
}

template <int64_t T>
void check_int8_group(int64_t k) {
  const int64_t nb = k / QK, m = 9, bb = block_bytes(T);
  const auto plain = random_rows(T, 8, nb);
  std::vector<uint8_t> group(plain.size());
  for (int64_t b = 0; b < nb; ++b) ref::pack_group_block(T, plain.data() + b * bb, nb * bb, group.data() + b * 8 * bb);
  const auto x = random_activations(m, k);
  QuantRows qx(m, k);
  ref::quantize_rows(x.data(), m, k, qx);
  std::vector<float> four(4 * 8), eight(8 * 8), one(8), want(m * 8);
  ref::group_dot_q8(T, group.data(), qx.q.data(), qx.d.data(), qx.s.data(), nb, m, want.data(), 8);
  hash_bytes(want.data(), want.size() * 4);
  group_dot_q8<T, 4>(group.data(), qx.q.data(), qx.d.data(), qx.s.data(), qx.qsum.data(), nb, four.data(), 8);
  group_dot_q8<T, 8>(group.data(), qx.q.data(), qx.d.data(), qx.s.data(), qx.qsum.data(), nb, eight.data(), 8);
  bool ok = true;
  std::string detail;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t o = i * nb;
    group_dot_q8<T, 1>(group.data(), qx.q.data() + o * QK, qx.d.data() + o, qx.s.data() + o, qx.qsum.data() + o, nb,
                       one.data(), 8);
    for (int j = 0; j < 8; ++j) {
      const double tol = sum_bound(2 * nb + 8, q8_magnitude(T, plain.data() + j * nb * bb, qx, i, nb));
      // R does not change a row's sums
      const bool grouped_same = (i >= 4 || same_bits(four[i * 8 + j], one[j])) &&
                                (i >= 8 || same_bits(eight[i * 8 + j], one[j]));
#if defined(LW_AVX512)
      const bool exact = same_bits(one[j], want[i * 8 + j]);  // this path promises the reference's bits
#else
      const bool exact = true;
#endif
      if (std::fabs(double(one[j]) - want[i * 8 + j]) > tol || !grouped_same || !exact) {
        ok = false;
        detail = "input row " + std::to_string(i) + ", weight row " + std::to_string(j) + ": " + std::to_string(one[j]) +
                 " vs " + std::to_string(want[i * 8 + j]);
      }
    }
  }
  check(ok, ("int8 dot, x8 group, type " + std::to_string(T) + ", k " + std::to_string(k)).c_str(), detail);
}

#if defined(LW_AVX512)
// The prompt kernel (input rows in the vector lanes) against the reference, bit for bit: 40 rows are two full
// lane groups and a padded one of 8; weights of all-0 and all-15 nibbles reach the extremes of the -128 * sum(w)
// start and of the x + 128 activations.
template <int64_t T>
void check_int8_gemm(int64_t k) {
  const uint64_t saved = rng_state;  // this check runs on one target only: the others' inputs stay the same
  const int64_t nb = k / QK, m = 40, bb = block_bytes(T);
  auto plain = random_rows(T, 8, nb);
  const int64_t qoff = T == GGML_Q4_1 ? 4 : 2;
  for (int64_t b = 0; b < nb; b += 3) std::memset(plain.data() + b * bb + qoff, b % 2 ? 0xff : 0x00, 16);
  std::vector<uint8_t> group(plain.size());
  for (int64_t b = 0; b < nb; ++b) ref::pack_group_block(T, plain.data() + b * bb, nb * bb, group.data() + b * 8 * bb);
  auto x = random_activations(m, k);
  for (int64_t j = 0; j < 32; ++j) x[3 * k + j] = j % 2 ? -5.f : 5.f;  // +-127 in one block
  QuantRows qx(m, k);
  ref::quantize_rows(x.data(), m, k, qx);
  std::vector<float> want(m * 8), got(m * 8, NAN);
  ref::group_dot_q8(T, group.data(), qx.q.data(), qx.d.data(), qx.s.data(), nb, m, want.data(), 8);
  PackedRows px;
  pack_rows(qx, m, nb, px);
  GroupBytes u;
  unpack_group_bytes<T>(group.data(), nb, u);
  for (int64_t g = 0; g < px.groups; ++g)
    group_gemm_q8<T>(u, px, g, got.data() + g * kLanes * 8, 8, std::min(kLanes, m - g * kLanes), nullptr);
  bool ok = true;
  std::string detail;
  for (int64_t i = 0; i < m * 8; ++i)
    if (!same_bits(got[i], want[i])) {
      ok = false;
      detail = "input row " + std::to_string(i / 8) + ", weight row " + std::to_string(i % 8) + ": " +
               std::to_string(got[i]) + " vs " + std::to_string(want[i]);
    }
  check(ok, ("int8 prompt kernel (rows in lanes), type " + std::to_string(T) + ", k " + std::to_string(k) +
             ", bit for bit").c_str(), detail);
  rng_state = saved;
}
#endif

// DecodeRows over a mixed weight set (x8 and plain, int8 and float activations) against the reference per row.
void check_decode_rows() {
  const int64_t k = 256, nb = k / QK;
  for (bool int8 : {true, false}) {
    for (int64_t m : {1, 2, 5, 9, 14, 16, 21, 32, 46}) {
      const auto x = random_activations(m, k);
      const DecodeRows rows(x.data(), m, k, int8);
      bool ok = true;
      for (int64_t t : {GGML_Q4_0, GGML_Q4_1, GGML_Q8_0}) {
        const int64_t n = 24, bb = block_bytes(t);
        auto raw = random_rows(t, n, nb);
        const auto plain = raw;
        WeightRef w{raw.data(), nb * bb, t};
        if (t != GGML_Q8_0) {
          for (int64_t g = 0; g < n / 8; ++g)
            for (int64_t b = 0; b < nb; ++b)
              ref::pack_group_block(t, plain.data() + (8 * g) * nb * bb + b * bb, nb * bb, raw.data() + 8 * g * nb * bb + b * 8 * bb);
          w.type = t | kInterleaved;
        }
        std::vector<float> out(m * n);
        decode_columns(rows, {w}, {0, n}, 0, n, out.data(), n);
        QuantRows qx(m, k);
        ref::quantize_rows(x.data(), m, k, qx);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            const uint8_t* row = plain.data() + j * nb * bb;
            const float want = int8 ? ref::row_dot_q8(t, row, qx.q.data() + i * k, qx.d.data() + i * nb, qx.s.data() + i * nb, nb)
                                    : float_dot(t, row, x.data() + i * k, nb);
            const double mag = int8 ? q8_magnitude(t, row, qx, i, nb) : float_magnitude(t, row, x.data() + i * k, nb);
            ok = ok && std::fabs(double(out[i * n + j]) - want) <= sum_bound(32 + 2 * nb + 8, mag);
#if defined(LW_AVX512)
            if (int8 && t != GGML_Q8_0) ok = ok && same_bits(out[i * n + j], want);  // x8 int8: the reference's bits
#endif
          }
      }
      check(ok, (std::string("decode rows, ") + (int8 ? "int8" : "float") + " activations, m " + std::to_string(m)).c_str());
    }
  }
}

template <typename KV>
void check_attention(int64_t D, int64_t n_keys, bool masked) {
  std::vector<float> q(D), kf(n_keys * D), vf(n_keys * D);
  for (auto& v : q) v = uniform(-2.f, 2.f);
  for (auto& v : kf) v = uniform(-2.f, 2.f);
  for (auto& v : vf) v = uniform(-1.f, 1.f);
  std::vector<KV> keys(n_keys * D), vals(n_keys * D);
  store_row(keys.data(), kf.data(), n_keys * D);
  store_row(vals.data(), vf.data(), n_keys * D);
  std::unique_ptr<bool[]> visible(new bool[n_keys]);
  for (int64_t s = 0; s < n_keys; ++s) visible[s] = !masked || s % 3 != 1;
  std::vector<float> scores(n_keys), out(D), want(D);
  const float scale = 1.f / std::sqrt(float(D));
  attend_one_head(q.data(), keys.data(), vals.data(), masked ? visible.get() : nullptr, n_keys, D, scale,
                  scores.data(), out.data());
  ref::attend_one_head(q.data(), keys.data(), vals.data(), masked ? visible.get() : nullptr, n_keys, D, scale,
                       scores.data(), want.data());
  // Weights: exp within a few ulp and sums in another order; the output is a convex combination of |v| <= 1.
  double err = 0;
  for (int64_t d = 0; d < D; ++d) err = std::max(err, std::fabs(double(out[d]) - want[d]));
  const double tol = sum_bound(n_keys + D + 16, 1.0) + 8 * std::ldexp(1.0, -23);
  check(err <= tol, ("attention, " + std::string(sizeof(KV) == 2 ? "float16" : "float32") + " KV, D " + std::to_string(D) +
                     ", " + std::to_string(n_keys) + " keys" + (masked ? ", masked" : "")).c_str(),
        "max error " + std::to_string(err));
}

// Several queries sharing one key/value head (a prompt chunk's tokens x a GQA group), each with its own key range
// (causal limits, a sliding window's start): every query's output as the reference computes it alone.
template <typename KV>
void check_attend_queries(int64_t D, int64_t nq, int64_t n_keys, int64_t window) {
  std::vector<float> qf(nq * D), kf(n_keys * D), vf(n_keys * D);
  for (auto& v : qf) v = uniform(-2.f, 2.f);
  for (auto& v : kf) v = uniform(-2.f, 2.f);
  for (auto& v : vf) v = uniform(-1.f, 1.f);
  std::vector<KV> keys(n_keys * D), vals(n_keys * D);
  store_row(keys.data(), kf.data(), n_keys * D);
  store_row(vals.data(), vf.data(), n_keys * D);
  std::vector<const float*> q(nq);
  std::vector<float> out(nq * D), want(nq * D);
  std::vector<float*> o(nq), w(nq);
  std::vector<int64_t> first(nq), limit(nq);
  for (int64_t i = 0; i < nq; ++i) {
    q[i] = qf.data() + i * D, o[i] = out.data() + i * D, w[i] = want.data() + i * D;
    limit[i] = n_keys - (nq - 1 - i) / 3;  // three heads per token, tokens at consecutive positions
    first[i] = window > 0 ? std::max<int64_t>(0, limit[i] - window) : 0;
  }
  std::vector<float> work;
  const float scale = 1.f / std::sqrt(float(D));
  attend_queries(nq, q.data(), o.data(), first.data(), limit.data(), keys.data(), vals.data(), D, scale, work);
  ref::attend_queries(nq, q.data(), w.data(), first.data(), limit.data(), keys.data(), vals.data(), D, scale, work);
  double err = 0;
  for (int64_t i = 0; i < nq * D; ++i) err = std::max(err, std::fabs(double(out[i]) - want[i]));
  const double tol = sum_bound(n_keys + D + 16, 1.0) + 8 * std::ldexp(1.0, -23);
  check(err <= tol, ("attention of " + std::to_string(nq) + " queries, " + (sizeof(KV) == 2 ? "float16" : "float32") +
                     " KV, D " + std::to_string(D) + ", " + std::to_string(n_keys) + " keys, window " +
                     std::to_string(window)).c_str(),
        "max error " + std::to_string(err));
  // A query's result does not depend on the queries that share its call (the batch invariance of the backend).
  std::vector<float> one(D);
  float* one_out = one.data();
  for (int64_t i = 0; i < nq; ++i) {
    attend_queries(1, &q[i], &one_out, &first[i], &limit[i], keys.data(), vals.data(), D, scale, work);
    check(std::memcmp(one.data(), o[i], D * sizeof(float)) == 0,
          ("attention of query " + std::to_string(i) + " alone and among " + std::to_string(nq) + ", D " +
           std::to_string(D) + ", " + std::to_string(n_keys) + " keys").c_str(),
          "not bit-identical");
  }
}

void check_pool() {
  for (int workers : {1, 2, 3}) {
    SpinPool pool(workers);
    bool ok = true;
    for (int region = 0; region < 300 && ok; ++region) {
      const int64_t n = 1 + region % 97;
      std::vector<std::atomic<int>> seen(n);
      for (auto& s : seen) s = 0;
      pool_for(pool, 0, n, 1 + region % 5, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) seen[i].fetch_add(1);
      }, region % 2 ? 8 : 1);
      for (auto& s : seen) ok = ok && s.load() == 1;
    }
    bool caught = false;
    try {
      pool_for(pool, 0, 64, 1, [&](int64_t lo, int64_t) { if (lo > 0) fail("boom"); });
    } catch (const std::runtime_error& e) {
      caught = std::string(e.what()).find("boom") != std::string::npos;
    }
    check(ok && caught, ("thread pool, " + std::to_string(workers + 1) + " parts: every index once, "
                                           "errors reach the caller").c_str());
  }
}

}  // namespace

int main() {
  std::printf("isa: %s\n", isa_description().c_str());
  check_half();
  check_dequant();
  check_quantize_rows();
  check_regrouping();
  for (int64_t k : {32, 256, 2048}) {
    check_int8_rows<GGML_Q4_0>(k);
    check_int8_rows<GGML_Q4_1>(k);
    check_int8_rows<GGML_Q8_0>(k);
    check_int8_group<GGML_Q4_0>(k);
    check_int8_group<GGML_Q4_1>(k);
#if defined(LW_AVX512)
    check_int8_gemm<GGML_Q4_0>(k);
    check_int8_gemm<GGML_Q4_1>(k);
#endif
  }
  check_decode_rows();
  for (int64_t D : {64, 128, 48}) {
    for (int64_t n : {1, 7, 40, 300}) {
      check_attention<float>(D, n, false);
      check_attention<Half>(D, n, n > 1);
      check_attend_queries<float>(D, 24, n + 8, 0);
      check_attend_queries<float>(D, 24, n + 8, n > 8 ? 7 : 0);  // tokens whose windows start at different keys
      check_attend_queries<Half>(D, 3, n + 2, n > 8 ? 5 : 0);
      check_attend_queries<Half>(D, 24, n + 8, n > 8 ? 7 : 0);  // the cache's type, windows at different keys
      check_attend_queries<Half>(D, 24, n + 11, 0);            // a key count that is not a multiple of 8
    }
  }
  check_pool();
  std::printf("reference-digest %016" PRIx64 "\n", digest);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
