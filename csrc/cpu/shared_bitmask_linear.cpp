// Shared dense weight + per-persona bitmask GEMV/GEMM on the CPU
// (persona_kernels/formats/shared_bitmask.py): y[n, o] = sum_i W[o, i] M[p_n, o, i] x[n, i].
//
// Every row of x may carry its own persona p_n (mixed-persona batch) and the dense weight is
// still read once per pass: each 32-column step loads 32 weights, and each x row applies its
// persona's bitmap word as the write mask of a masked FMA (VFMADD with a k-mask), so masking
// costs no extra instruction. Bytes per pass: the dense weight plus 1 bit per weight per row
// of x, so this format is never faster than dense; it exists so that many personas share one
// weight copy and a mixed batch runs in one call.
#include <algorithm>

#include "vec.h"

namespace {

constexpr int NB = 8;  // rows of x per pass (accumulators live in registers)

// One weight row against NBT x rows; words[n] points at row o's bitmap words for x row n's persona.
template <typename scalar_t, int NBT>
void masked_row(const scalar_t* w, const int32_t* const* words, int64_t in_f, const float* x, int64_t ldx,
                float* acc) {
  const int64_t full = in_f / 32;
  int64_t wi = 0;
#if defined(__AVX512F__)
  __m512 sum[2][NBT];
  for (int n = 0; n < NBT; ++n) sum[0][n] = sum[1][n] = _mm512_setzero_ps();
  for (; wi < full; ++wi) {
    const __m512 v0 = pk::load16(w + wi * 32), v1 = pk::load16(w + wi * 32 + 16);
    for (int n = 0; n < NBT; ++n) {
      const uint32_t bits = static_cast<uint32_t>(words[n][wi]);
      const float* xr = x + n * ldx + wi * 32;
      sum[0][n] = _mm512_mask3_fmadd_ps(v0, _mm512_loadu_ps(xr), sum[0][n], static_cast<__mmask16>(bits & 0xFFFF));
      sum[1][n] = _mm512_mask3_fmadd_ps(v1, _mm512_loadu_ps(xr + 16), sum[1][n], static_cast<__mmask16>(bits >> 16));
    }
  }
  for (int n = 0; n < NBT; ++n) acc[n] += _mm512_reduce_add_ps(_mm512_add_ps(sum[0][n], sum[1][n]));
#endif
  for (int64_t col = wi * 32; col < in_f; ++col) {  // scalar tail (and the whole row without AVX-512)
    const float v = pk::to_float(w[col]);
    for (int n = 0; n < NBT; ++n)
      if ((static_cast<uint32_t>(words[n][col / 32]) >> (col % 32)) & 1u) acc[n] += v * x[n * ldx + col];
  }
}

template <typename scalar_t>
void shared_rows(const scalar_t* weight, const int32_t* bits, const int64_t* persona, const float* x, int64_t batch,
                 int64_t out_f, int64_t in_f, const float* bias, scalar_t* y) {
  const int64_t nwords = (in_f + 31) / 32;
  const int64_t persona_stride = out_f * nwords;
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out_f; ++o) {
    const float b = bias ? bias[o] : 0.0f;
    for (int64_t n0 = 0; n0 < batch; n0 += NB) {
      const int nb = static_cast<int>(std::min<int64_t>(NB, batch - n0));
      const int32_t* words[NB];
      for (int n = 0; n < nb; ++n) words[n] = bits + persona[n0 + n] * persona_stride + o * nwords;
      float acc[NB] = {0};
      pk::with_row_count(nb, [&](auto nbt) {
        masked_row<scalar_t, decltype(nbt)::value>(weight + o * in_f, words, in_f, x + n0 * in_f, in_f, acc);
      });
      for (int n = 0; n < nb; ++n) y[(n0 + n) * out_f + o] = static_cast<scalar_t>(acc[n] + b);
    }
  }
}

}  // namespace

// x [N, in] (any float dtype; converted to float32 once), weight [out, in] contiguous, bits
// int32 [P, out, ceil(in/32)], persona int64 [N] (the persona of each row of x), bias float32
// [out] or empty; y [N, out] in the weight's dtype.
void shared_bitmask_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bits,
                           const torch::Tensor& persona, const torch::Tensor& bias, torch::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && bits.device().is_cpu() && persona.device().is_cpu() &&
                  y.device().is_cpu(),
              "shared_bitmask_linear (cpp): tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && bits.dim() == 3 && y.dim() == 2,
              "shared_bitmask_linear (cpp): x, weight, y must be 2-D and bits 3-D");
  const int64_t batch = x.size(0), in_f = x.size(1), out_f = weight.size(0), personas = bits.size(0);
  TORCH_CHECK(weight.size(1) == in_f && weight.is_contiguous(), "shared_bitmask_linear (cpp): weight must be contiguous [out, in]");
  TORCH_CHECK(bits.scalar_type() == torch::kInt32 && bits.is_contiguous() && bits.size(1) == out_f &&
                  bits.size(2) == (in_f + 31) / 32,
              "shared_bitmask_linear (cpp): bits must be contiguous int32 [P, out, ceil(in/32)]");
  TORCH_CHECK(persona.scalar_type() == torch::kInt64 && persona.is_contiguous() && persona.numel() == batch,
              "shared_bitmask_linear (cpp): persona must be int64 [N]");
  TORCH_CHECK(y.size(0) == batch && y.size(1) == out_f && y.is_contiguous() && y.scalar_type() == weight.scalar_type(),
              "shared_bitmask_linear (cpp): y must be contiguous [N, out] in the weight's dtype");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == out_f),
              "shared_bitmask_linear (cpp): bias must be float32 [out] or empty");
  const int64_t* p = persona.data_ptr<int64_t>();
  for (int64_t n = 0; n < batch; ++n)
    TORCH_CHECK(p[n] >= 0 && p[n] < personas, "shared_bitmask_linear (cpp): persona index ", p[n], " out of range [0, ",
                personas, ")");
  const auto xf = x.to(torch::kFloat32).contiguous();
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int32_t* bp = bits.data_ptr<int32_t>();
  switch (weight.scalar_type()) {
    case torch::kFloat32:
      return shared_rows<float>(weight.data_ptr<float>(), bp, p, xf.data_ptr<float>(), batch, out_f, in_f, b,
                                y.data_ptr<float>());
    case torch::kFloat16:
      return shared_rows<at::Half>(weight.data_ptr<at::Half>(), bp, p, xf.data_ptr<float>(), batch, out_f, in_f, b,
                                   y.data_ptr<at::Half>());
    case torch::kBFloat16:
      return shared_rows<at::BFloat16>(weight.data_ptr<at::BFloat16>(), bp, p, xf.data_ptr<float>(), batch, out_f, in_f,
                                       b, y.data_ptr<at::BFloat16>());
    default:
      TORCH_CHECK(false, "shared_bitmask_linear (cpp): unsupported dtype ", weight.scalar_type());
  }
}

void register_shared_bitmask_linear(pybind11::module_& m) {
  m.def("shared_bitmask_linear", &shared_bitmask_linear,
        "shared dense weight + per-persona bitmask GEMV/GEMM, one persona per row of x", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bits"), pybind11::arg("persona"), pybind11::arg("bias"),
        pybind11::arg("y"));
}
