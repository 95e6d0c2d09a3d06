// Weight-only quantized matmuls that read GGUF/ggml blocks (Q4_0, Q4_1, Q8_0) in place.
//
// Weights stay in the file's own block layout (rows of `ceil(K/32)` blocks), so a memory-mapped GGUF is used
// without copying; weights held in writable memory may be regrouped 8 rows at a time at load (see "x8" below).
// Small batches (decode, up to 32 rows) run fused dequantize-and-dot kernels; larger ones (prefill) dequantize
// a slab of rows and hand it to the BLAS gemm, where compute, not bandwidth, dominates.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "_kernels_core.h"

namespace {

using namespace lwcore;

void check_args(const at::Tensor& raw, int64_t t, int64_t k) {
  TORCH_CHECK((t & ~(kInterleaved | 255)) == 0 &&
              (!interleaved(t) || base_type(t) == GGML_Q4_0 || base_type(t) == GGML_Q4_1),
              "llamaworks: invalid ggml type code ", t, " (x8 rows exist for Q4_0 and Q4_1 only)");
  TORCH_CHECK(raw.dtype() == at::kByte && raw.dim() == 2, "llamaworks: raw weight must be a 2-D uint8 tensor");
  TORCH_CHECK(raw.stride(1) == 1, "llamaworks: raw weight rows must be contiguous");
  TORCH_CHECK(k % QK == 0, "llamaworks: in_features must be a multiple of 32, got ", k);
  TORCH_CHECK(raw.size(1) == (k / QK) * block_bytes(t), "llamaworks: raw row has ", raw.size(1),
              " bytes, expected ", (k / QK) * block_bytes(t));
  TORCH_CHECK(!interleaved(t) || (raw.size(0) % 8 == 0 && raw.stride(0) == raw.size(1)),
              "llamaworks: an interleaved weight must be whole contiguous groups of 8 rows");
}

// Calls row_fn(r, row) for every row r of `raw` with `row` in plain ggml layout (x8 groups unpacked first).
template <typename F>
void for_each_plain_row(const at::Tensor& raw, int64_t t, int64_t k, const F& row_fn) {
  const int64_t n = raw.size(0), stride = raw.stride(0);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  if (!interleaved(t)) {
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_fn(r, src + r * stride);
    });
    return;
  }
  at::parallel_for(0, n / 8, 2, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> plain(8 * stride);
    for (int64_t g = g0; g < g1; ++g) {
      unpack_group(t, src + g * 8 * stride, k / QK, plain.data());
      for (int64_t i = 0; i < 8; ++i) row_fn(8 * g + i, plain.data() + i * stride);
    }
  });
}

// (N, K) float32 from (N, row_bytes) blocks.
at::Tensor ggml_dequantize(const at::Tensor& raw, int64_t t, int64_t k) {
  check_args(raw, t, k);
  const int64_t n = raw.size(0), nb = k / QK, bb = block_bytes(t), bt = base_type(t);
  auto out = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat).device(raw.device()));
  float* dst = out.data_ptr<float>();
  for_each_plain_row(raw, t, k, [&](int64_t r, const uint8_t* row) {
    for (int64_t b = 0; b < nb; ++b) dequant_block(bt, row + b * bb, dst + r * k + b * QK);
  });
  return out;
}

// Prefill in bfloat16 (on by default on CPUs with native bf16 dot products): the weight slabs are dequantized to bf16 and the
// gemm runs at about 2.4x the float32 rate here (430 vs 175 GFLOP/s on 2 cores). Inputs and outputs of each
// matmul are rounded to bf16 (8 significant bits), coarser than float32 but finer than the int8 activations
// llama.cpp uses; tests/test_runtime.py bounds the logit drift. `bf16_prefill(0)` switches it off.
// Elsewhere it is off by default but can be switched on (torch's own bf16 gemm), so it is tested on every CPU.
#if defined(__AVX512BF16__)
std::atomic<bool> g_bf16_prefill{true};
#else
std::atomic<bool> g_bf16_prefill{false};
#endif

bool bf16_prefill(int64_t mode) { return flip(g_bf16_prefill, mode); }

