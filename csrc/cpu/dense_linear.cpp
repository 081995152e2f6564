// Dense GEMV/GEMM for decode on the CPU: y = x Wᵀ + b with W [out, in] as nn.Linear holds it.
//
// The vendor GEMV that F.linear reaches on some CPUs streams a decode step's weights well below
// the memory bandwidth (measured on AMD Zen 4, fp32, 49152x576 - SmolLM2's tied output head:
// 7.1 ms, 16 GB/s, where a read-only pass over the same bytes takes 2.0 ms). This kernel is
// the compacted format's row kernel with every row kept (row_gemv.h): each weight row is read
// once for up to 8 rows of x. The dispatcher (ops/dense_linear) sends larger batches, and
// shapes where it does not win, to F.linear.
#include "row_gemv.h"

namespace {

template <typename scalar_t>
void dense(const torch::Tensor& xf, const torch::Tensor& weight, const float* bias, torch::Tensor& y) {
  pk::gemv_rows<scalar_t>(weight.data_ptr<scalar_t>(), weight.size(0), weight.size(1), xf.data_ptr<float>(), xf.size(0),
                          nullptr, bias, y.data_ptr<scalar_t>(), y.size(1));
}

}  // namespace

// x [N, in] (any float dtype; converted to float32 once), weight [out, in] contiguous, bias
// float32 [out] or empty; y [N, out] contiguous in the weight's dtype.
void dense_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, torch::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && y.device().is_cpu(),
              "dense_linear (cpp): tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && y.dim() == 2, "dense_linear (cpp): x, weight, y must be 2-D");
  TORCH_CHECK(weight.is_contiguous() && y.is_contiguous() && y.scalar_type() == weight.scalar_type(),
              "dense_linear (cpp): weight and y must be contiguous, y in the weight's dtype");
  TORCH_CHECK(x.size(1) == weight.size(1) && y.size(0) == x.size(0) && y.size(1) == weight.size(0),
              "dense_linear (cpp): shapes do not match: x ", x.sizes(), ", weight ", weight.sizes(), ", y ", y.sizes());
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == weight.size(0)),
              "dense_linear (cpp): bias must be float32 [out] or empty");
  const auto xf = x.to(torch::kFloat32).contiguous();
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  switch (weight.scalar_type()) {
    case torch::kFloat32: return dense<float>(xf, weight, b, y);
    case torch::kFloat16: return dense<at::Half>(xf, weight, b, y);
    case torch::kBFloat16: return dense<at::BFloat16>(xf, weight, b, y);
    default: TORCH_CHECK(false, "dense_linear (cpp): unsupported dtype ", weight.scalar_type());
  }
}

void register_dense_linear(pybind11::module_& m) {
  m.def("dense_linear", &dense_linear, "dense GEMV/GEMM for small batches (y = x W^T + b)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("y"));
}
