// The library behind llamaworks.lean: a whole LLaMA forward pass over GGUF blocks behind a plain C ABI (loaded
// with ctypes), so a process can run a model without importing torch. `import torch` alone costs ~220 MiB of
// resident memory, more than the default model's weights; this library links only the C++ runtime.
//
// The kernels are the torch runtime's (_kernels_core.h). Prompts go through in chunks of up to 32 tokens with the
// decode kernels (weights read once per chunk, every row dotted in cache), so there is no separate prefill path.
#include "_kernels_core.h"

#include <cstdio>

using namespace lwcore;

extern "C" {

// Mirrored by ctypes structures in llamaworks/quant/lean_kernels.py: keep the field order in step.
struct LwLayer {
  const float* attn_norm;
  const float* ffn_norm;
  const uint8_t* weight[7];  // wq, wk, wv, wo, w1 (gate), w3 (up), w2 (down): rows of ggml blocks
  int64_t type[7];           // ggml type codes (| 256 for x8 rows)
};

struct LwModel {
  int64_t dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, vocab, ctx, window;  // window 0: none
  double eps;
  const float* inv_freq;  // head_dim / 2 rotary inverse frequencies
  const uint8_t* embedding;
  int64_t embedding_type;  // plain rows
  const uint8_t* output;   // the embedding's bytes when tied
  int64_t output_type;
  const float* output_norm;
  const LwLayer* layers;
  void* k_cache;  // (n_layers, n_kv_heads, ctx, head_dim) each, float16 (or float32 with kv_float32)
  void* v_cache;
  int64_t kv_float32;
};

}  // extern "C"

namespace {

void report(const std::exception& e, char* err, int64_t err_len) {
  if (err != nullptr && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
}

int64_t row_bytes(int64_t type, int64_t k) { return k / QK * block_bytes(type); }

WeightRef weight(const uint8_t* data, int64_t type, int64_t k) { return {data, row_bytes(type, k), type}; }

// The pool, checked: after a fork the child has none of its threads, and running on it would spin forever.
SpinPool& usable(void* pool) {
  if (pool == nullptr) fail("no thread pool");
  SpinPool& p = *static_cast<SpinPool*>(pool);
  if (p.pid() != getpid()) fail("this thread pool belongs to the parent process (made before a fork)");
  return p;
}

struct Scratch {  // the activations of one chunk of rows
  std::vector<float> x, h, qkv, attn, act, tmp, cos, sin;
  std::vector<int64_t> seq, slot;
  Scratch(const LwModel& m, int64_t rows)
      : x(rows * m.dim), h(rows * m.dim), qkv(rows * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim),
        attn(rows * m.n_heads * m.head_dim), act(rows * m.hidden), tmp(rows * m.dim), cos(rows * m.head_dim / 2),
        sin(rows * m.head_dim / 2), seq(rows, 0), slot(rows) {}
};

// Tokens [0, rows) of one chunk at positions pos, pos + 1, ...: the residual stream s.x through every block.
template <typename Par>
void blocks(const Par& par, const LwModel& m, Scratch& s, int64_t rows, int64_t pos) {
  const int64_t dim = m.dim, D = m.head_dim, qdim = m.n_heads * D, kvdim = m.n_kv_heads * D;
  const int64_t qkv_n = qdim + 2 * kvdim, layer_cache = m.n_kv_heads * m.ctx * D;
  for (int64_t i = 0; i < rows; ++i) {
    s.slot[i] = pos + i;
    for (int64_t j = 0; j < D / 2; ++j) {
      const float angle = static_cast<float>(pos + i) * m.inv_freq[j];  // float32, as the torch runtime
      s.cos[i * (D / 2) + j] = std::cos(angle);
      s.sin[i * (D / 2) + j] = std::sin(angle);
    }
  }
  const auto add = [&](const std::vector<float>& y) {
    for (int64_t i = 0; i < rows * dim; ++i) s.x[i] += y[i];
  };
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const LwLayer& L = m.layers[l];
    const auto w = [&](int i, int64_t k) { return weight(L.weight[i], L.type[i], k); };
    for (int64_t i = 0; i < rows; ++i) rms_norm(&s.x[i * dim], L.attn_norm, &s.h[i * dim], dim, m.eps);
    {
      const std::vector<WeightRef> ws{w(0, dim), w(1, dim), w(2, dim)};
      const DecodeRows in(s.h.data(), rows, dim);
      decode_linear(par, in, ws, {0, qdim, qdim + kvdim, qkv_n}, s.qkv.data());
    }
    const auto attend = [&](auto* k_cache, auto* v_cache) {
      attention_rows(par, s.qkv.data(), qkv_n, k_cache + l * layer_cache, v_cache + l * layer_cache, s.cos.data(),
                     s.sin.data(), nullptr, m.window, rows, s.seq.data(), s.slot.data(), m.ctx, D, m.n_heads,
                     m.n_kv_heads, s.attn.data());
    };
    if (m.kv_float32)
      attend(static_cast<float*>(m.k_cache), static_cast<float*>(m.v_cache));
    else
      attend(static_cast<Half*>(m.k_cache), static_cast<Half*>(m.v_cache));
    {
      const DecodeRows in(s.attn.data(), rows, qdim);
      decode_linear(par, in, {w(3, qdim)}, {0, dim}, s.tmp.data());
      add(s.tmp);
    }
    for (int64_t i = 0; i < rows; ++i) rms_norm(&s.x[i * dim], L.ffn_norm, &s.h[i * dim], dim, m.eps);
    {
      const DecodeRows in(s.h.data(), rows, dim);
      decode_swiglu(par, in, w(4, dim), w(5, dim), m.hidden, s.act.data());
    }
    {
      const DecodeRows in(s.act.data(), rows, m.hidden);
      decode_linear(par, in, {w(6, m.hidden)}, {0, dim}, s.tmp.data());
      add(s.tmp);
    }
  }
}

}  // namespace

