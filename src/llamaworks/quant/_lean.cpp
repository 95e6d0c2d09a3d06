// The library behind engine/native.py: a whole LLaMA forward pass over GGUF blocks behind a plain C ABI (loaded with
// ctypes), so a process can run a model without importing torch. `import torch` alone costs ~220 MiB of resident
// memory, more than the default model's weights; this library links only the C++ runtime.
//
// The kernels and the transformer block are the core's (_kernels_core.h). A batch of tokens (any cache rows, any
// positions) goes through in chunks of up to 32 tokens with the decode kernels (float activations too: an x8
// group is dequantized once per chunk): every token of a chunk shares each weight read, so prompts and many
// sequences' decode steps take the same path.
#include "_kernels_core.h"

#include <sys/mman.h>

#include <cstdio>

using namespace lwcore;

namespace {

// A caller's mistake (a row, position or token id out of range): Python raises ValueError for these.
struct Invalid : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

[[noreturn]] void invalid(const std::string& what, int64_t value, const std::string& range) {
  throw Invalid(what + " " + std::to_string(value) + " is outside " + range);
}

void check_row(const Model& m, int64_t row, const char* what = "row") {
  if (row < 0 || row >= m.max_rows)
    invalid(what, row, "the cache's rows (0.." + std::to_string(m.max_rows - 1) + ")");
}

// 0 on success; -2 with the message in err for an invalid argument, -1 for anything else.
template <typename F>
int guarded(char* err, int64_t err_len, const F& f) {
  int code = 0;
  try {
    f();
  } catch (const Invalid& e) {
    code = -2;
    if (err != nullptr && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
  } catch (const std::exception& e) {
    code = -1;
    if (err != nullptr && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
  }
  return code;
}

// The pool, checked: after a fork the child has none of its threads, and running on it would spin forever.
SpinPool& usable(void* pool) {
  if (pool == nullptr) fail("no thread pool");
  SpinPool& p = *static_cast<SpinPool*>(pool);
  if (p.pid() != getpid()) fail("this thread pool belongs to the parent process (made before a fork)");
  return p;
}

template <typename KV>
void forward_batch(SpinPool& p, const Model& m, const int32_t* tokens, const int64_t* rows, const int64_t* positions,
                   int64_t n, const int64_t* logits_for, int64_t n_logits, float* logits) {
  const auto par = [&p](int64_t b, int64_t e, int64_t g, const auto& f, int64_t a) { pool_for(p, b, e, g, f, a); };
  KV* kc = static_cast<KV*>(m.k_cache);
  KV* vc = static_cast<KV*>(m.v_cache);
  const bool int8 = m.int8_activations != 0;
  const int64_t chunk = int8 ? kInt8Chunk : kFloatChunk, dim = m.dim, nb = dim / QK;
  const int64_t emb_bb = block_bytes(m.embedding_type), emb_row = nb * emb_bb;
  // The logits wanted, by token index: (token, output row), so each chunk finds its own in one run.
  std::vector<std::pair<int64_t, int64_t>> wanted(n_logits);
  for (int64_t j = 0; j < n_logits; ++j) wanted[j] = {logits_for[j], j};
  std::sort(wanted.begin(), wanted.end());
  Scratch s(m, std::min(chunk, n));
  std::vector<float> out;
  size_t next = 0;
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t cn = std::min(chunk, n - c0);
    for (int64_t i = 0; i < cn; ++i) {
      const uint8_t* row = m.embedding + int64_t(tokens[c0 + i]) * emb_row;
      for (int64_t b = 0; b < nb; ++b) dequant_block(m.embedding_type, row + b * emb_bb, &s.x[i * dim + b * QK]);
    }
    blocks(par, m, kc, vc, s, cn, rows + c0, positions + c0);
    const size_t first = next;
    while (next < wanted.size() && wanted[next].first < c0 + cn) {
      rms_norm(&s.x[(wanted[next].first - c0) * dim], m.output_norm, &s.h[(next - first) * dim], dim, m.eps);
      ++next;
    }
    const int64_t k = static_cast<int64_t>(next - first);
    if (k == 0) continue;
    // Straight into `logits` when these rows are consecutive there (one wanted token, or a prompt's in order).
    bool consecutive = true;
    for (int64_t i = 1; i < k; ++i) consecutive = consecutive && wanted[first + i].second == wanted[first].second + i;
    float* y = logits + wanted[first].second * m.vocab;
    if (!consecutive) out.resize(k * m.vocab), y = out.data();
    decode_linear(par, DecodeRows(s.h.data(), k, dim, int8), {{m.output, nb * block_bytes(m.output_type),
                  m.output_type}}, {0, m.vocab}, y);
    for (int64_t i = 0; !consecutive && i < k; ++i)
      std::memcpy(logits + wanted[first + i].second * m.vocab, &out[i * m.vocab], m.vocab * sizeof(float));
  }
}

}  // namespace

extern "C" {

int lw_abi_version() { return 4; }
// The SIMD level of each kernel family in this build (the library is built for one target: -march=...).
const char* lw_isa() {
  static const std::string description = isa_description();
  return description.c_str();
}

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
  return guarded(err, err_len, [&] {
    SpinPool& p = usable(pool);
    const auto par = [&p](int64_t b, int64_t e, int64_t g, const auto& f, int64_t a) { pool_for(p, b, e, g, f, a); };
    interleave_rows(par, raw, rows, type, in_features);
    p.park();
  });
}

// Runs tokens[0, n): token i at position positions[i] of cache row rows[i] (its key and value written there; it
// attends to its row's positions up to its own). logits (n_logits, vocab): the logits of tokens logits_for[j], in
// that order. 0 on success; -2 (an argument out of range) or -1, with a one-line message in err.
int lw_forward_batch(const Model* model, void* pool, const int32_t* tokens, const int64_t* rows,
                     const int64_t* positions, int64_t n, const int64_t* logits_for, int64_t n_logits, float* logits,
                     char* err, int64_t err_len) {
  SpinPool* pp = nullptr;
  const int code = guarded(err, err_len, [&] {
    const Model& m = *model;
    if (n <= 0) throw Invalid("no tokens to run");
    for (int64_t i = 0; i < n; ++i) {
      if (tokens[i] < 0 || tokens[i] >= m.vocab)
        invalid("token id", tokens[i], "the vocabulary (0.." + std::to_string(m.vocab - 1) + ")");
      check_row(m, rows[i]);
      if (positions[i] < 0 || positions[i] >= m.ctx)
        invalid("position", positions[i], "the context of " + std::to_string(m.ctx) + " positions (0.." +
                std::to_string(m.ctx - 1) + ")");
    }
    for (int64_t j = 0; j < n_logits; ++j)
      if (logits_for[j] < 0 || logits_for[j] >= n)
        invalid("logits_for index", logits_for[j], "the batch of " + std::to_string(n) + " tokens");
    SpinPool& p = usable(pool);
    pp = &p;
    if (m.kv_float32)
      forward_batch<float>(p, m, tokens, rows, positions, n, logits_for, n_logits, logits);
    else
      forward_batch<Half>(p, m, tokens, rows, positions, n, logits_for, n_logits, logits);
  });
  if (pp != nullptr) pp->park();
  return code;
}

// Copies positions [0, length) of cache row src into row dst, in every (layer, key/value head) span.
int lw_copy_rows(const Model* model, int64_t src, int64_t dst, int64_t length, char* err, int64_t err_len) {
  return guarded(err, err_len, [&] {
    const Model& m = *model;
    check_row(m, src, "source row");
    check_row(m, dst, "destination row");
    if (length < 0 || length > m.ctx)
      invalid("length", length, "the context of " + std::to_string(m.ctx) + " positions");
    if (src == dst || length == 0) return;
    const int64_t elem = m.kv_float32 ? 4 : 2, span = m.ctx * m.head_dim * elem, row = cache_row_elems(m) * elem;
    for (void* cache : {m.k_cache, m.v_cache}) {
      auto* base = static_cast<uint8_t*>(cache);
      for (int64_t j = 0; j < m.n_layers * m.n_kv_heads; ++j)
        std::memcpy(base + dst * row + j * span, base + src * row + j * span, length * m.head_dim * elem);
    }
  });
}

// Positions >= keep of `row` are no longer needed: the whole pages they fill in each (layer, key/value head) span go
// back to the operating system (MADV_DONTNEED: the anonymous mapping reads as zeros again, and commits memory only
// when written).
int lw_release(const Model* model, int64_t row, int64_t keep, char* err, int64_t err_len) {
  return guarded(err, err_len, [&] {
    const Model& m = *model;
    check_row(m, row);
    if (keep < 0 || keep > m.ctx) invalid("keep", keep, "the context of " + std::to_string(m.ctx) + " positions");
    const int64_t page = sysconf(_SC_PAGESIZE), elem = m.kv_float32 ? 4 : 2;
    const int64_t pos_bytes = m.head_dim * elem, span = m.ctx * pos_bytes, row_bytes = cache_row_elems(m) * elem;
    for (void* cache : {m.k_cache, m.v_cache}) {
      const auto base = reinterpret_cast<uintptr_t>(cache) + static_cast<uintptr_t>(row * row_bytes);
      for (int64_t j = 0; j < m.n_layers * m.n_kv_heads; ++j) {
        const uintptr_t begin = (base + j * span + keep * pos_bytes + page - 1) / page * page;
        const uintptr_t end = (base + (j + 1) * span) / page * page;
        if (begin < end && madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED) != 0)
          fail("madvise failed while releasing cache row " + std::to_string(row));
      }
    }
  });
}

}  // extern "C"