// (N, K) bfloat16 from (N, row_bytes) blocks (the float dequantization, rounded to nearest even).
at::Tensor dequantize_bf16(const at::Tensor& raw, int64_t t, int64_t k) {
#if defined(__AVX512BF16__)
  const int64_t n = raw.size(0), nb = k / QK, bb = block_bytes(t), bt = base_type(t);
  auto out = at::empty({n, k}, at::TensorOptions().dtype(at::kBFloat16).device(raw.device()));
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for_each_plain_row(raw, t, k, [&](int64_t r, const uint8_t* row) {
    alignas(64) float tmp[QK];
    for (int64_t b = 0; b < nb; ++b) {
      dequant_block(bt, row + b * bb, tmp);
      const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_load_ps(tmp + 16), _mm512_load_ps(tmp));
      _mm512_storeu_si512(dst + r * k + b * QK, reinterpret_cast<const __m512i&>(packed));
    }
  });
  return out;
#else
  return ggml_dequantize(raw, t, k).to(at::kBFloat16);
#endif
}

void gemm_path(const at::Tensor& x, const at::Tensor& raw, int64_t t, int64_t k, at::Tensor out) {
  // Prefill: dequantize cache-sized slabs of rows (to x's dtype: float32 or bf16) and let the BLAS gemm write
  // straight into the output's columns (a strided view: no transposed copy, no concatenation afterwards).
  const int64_t n = raw.size(0);
  const int64_t slab = (std::max<int64_t>(64, (int64_t{1} << 18) / k) + 7) / 8 * 8;  // ~1 MiB of float32; whole x8 groups
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  for (int64_t r0 = 0; r0 < n; r0 += slab) {
    const int64_t r1 = std::min(n, r0 + slab);
    at::Tensor w = bf16 ? dequantize_bf16(raw.slice(0, r0, r1), t, k) : ggml_dequantize(raw.slice(0, r0, r1), t, k);
    at::Tensor cols = out.slice(1, r0, r1);
    at::mm_out(cols, x, w.t());
  }
}

// -- the decode thread pool ------------------------------------------------------------------------------
// A decode step is ~6 parallel regions per layer, each tens of microseconds long, so what matters is how fast
// idle workers pick up the next one. OpenMP (libgomp) keeps its workers spinning only while it manages no more
// threads than there are CPUs; a second thread that runs regions (a server's engine thread, after the model
// was loaded on the main thread) gets a second team, libgomp throttles spinning to ~1000 iterations, and every
// region then waits for futex wake-ups: measured 74 against 212 tok/s for SmolLM2 decoding off the main thread.
// Decode regions of such threads therefore run on this pool: workers spin between the regions of a step
// (bridging the Python between two layers) and sleep on a condition variable as soon as the step ends, so
// they never spin against torch's own OpenMP regions (sampling, prefill) in between: two sets of spinning
// workers on two cores slowed `generate` from 185 to 65 tok/s and a 16-token prefill 3x. Only inside a decode
// step (`DecodeScope`: the fused layer, and runtime.py's whole native step), where every parallel region is
// ours, and only off the main thread: the main thread's OpenMP team is the first one and keeps spinning, and
// there its hot workers also serve the sampling ops between steps. `decode_pool(0)`
// (LLAMAWORKS_DECODE_POOL=0) sends every decode step to OpenMP.
std::atomic<bool> g_decode_pool{true};
thread_local bool t_in_decode_step = false;
void park_decode_pool();

struct DecodeScope {  // marks this thread as running a decode step (nests); the outermost one parks the pool
  bool was;
  DecodeScope() : was(t_in_decode_step) { t_in_decode_step = true; }
  ~DecodeScope() {
    t_in_decode_step = was;
    if (!was) park_decode_pool();
  }
};

// The pool for the current torch thread count, made on first use; remade after a fork or a set_num_threads.
// Never destroyed: its threads sleep when idle and end with the process.
// One pool per thread count (torch's count is per calling thread), made on first use and kept; after a fork the
// child starts afresh (the parent's pools are left behind: their threads do not exist in the child).
thread_local SpinPool* t_pool = nullptr;  // the pool this thread used last

SpinPool& decode_pool_instance() {
  const int threads = std::max(1, at::get_num_threads());
  const pid_t pid = getpid();
  if (t_pool != nullptr && t_pool->parts() == threads && t_pool->pid() == pid) return *t_pool;
  static std::mutex mu;
  static std::vector<SpinPool*> pools;
  std::lock_guard<std::mutex> lk(mu);
  SpinPool* found = nullptr;
  for (SpinPool* pool : pools)
    if (pool->parts() == threads && pool->pid() == pid) found = pool;
  if (found == nullptr) {
    found = new SpinPool(threads - 1);
    pools.push_back(found);
  }
  t_pool = found;
  return *found;
}

void park_decode_pool() {
  if (SpinPool* pool = t_pool) pool->park();
}

