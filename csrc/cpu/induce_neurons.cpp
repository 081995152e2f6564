// NPTI induction: out = (deactivate ? min(a, 0) : a) + add, broadcast over rows.
// Rows in parallel; the inner loop over neurons is branch-free so it vectorises.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace {

template <typename scalar_t>
void induce_rows(const scalar_t* a, scalar_t* out, const uint8_t* deact, const float* add, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* ar = a + r * n;
    scalar_t* o = out + r * n;
    for (int64_t j = 0; j < n; ++j) {
      const float v = static_cast<float>(ar[j]);
      const float clipped = deact[j] ? std::min(v, 0.0f) : v;
      o[j] = static_cast<scalar_t>(clipped + add[j]);
    }
  }
}

}  // namespace

void induce_neurons(const torch::Tensor& a, torch::Tensor& out, const torch::Tensor& deactivate,
                    const torch::Tensor& add) {
  TORCH_CHECK(a.device().is_cpu() && out.device().is_cpu(), "induce_neurons (cpp): tensors must be on the CPU");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && out.is_contiguous() && out.sizes() == a.sizes() &&
                  out.scalar_type() == a.scalar_type(),
              "induce_neurons (cpp): a and out must be contiguous [rows, n] of one dtype");
  const int64_t rows = a.size(0), n = a.size(1);
  TORCH_CHECK(deactivate.scalar_type() == torch::kUInt8 && deactivate.numel() == n && deactivate.is_contiguous(),
              "induce_neurons (cpp): deactivate must be uint8 [n]");
  TORCH_CHECK(add.scalar_type() == torch::kFloat32 && add.numel() == n && add.is_contiguous(),
              "induce_neurons (cpp): add must be float32 [n]");
  const uint8_t* d = deactivate.data_ptr<uint8_t>();
  const float* ad = add.data_ptr<float>();
  switch (a.scalar_type()) {
    case torch::kFloat32:
      induce_rows<float>(a.data_ptr<float>(), out.data_ptr<float>(), d, ad, rows, n);
      break;
    case torch::kFloat16:
      induce_rows<at::Half>(a.data_ptr<at::Half>(), out.data_ptr<at::Half>(), d, ad, rows, n);
      break;
    case torch::kBFloat16:
      induce_rows<at::BFloat16>(a.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), d, ad, rows, n);
      break;
    default:
      TORCH_CHECK(false, "induce_neurons (cpp): unsupported dtype ", a.scalar_type());
  }
}

void register_induce_neurons(pybind11::module_& m) {
  m.def("induce_neurons", &induce_neurons, "NPTI induction: out = (deact ? min(a, 0) : a) + add", pybind11::arg("a"),
        pybind11::arg("out"), pybind11::arg("deactivate"), pybind11::arg("add"));
}
