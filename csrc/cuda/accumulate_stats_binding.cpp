// torch binding of the accumulate_stats CUDA kernel (accumulate_stats.cu): validates the
// tensors, then calls the extern "C" launcher with raw pointers on the current stream.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

#include "accumulate_stats.h"

namespace persona_kernels_cuda {
namespace {

constexpr const char* kOp = "accumulate_stats_partials (cuda)";

void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, kOp, ": ", name, " must be on ", device, " (the device of x), got ", t.device());
}

void check_index(const at::Tensor& t, const char* name, int64_t K, const at::Device& device) {
  check_on(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kLong, kOp, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == K && t.is_contiguous(), kOp, ": ", name, " must be a contiguous [", K,
              "] tensor, got ", t.sizes());
}

void check_out(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t K, int64_t C,
               const at::Device& device) {
  check_on(t, name, device);
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == C, kOp, ": ", name, " must have shape [", K, ", ", C,
              "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

// Stage 1 of accumulate_stats: fill the chunk partials (every element of sum, mean, m2, sumsq,
// sumabs, pos, min, max, absmax) over the valid rows of each chunk of x, and add the histogram
// counts into hist. Asynchronous on the current stream of x's device.
void accumulate_stats_partials(const at::Tensor& x, const at::Tensor& valid, const at::Tensor& start,
                               const at::Tensor& length, const at::Tensor& persona,
                               const std::optional<at::Tensor>& edges_opt, const std::optional<at::Tensor>& hist_opt,
                               at::Tensor& sum, at::Tensor& mean, at::Tensor& m2, at::Tensor& sumsq,
                               at::Tensor& sumabs, at::Tensor& pos, at::Tensor& mn, at::Tensor& mx, at::Tensor& amx,
                               int64_t vec) {
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  const at::Device device = x.device();
  int32_t dtype = PK_ACC_F32;
  switch (x.scalar_type()) {
    case at::kFloat: dtype = PK_ACC_F32; break;
    case at::kHalf: dtype = PK_ACC_F16; break;
    case at::kBFloat16: dtype = PK_ACC_BF16; break;
    default: TORCH_CHECK(false, kOp, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(x.dim() >= 2, kOp, ": x must be [..., C] with the rows in front (e.g. [B, T, C]), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), kOp, ": x must be contiguous");
  const int64_t C = x.size(-1);
  const int64_t R = C > 0 ? x.numel() / C : 0;
  TORCH_CHECK(C >= 1, kOp, ": x needs at least one channel");

  check_on(valid, "valid", device);
  TORCH_CHECK(valid.scalar_type() == at::kBool || valid.scalar_type() == at::kByte, kOp,
              ": valid must be bool (or uint8 0/1), got ", valid.scalar_type());
  TORCH_CHECK(valid.numel() == R && valid.is_contiguous(), kOp, ": valid must be a contiguous tensor of ", R,
              " row flags, got ", valid.sizes());

  const int64_t K = start.numel();
  check_index(start, "start", K, device);
  check_index(length, "length", K, device);
  check_index(persona, "persona", K, device);
  check_out(sum, "sum", at::kFloat, K, C, device);
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, kOp,
              ": mean must be float32 or float64, got ", mean.scalar_type());
  check_out(mean, "mean", mean.scalar_type(), K, C, device);
  check_out(m2, "m2", at::kFloat, K, C, device);
  check_out(sumsq, "sumsq", at::kFloat, K, C, device);
  check_out(sumabs, "sumabs", at::kFloat, K, C, device);
  check_out(pos, "pos", at::kInt, K, C, device);
  check_out(mn, "min", at::kFloat, K, C, device);
  check_out(mx, "max", at::kFloat, K, C, device);
  check_out(amx, "absmax", at::kFloat, K, C, device);

  const int64_t elem = x.element_size();
  const bool pairs_ok = C % 2 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % (2 * elem) == 0;
  TORCH_CHECK(vec == 0 || vec == 1 || vec == 2, kOp, ": vec must be 0 (auto), 1 or 2, got ", vec);
  TORCH_CHECK(vec != 2 || pairs_ok, kOp, ": vec=2 needs an even C and x aligned to two elements");
  if (vec == 0) vec = pairs_ok ? 2 : 1;
  const int64_t per_block = static_cast<int64_t>(PK_ACC_THREADS) * vec;
  TORCH_CHECK((C + per_block - 1) / per_block <= 65535 && C * elem <= static_cast<int64_t>(UINT32_MAX), kOp,
              ": too many channels (", C, ")");
  TORCH_CHECK(K <= static_cast<int64_t>(INT32_MAX), kOp, ": too many chunks (", K, ")");

  TORCH_CHECK(edges_opt.has_value() == hist_opt.has_value(), kOp, ": edges and hist must be given together");
  const float* edges_ptr = nullptr;
  int32_t* hist_ptr = nullptr;
  int64_t E = 0;
  if (edges_opt.has_value()) {
    const at::Tensor& edges = *edges_opt;
    const at::Tensor& hist = *hist_opt;
    check_on(edges, "edges", device);
    TORCH_CHECK(edges.scalar_type() == at::kFloat && edges.dim() == 1 && edges.is_contiguous(), kOp,
                ": edges must be a contiguous 1-D float32 tensor");
    E = edges.numel();
    TORCH_CHECK(E >= 2 && E <= static_cast<int64_t>(INT32_MAX), kOp, ": edges need at least 2 values, got ", E);
    check_on(hist, "hist", device);
    TORCH_CHECK(hist.scalar_type() == at::kInt && hist.dim() == 3 && hist.size(1) == C && hist.size(2) == E - 1 &&
                    hist.is_contiguous(),
                kOp, ": hist must be a contiguous int32 [P, ", C, ", ", E - 1, "] tensor, got ", hist.scalar_type(),
                " ", hist.sizes());
    // persona values are not checked here (that would need a device sync): the caller keeps
    // them in [0, P) (the dispatcher validates segment_ids), as it keeps chunks inside x.
    edges_ptr = edges.data_ptr<float>();
    hist_ptr = hist.data_ptr<int32_t>();
  }
  if (K == 0) return;

  PkAccumulateStatsArgs args{};
  args.x = x.data_ptr();
  args.dtype = dtype;
  args.vec = static_cast<int32_t>(vec);
  args.num_rows = R;
  args.num_channels = C;
  args.valid = static_cast<const uint8_t*>(valid.data_ptr());
  args.chunk_start = start.data_ptr<int64_t>();
  args.chunk_length = length.data_ptr<int64_t>();
  args.chunk_persona = persona.data_ptr<int64_t>();
  args.num_chunks = K;
  args.edges = edges_ptr;
  args.num_edges = E;
  args.hist = hist_ptr;
  args.sum = sum.data_ptr<float>();
  args.mean = mean.data_ptr();
  args.mean_is_f64 = mean.scalar_type() == at::kDouble ? 1 : 0;
  args.m2 = m2.data_ptr<float>();
  args.sumsq = sumsq.data_ptr<float>();
  args.sumabs = sumabs.data_ptr<float>();
  args.pos = pos.data_ptr<int32_t>();
  args.min = mn.data_ptr<float>();
  args.max = mx.data_ptr<float>();
  args.absmax = amx.data_ptr<float>();

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const cudaError_t err = pk_accumulate_stats_cuda(&args, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void register_accumulate_stats(pybind11::module_& m) {
  m.def("accumulate_stats_partials", &accumulate_stats_partials,
        "accumulate_stats stage 1 on a CUDA device: fill the chunk partials (sum, mean, m2, sumsq, sumabs, pos, "
        "min, max, absmax; [K, C] each, mean float32 or float64) over the valid rows of each chunk of x, and add "
        "the histogram counts into hist [P, C, E-1]. vec: channels per thread (2 needs an even C and x aligned "
        "to two elements; 0 picks 2 when it can).",
        pybind11::arg("x"), pybind11::arg("valid"), pybind11::arg("start"), pybind11::arg("length"),
        pybind11::arg("persona"), pybind11::arg("edges"), pybind11::arg("hist"), pybind11::arg("sum"),
        pybind11::arg("mean"), pybind11::arg("m2"), pybind11::arg("sumsq"), pybind11::arg("sumabs"),
        pybind11::arg("pos"), pybind11::arg("min"), pybind11::arg("max"), pybind11::arg("absmax"),
        pybind11::arg("vec") = 0);
  m.attr("ACCUMULATE_STATS_THREADS") = PK_ACC_THREADS;
  m.attr("ACCUMULATE_STATS_MIN_BLOCKS_PER_SM") = PK_ACC_MIN_BLOCKS_PER_SM;
}

}  // namespace persona_kernels_cuda
