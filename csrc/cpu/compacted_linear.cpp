// Neuron/row-compacted GEMV/GEMM on the CPU (persona_kernels/formats/compacted.py).
//
// The compact weight is an ordinary dense [R, C] matrix plus an index:
//   axis "out": R kept output rows;   y[n, index[r]] = W_c[r] . x[n]          (others: bias or 0)
//   axis "in":  C kept input columns; y[n, o]        = W_c[o] . x[n, index]   (x gathered first)
// A vendor GEMM does the same work but needs a gathered copy of x or a scatter of y around it
// and, at fp16/bf16 on a CPU, converts the whole weight; this kernel streams each weight row
// once (16 lanes converted to float32 in registers), reuses it for up to NB rows of x, and
// writes y in place. It is meant for decode (small batches); the dispatcher hands large batches
// to the vendor GEMM on the compact weight.
#include <algorithm>
#include <vector>

#include "row_gemv.h"

namespace {

template <typename scalar_t>
void compacted(const torch::Tensor& xf, const torch::Tensor& weight, const torch::Tensor& index, bool axis_in,
               const float* bias, torch::Tensor& y) {
  const int64_t batch = xf.size(0), in_f = xf.size(1), out_f = y.size(1);
  const int64_t rows = weight.size(0), len = weight.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  const float* x = xf.data_ptr<float>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  if (axis_in) {  // gather the kept input columns once: [batch, len]
    std::vector<float> xs(static_cast<size_t>(batch * len));
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t j = 0; j < len; ++j) xs[n * len + j] = x[n * in_f + idx[j]];
    pk::gemv_rows<scalar_t>(weight.data_ptr<scalar_t>(), rows, len, xs.data(), batch, nullptr, bias, yp, out_f);
    return;
  }
  // outputs of removed rows: the bias (or 0); the kept ones are written by gemv_rows
  std::vector<char> kept(static_cast<size_t>(out_f), 0);
  for (int64_t r = 0; r < rows; ++r) kept[idx[r]] = 1;
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t o = 0; o < out_f; ++o)
      if (!kept[o]) yp[n * out_f + o] = static_cast<scalar_t>(bias ? bias[o] : 0.0f);
  pk::gemv_rows<scalar_t>(weight.data_ptr<scalar_t>(), rows, len, x, batch, idx, bias, yp, out_f);
}

}  // namespace

// x [N, in] (any float dtype; converted to float32 once), weight [R, C] compact in the output
// dtype, index int64 (kept rows for axis_in = false, kept columns for axis_in = true), bias
// float32 [out] or empty; y [N, out] in the weight's dtype.
void compacted_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& index, bool axis_in,
                      const torch::Tensor& bias, torch::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && index.device().is_cpu() && y.device().is_cpu(),
              "compacted_linear (cpp): tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && y.dim() == 2 && index.dim() == 1,
              "compacted_linear (cpp): x, weight, y must be 2-D and index 1-D");
  TORCH_CHECK(weight.is_contiguous() && y.is_contiguous() && y.scalar_type() == weight.scalar_type(),
              "compacted_linear (cpp): weight and y must be contiguous, y in the weight's dtype");
  TORCH_CHECK(index.scalar_type() == torch::kInt64 && index.is_contiguous(), "compacted_linear (cpp): index must be int64");
  const int64_t batch = x.size(0), in_f = x.size(1), out_f = y.size(1);
  const int64_t bound = axis_in ? in_f : out_f;
  TORCH_CHECK(y.size(0) == batch, "compacted_linear (cpp): y must have x's rows");
  TORCH_CHECK(axis_in ? (weight.size(0) == out_f && weight.size(1) == index.numel())
                      : (weight.size(1) == in_f && weight.size(0) == index.numel()),
              "compacted_linear (cpp): weight ", weight.sizes(), " does not match index [", index.numel(), "], x ",
              x.sizes(), " and y ", y.sizes());
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j)  // a loaded file could hold anything; a few us per call
    TORCH_CHECK(idx[j] >= 0 && idx[j] < bound, "compacted_linear (cpp): index ", idx[j], " out of range [0, ", bound, ")");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == out_f),
              "compacted_linear (cpp): bias must be float32 [out] or empty");
  const auto xf = x.to(torch::kFloat32).contiguous();
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  switch (weight.scalar_type()) {
    case torch::kFloat32: return compacted<float>(xf, weight, index, axis_in, b, y);
    case torch::kFloat16: return compacted<at::Half>(xf, weight, index, axis_in, b, y);
    case torch::kBFloat16: return compacted<at::BFloat16>(xf, weight, index, axis_in, b, y);
    default: TORCH_CHECK(false, "compacted_linear (cpp): unsupported dtype ", weight.scalar_type());
  }
}

void register_compacted_linear(pybind11::module_& m) {
  m.def("compacted_linear", &compacted_linear, "row/column-compacted GEMV/GEMM (y = x W_masked^T + b)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("index"), pybind11::arg("axis_in"),
        pybind11::arg("bias"), pybind11::arg("y"));
}