extern "C" {

int lw_abi_version() { return 3; }
// The SIMD level of each kernel family in this build (the library is built for one target: -march=...).
const char* lw_isa() {
  static const std::string description = isa_description();
  return description.c_str();
}
int lw_int8_decode(int mode) { return int8_decode(mode) ? 1 : 0; }

// A pool of `threads` parts (the caller's thread is one), or nullptr when its threads cannot be started. Its
// threads sleep once parked and end with the process; Python keeps one pool per thread count and process.
void* lw_pool_new(int threads) {
  try {
    return new SpinPool(std::max(1, threads) - 1);
  } catch (...) {
    return nullptr;
  }
}
int lw_pool_parts(void* pool) { return static_cast<SpinPool*>(pool)->parts(); }

// Regroup a contiguous Q4_0/Q4_1 weight (rows a multiple of 8) into the x8 layout, in place. 0 on success.
int lw_interleave(uint8_t* raw, int64_t rows, int64_t type, int64_t in_features, void* pool, char* err,
                  int64_t err_len) {
  try {
    SpinPool& p = usable(pool);
    const auto par = [&p](int64_t b, int64_t e, int64_t g, const auto& f, int64_t a) { pool_for(p, b, e, g, f, a); };
    interleave_rows(par, raw, rows, type, in_features);
    p.park();
    return 0;
  } catch (const std::exception& e) {
    report(e, err, err_len);
    return -1;
  }
}

// Runs tokens[0, n) at positions pos .. pos + n - 1 (their keys/values written to the cache), in chunks of up to
// 32 tokens. logits: (n, vocab) when all_logits, else the last token's (vocab). 0 on success, else -1 with a
// one-line message in err.
int lw_forward(const LwModel* model, void* pool, const int32_t* tokens, int64_t n, int64_t pos, float* logits,
               int all_logits, char* err, int64_t err_len) {
  SpinPool* pp = nullptr;
  try {
    SpinPool& p = usable(pool);
    pp = &p;
    const LwModel& m = *model;
    if (n <= 0) fail("no tokens to run");
    if (pos < 0 || pos + n > m.ctx)
      fail("positions " + std::to_string(pos) + ".." + std::to_string(pos + n - 1) + " do not fit the context of " +
           std::to_string(m.ctx) + " tokens");
    for (int64_t i = 0; i < n; ++i)
      if (tokens[i] < 0 || tokens[i] >= m.vocab)
        fail("token id " + std::to_string(tokens[i]) + " is outside the vocabulary (0.." +
             std::to_string(m.vocab - 1) + ")");
    const auto par = [&p](int64_t b, int64_t e, int64_t g, const auto& f, int64_t a) { pool_for(p, b, e, g, f, a); };
    const int64_t chunk = decode_rows_limit(), dim = m.dim, nb = dim / QK;
    const int64_t emb_bb = block_bytes(m.embedding_type), emb_row = nb * emb_bb;
    Scratch s(m, std::min(chunk, n));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t rows = std::min(chunk, n - c0);
      for (int64_t i = 0; i < rows; ++i) {
        const uint8_t* row = m.embedding + int64_t(tokens[c0 + i]) * emb_row;
        for (int64_t b = 0; b < nb; ++b) dequant_block(m.embedding_type, row + b * emb_bb, &s.x[i * dim + b * QK]);
      }
      blocks(par, m, s, rows, pos + c0);
      const bool last = c0 + rows == n;
      if (!all_logits && !last) continue;
      const int64_t first = all_logits ? 0 : rows - 1;  // only the last token's logits unless all are wanted
      for (int64_t i = first; i < rows; ++i) rms_norm(&s.x[i * dim], m.output_norm, &s.h[(i - first) * dim], dim, m.eps);
      const DecodeRows in(s.h.data(), rows - first, dim);
      decode_linear(par, in, {weight(m.output, m.output_type, dim)}, {0, m.vocab},
                    logits + (all_logits ? c0 * m.vocab : 0));
    }
    p.park();
    return 0;
  } catch (const std::exception& e) {
    if (pp != nullptr) pp->park();
    report(e, err, err_len);
    return -1;
  }
}

}  // extern "C"