// The process's initial thread (its thread id equals the process id on Linux; elsewhere: the first thread
// that asks, normally the one that loaded the model).
inline bool on_main_thread() {
#if defined(__linux__)
  return static_cast<pid_t>(syscall(SYS_gettid)) == getpid();
#else
  static const std::thread::id loader = std::this_thread::get_id();
  return std::this_thread::get_id() == loader;
#endif
}

// A decode region: on the decode pool inside a decode step off the main thread, else at::parallel_for.
template <typename F>
void decode_parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f, int64_t align = 1) {
  if (end <= begin) return;
  if (!t_in_decode_step || !g_decode_pool.load(std::memory_order_relaxed) || on_main_thread() ||
      at::in_parallel_region()) {
    return at::parallel_for(begin, end, grain, f);
  }
  pool_for(decode_pool_instance(), begin, end, grain, f, align);
}

// decode_parallel_for as the core's `par` argument.
const auto decode_par = [](int64_t begin, int64_t end, int64_t grain, const auto& f, int64_t align) {
  decode_parallel_for(begin, end, grain, f, align);
};

bool decode_pool(int64_t mode) { return flip(g_decode_pool, mode); }

// Python's side of DecodeScope for a whole native step (its output projection included): returns the previous
// state of this thread.
bool decode_step_scope(bool on) {
  const bool was = t_in_decode_step;
  t_in_decode_step = on;
  if (was && !on) park_decode_pool();
  return was;
}

at::Tensor as_float_rows(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK(x_in.size(-1) == k, "llamaworks: input has ", x_in.size(-1), " features, weight expects ", k);
  return x_in.reshape({-1, k}).to(at::kFloat).contiguous();
}

WeightRef weight_ref(const at::Tensor& raw, int64_t t) { return {raw.data_ptr<uint8_t>(), raw.stride(0), t}; }



// Several weights sharing one input (q/k/v): one pass, outputs concatenated along the last dim.
at::Tensor ggml_linear_group(const at::Tensor& x_in, at::TensorList raws, at::IntArrayRef types, int64_t k) {
  TORCH_CHECK(raws.size() == types.size() && !raws.empty(), "llamaworks: one ggml type per weight expected");
  std::vector<int64_t> offsets{0};
  std::vector<WeightRef> ws;
  for (size_t i = 0; i < raws.size(); ++i) {
    check_args(raws[i], types[i], k);
    offsets.push_back(offsets.back() + raws[i].size(0));
    ws.push_back(weight_ref(raws[i], types[i]));
  }
  const int64_t n_total = offsets.back();
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = n_total;
  at::Tensor x = as_float_rows(x_in, k);
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n_total}, x.options());
  if (m > decode_rows_limit()) {
    const bool bf16 = bf16_prefill(-1);
    const at::Tensor xg = bf16 ? x.to(at::kBFloat16) : x;
    at::Tensor yg = bf16 ? at::empty({m, n_total}, xg.options()) : y;
    for (size_t i = 0; i < raws.size(); ++i) gemm_path(xg, raws[i], types[i], k, yg.slice(1, offsets[i], offsets[i + 1]));
    if (bf16) y.copy_(yg);
  } else {
    const DecodeRows rows(x.data_ptr<float>(), m, k);
    decode_linear(decode_par, rows, ws, offsets, y.data_ptr<float>());
  }
  return y.to(x_in.scalar_type()).view(out_shape);
}

// y = x @ W^T for x (..., K) and W given as (N, row_bytes) blocks.
at::Tensor ggml_linear(const at::Tensor& x_in, const at::Tensor& raw, int64_t t, int64_t k) {
  return ggml_linear_group(x_in, {raw}, {t}, k);
}


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
  if (m > decode_rows_limit()) {
    const bool bf16 = bf16_prefill(-1);
    const at::Tensor xg = bf16 ? x.to(at::kBFloat16) : x;
    at::Tensor g = at::empty({m, n}, xg.options()), u = at::empty({m, n}, xg.options());
    gemm_path(xg, gate, tg, k, g);
    gemm_path(xg, up, tu, k, u);
    y = at::silu(g.to(at::kFloat)).mul_(u);
  } else {
    y = at::empty({m, n}, x.options());
    const DecodeRows rows(x.data_ptr<float>(), m, k);
    decode_swiglu(decode_par, rows, weight_ref(gate, tg), weight_ref(up, tu), n, y.data_ptr<float>());
  }
  return y.to(x_in.scalar_type()).view(out_shape);
}


