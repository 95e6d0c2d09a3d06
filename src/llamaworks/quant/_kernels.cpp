// Weight-only quantized matmuls that read GGUF/ggml blocks (Q4_0, Q4_1, Q8_0) in place.
//
// Weights stay in the file's own block layout (rows of `ceil(K/32)` blocks), so a memory-mapped GGUF is used
// without copying; weights held in writable memory may be regrouped 8 rows at a time at load (see "x8" below).
// Small batches (decode, up to 32 rows) run fused dequantize-and-dot kernels; larger ones (prefill) dequantize
// a slab of rows and hand it to the BLAS gemm, where compute, not bandwidth, dominates.
#include <torch/extension.h>
#include <ATen/Parallel.h>

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

// Prefill in bfloat16 (the `bf16` argument of the ops; Python's default where the CPU has native bf16 dot
// products): the weight slabs are dequantized to bf16 and the gemm runs at about 2.4x the float32 rate there (430 vs
// 175 GFLOP/s on 2 cores). Inputs and outputs of each matmul are rounded to bf16 (8 significant bits), coarser than
// float32 but finer than the int8 activations llama.cpp uses; tests/test_runtime.py bounds the logit drift.
// Elsewhere torch's own bf16 gemm serves, so the path is tested on every CPU.
bool bf16_native() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

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

// The core's `par` argument: torch's OpenMP parallel_for.
const auto torch_par = [](int64_t begin, int64_t end, int64_t grain, const auto& f, int64_t) {
  at::parallel_for(begin, end, grain, f);
};

at::Tensor as_float_rows(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK(x_in.size(-1) == k, "llamaworks: input has ", x_in.size(-1), " features, weight expects ", k);
  return x_in.reshape({-1, k}).to(at::kFloat).contiguous();
}

WeightRef weight_ref(const at::Tensor& raw, int64_t t) { return {raw.data_ptr<uint8_t>(), raw.stride(0), t}; }

// Several weights sharing one input (q/k/v): one pass, outputs concatenated along the last dim. int8: int8
// activations in the decode kernels (up to decode_rows_limit rows); bf16: the prefill gemm in bfloat16.
at::Tensor ggml_linear_group(const at::Tensor& x_in, at::TensorList raws, at::IntArrayRef types, int64_t k, bool int8,
                             bool bf16) {
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
  if (m > decode_rows_limit(int8)) {
    const at::Tensor xg = bf16 ? x.to(at::kBFloat16) : x;
    at::Tensor yg = bf16 ? at::empty({m, n_total}, xg.options()) : y;
    for (size_t i = 0; i < raws.size(); ++i) gemm_path(xg, raws[i], types[i], k, yg.slice(1, offsets[i], offsets[i + 1]));
    if (bf16) y.copy_(yg);
  } else {
    const DecodeRows rows(x.data_ptr<float>(), m, k, int8);
    decode_linear(torch_par, rows, ws, offsets, y.data_ptr<float>());
  }
  return y.to(x_in.scalar_type()).view(out_shape);
}

// y = x @ W^T for x (..., K) and W given as (N, row_bytes) blocks.
at::Tensor ggml_linear(const at::Tensor& x_in, const at::Tensor& raw, int64_t t, int64_t k, bool int8, bool bf16) {
  return ggml_linear_group(x_in, {raw}, {t}, k, int8, bf16);
}

// SwiGLU's first half: silu(x @ Wgate^T) * (x @ Wup^T), both weights read in one pass.
at::Tensor ggml_swiglu(const at::Tensor& x_in, const at::Tensor& gate, int64_t tg, const at::Tensor& up, int64_t tu,
                       int64_t k, bool int8, bool bf16) {
  check_args(gate, tg, k);
  check_args(up, tu, k);
  TORCH_CHECK(gate.size(0) == up.size(0), "llamaworks: gate and up projections differ in size");
  const int64_t n = gate.size(0);
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = n;
  at::Tensor x = as_float_rows(x_in, k);
  const int64_t m = x.size(0);
  at::Tensor y;
  if (m > decode_rows_limit(int8)) {
    const at::Tensor xg = bf16 ? x.to(at::kBFloat16) : x;
    at::Tensor g = at::empty({m, n}, xg.options()), u = at::empty({m, n}, xg.options());
    gemm_path(xg, gate, tg, k, g);
    gemm_path(xg, up, tu, k, u);
    y = at::silu(g.to(at::kFloat)).mul_(u);
  } else {
    y = at::empty({m, n}, x.options());
    const DecodeRows rows(x.data_ptr<float>(), m, k, int8);
    decode_swiglu(torch_par, rows, weight_ref(gate, tg), weight_ref(up, tu), n, y.data_ptr<float>());
  }
  return y.to(x_in.scalar_type()).view(out_shape);
}

// Regroup a Q4_0/Q4_1 weight's rows into the x8 layout, in place (at load, before any kernel reads it).
void ggml_interleave_(at::Tensor raw, int64_t t, int64_t k) {
  check_args(raw, t, k);
  TORCH_CHECK((t == GGML_Q4_0 || t == GGML_Q4_1) && raw.size(0) % 8 == 0 && raw.is_contiguous(),
              "llamaworks: only contiguous Q4_0/Q4_1 weights with a multiple of 8 rows can be interleaved here");
  interleave_rows(torch_par, raw.data_ptr<uint8_t>(), raw.size(0), t, k);
}

}  // namespace

TORCH_LIBRARY(llamaworks, lib) {
  lib.def("ggml_linear(Tensor x, Tensor raw, int ggml_type, int in_features, bool int8, bool bf16) -> Tensor");
  lib.def("ggml_dequantize(Tensor raw, int ggml_type, int in_features) -> Tensor");
  lib.def("ggml_linear_group(Tensor x, Tensor[] raws, int[] ggml_types, int in_features, bool int8, bool bf16) -> "
          "Tensor");
  lib.def("ggml_swiglu(Tensor x, Tensor gate, int gate_type, Tensor up, int up_type, int in_features, bool int8, "
          "bool bf16) -> Tensor");
  lib.def("bf16_native() -> bool", &bf16_native);
  lib.def("isa() -> str", [] { return isa_description(); });
  lib.def("ggml_interleave_(Tensor(a!) raw, int ggml_type, int in_features) -> ()");
}

TORCH_LIBRARY_IMPL(llamaworks, CPU, lib) {
  lib.impl("ggml_linear", &ggml_linear);
  lib.impl("ggml_dequantize", &ggml_dequantize);
  lib.impl("ggml_linear_group", &ggml_linear_group);
  lib.impl("ggml_swiglu", &ggml_swiglu);
  lib.impl("ggml_interleave_", &ggml_interleave_);
}
