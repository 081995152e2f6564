// Per-row top-k mask with a deterministic tie rule: rank each row by (score desc, column asc)
// and keep the first k. One std::nth_element per row over (value, column) pairs, rows in
// parallel with OpenMP. Bit-identical to the PyTorch reference (kthvalue + lowest-column ties)
// because the order is total.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

template <typename scalar_t>
struct Entry {
  scalar_t value;
  int64_t column;
};

template <typename scalar_t>
void topk_rows(const scalar_t* score, bool* keep, int64_t rows, int64_t n, int64_t k) {
#pragma omp parallel
  {
    std::vector<Entry<scalar_t>> buf(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = score + r * n;
      bool* out = keep + r * n;
      for (int64_t j = 0; j < n; ++j) buf[j] = {s[j], j};
      auto before = [](const Entry<scalar_t>& a, const Entry<scalar_t>& b) {
        return a.value > b.value || (a.value == b.value && a.column < b.column);
      };
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), before);
      std::fill(out, out + n, false);
      for (int64_t j = 0; j < k; ++j) out[buf[j].column] = true;
    }
  }
}

}  // namespace

torch::Tensor topk_mask(const torch::Tensor& score, int64_t k) {
  TORCH_CHECK(score.device().is_cpu(), "topk_mask (cpp): score must be on the CPU");
  TORCH_CHECK(score.dim() == 2, "topk_mask (cpp): score must be 2-D [rows, n]");
  TORCH_CHECK(score.scalar_type() == torch::kFloat32 || score.scalar_type() == torch::kFloat64,
              "topk_mask (cpp): score must be float32 or float64");
  const int64_t rows = score.size(0), n = score.size(1);
  TORCH_CHECK(k >= 1 && k < n, "topk_mask (cpp): k must be in [1, n)");
  auto s = score.contiguous();
  auto keep = torch::empty({rows, n}, score.options().dtype(torch::kBool));
  if (score.scalar_type() == torch::kFloat32) {
    topk_rows<float>(s.data_ptr<float>(), keep.data_ptr<bool>(), rows, n, k);
  } else {
    topk_rows<double>(s.data_ptr<double>(), keep.data_ptr<bool>(), rows, n, k);
  }
  return keep;
}

void register_topk_mask(pybind11::module_& m) {
  m.def("topk_mask", &topk_mask, "per-row top-k mask, ties to the lower column", pybind11::arg("score"),
        pybind11::arg("k"));
}