// One transformer block for one new token per row, entirely in C++: x (B, dim) -> x (B, dim).
// Keys/values are written at cache slot `slot`; a query sees the cache slots where `visible` (B, S) is true.
at::Tensor ggml_decode_layer(const at::Tensor& x_in, const at::Tensor& attn_norm, const at::Tensor& ffn_norm,
                             double eps, at::TensorList attn_w, at::IntArrayRef attn_t, at::TensorList ffn_w,
                             at::IntArrayRef ffn_t, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& visible, int64_t slot,
                             int64_t n_heads, int64_t n_kv_heads) {
  TORCH_CHECK(attn_w.size() == 4 && ffn_w.size() == 3, "llamaworks: expected wq, wk, wv, wo and w1, w3, w2");
  const DecodeScope scope;
  const bool half_kv = k_cache.scalar_type() == at::kHalf;
  TORCH_CHECK((half_kv || k_cache.scalar_type() == at::kFloat) && v_cache.scalar_type() == k_cache.scalar_type() &&
              k_cache.is_contiguous() && v_cache.is_contiguous(),
              "llamaworks: the fused decode layer needs contiguous float32 or float16 KV caches of one dtype");
  at::Tensor x = x_in.to(at::kFloat).contiguous().clone();
  const int64_t B = x.size(0), dim = x.size(1), S = k_cache.size(2), D = k_cache.size(3), qdim = n_heads * D;
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
  at::Tensor attn = at::empty({B, qdim}, x.options());
  std::vector<int64_t> seq(B), slots(B, slot);
  for (int64_t b = 0; b < B; ++b) seq[b] = b;
  const float *cp = cosc.data_ptr<float>(), *sp = sinc.data_ptr<float>();
  const bool* vp = vis.data_ptr<bool>();
  if (half_kv)
    attention_rows(decode_par, qp, qkv_n, reinterpret_cast<Half*>(k_cache.data_ptr<c10::Half>()),
                   reinterpret_cast<Half*>(v_cache.data_ptr<c10::Half>()), cp, sp, vp, 0, B, seq.data(),
                   slots.data(), S, D, n_heads, n_kv_heads, attn.data_ptr<float>());
  else
    attention_rows(decode_par, qp, qkv_n, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), cp, sp, vp, 0, B,
                   seq.data(), slots.data(), S, D, n_heads, n_kv_heads, attn.data_ptr<float>());

  at::Tensor o = ggml_linear_group(attn, {attn_w[3]}, {attn_t[3]}, qdim);
  x.add_(o);
  for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * dim, fnw, hp + b * dim, dim, eps);
  at::Tensor act = ggml_swiglu(h, ffn_w[0], ffn_t[0], ffn_w[1], ffn_t[1], dim);
  x.add_(ggml_linear_group(act, {ffn_w[2]}, {ffn_t[2]}, act.size(1)));
  return x.to(x_in.scalar_type());
}

// Regroup a Q4_0/Q4_1 weight's rows into the x8 layout, in place (at load, before any kernel reads it).
void ggml_interleave_(at::Tensor raw, int64_t t, int64_t k) {
  check_args(raw, t, k);
  TORCH_CHECK((t == GGML_Q4_0 || t == GGML_Q4_1) && raw.size(0) % 8 == 0 && raw.is_contiguous(),
              "llamaworks: only contiguous Q4_0/Q4_1 weights with a multiple of 8 rows can be interleaved here");
  const auto torch_par = [](int64_t begin, int64_t end, int64_t grain, const auto& f, int64_t) {
    at::parallel_for(begin, end, grain, f);
  };
  interleave_rows(torch_par, raw.data_ptr<uint8_t>(), raw.size(0), t, k);
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
  lib.def("int8_decode(int mode) -> bool", &lwcore::int8_decode);
  lib.def("bf16_prefill(int mode) -> bool", &bf16_prefill);
  lib.def("isa() -> str", [] { return isa_description(); });
  lib.def("decode_pool(int mode) -> bool", &decode_pool);
  lib.def("decode_step_scope(bool on) -> bool", &decode_step_scope);
  lib.def("ggml_interleave_(Tensor(a!) raw, int ggml_type, int in_features) -> ()");
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, lib) {
  lib.impl("ggml_linear", &ggml_linear);
  lib.impl("ggml_dequantize", &ggml_dequantize);
  lib.impl("ggml_linear_group", &ggml_linear_group);
  lib.impl("ggml_swiglu", &ggml_swiglu);
  lib.impl("ggml_decode_layer", &ggml_decode_layer);
  lib.impl("ggml_interleave_", &ggml_interleave_);
}
