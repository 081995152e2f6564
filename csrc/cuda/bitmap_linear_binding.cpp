// torch binding of the bitmap masked_linear CUDA kernel (bitmap_linear.cu): validates the
// tensors, then calls the extern "C" launcher with raw pointers on the current stream.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

#include "bitmap_linear.h"

namespace persona_kernels_cuda {
namespace {

constexpr const char* kOp = "bitmap_linear (cuda)";

void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, kOp, ": ", name, " must be on ", device, " (the device of x), got ", t.device());
}

int32_t dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return PK_BML_F32;
    case at::kHalf: return PK_BML_F16;
    case at::kBFloat16: return PK_BML_BF16;
    default: TORCH_CHECK(false, kOp, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return PK_BML_F32;
}

// Checks the weight and x, and fills everything of `args` but y / bias / the knobs.
PkBitmapLinearArgs make_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmap,
                             const at::Tensor& row_ptr) {
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  const at::Device device = x.device();
  const int32_t dtype = dtype_code(x);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), kOp, ": x must be a contiguous [N, in] tensor, got ", x.sizes());
  const int64_t N = x.size(0);
  const int64_t in = x.size(1);

  check_on(bitmap, "bitmap", device);
  TORCH_CHECK(bitmap.scalar_type() == at::kInt && bitmap.dim() == 2 && bitmap.is_contiguous(), kOp,
              ": bitmap must be a contiguous int32 [out, ceil(in / 32)] tensor, got ", bitmap.scalar_type(), " ",
              bitmap.sizes());
  const int64_t out = bitmap.size(0);
  const int64_t W = (in + 31) / 32;
  TORCH_CHECK(bitmap.size(1) == W, kOp, ": bitmap must have ceil(in / 32) = ", W, " words per row for in = ", in,
              ", got ", bitmap.size(1));
  TORCH_CHECK(out <= (int64_t{1} << 29) && in <= static_cast<int64_t>(INT32_MAX), kOp, ": weight too large (",
              out, " x ", in, ")");

  check_on(row_ptr, "row_ptr", device);
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.numel() == out + 1 &&
                  row_ptr.is_contiguous(),
              kOp, ": row_ptr must be a contiguous int64 [", out + 1, "] tensor, got ", row_ptr.scalar_type(), " ",
              row_ptr.sizes());

  check_on(values, "values", device);
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), kOp, ": values must have x's dtype ", x.scalar_type(),
              ", got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), kOp, ": values must be a contiguous 1-D tensor, got ",
              values.sizes());
  // row_ptr / bitmap consistency with values (row_ptr[out] == nnz, per-row popcounts) is not
  // checked here (a device sync); BitmapWeight.from_dense builds them consistent.

  PkBitmapLinearArgs args{};
  args.x = x.data_ptr();
  args.values = values.data_ptr();
  args.bitmap = bitmap.data_ptr<int32_t>();
  args.row_ptr = row_ptr.data_ptr<int64_t>();
  args.dtype = dtype;
  args.num_rows = N;
  args.in_features = in;
  args.out_features = out;
  args.words_per_row = W;
  return args;
}

void set_knobs(PkBitmapLinearArgs& args, int64_t rows_per_pass, int64_t threads, bool x_in_global) {
  TORCH_CHECK(rows_per_pass == 0 || rows_per_pass == 1 || rows_per_pass == 2 || rows_per_pass == 4 ||
                  rows_per_pass == 8,
              kOp, ": rows_per_pass must be 0 (auto), 1, 2, 4 or 8, got ", rows_per_pass);
  TORCH_CHECK(threads == 0 || threads == 128 || threads == 256 || threads == 512, kOp,
              ": threads must be 0 (auto), 128, 256 or 512, got ", threads);
  args.rows_per_pass = static_cast<int32_t>(rows_per_pass);
  args.threads = static_cast<int32_t>(threads);
  args.x_in_global = x_in_global ? 1 : 0;
}

// y = x W^T (+ bias) for the bitmap weight (values, bitmap, row_ptr); y [N, out] is fully
// written. Asynchronous on the current stream of x's device.
void bitmap_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmap,
                   const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias_opt, at::Tensor& y,
                   int64_t rows_per_pass, int64_t threads, bool x_in_global) {
  PkBitmapLinearArgs args = make_args(x, values, bitmap, row_ptr);
  const at::Device device = x.device();
  const int64_t N = args.num_rows;
  const int64_t out = args.out_features;

  if (bias_opt.has_value()) {
    const at::Tensor& bias = *bias_opt;
    check_on(bias, "bias", device);
    TORCH_CHECK(bias.scalar_type() == x.scalar_type() && bias.dim() == 1 && bias.size(0) == out &&
                    bias.is_contiguous(),
                kOp, ": bias must be a contiguous [", out, "] ", x.scalar_type(), " tensor, got ", bias.scalar_type(),
                " ", bias.sizes());
    args.bias = bias.data_ptr();
  }
  check_on(y, "y", device);
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.dim() == 2 && y.size(0) == N && y.size(1) == out &&
                  y.is_contiguous(),
              kOp, ": y must be a contiguous [", N, ", ", out, "] ", x.scalar_type(), " tensor, got ",
              y.scalar_type(), " ", y.sizes());
  set_knobs(args, rows_per_pass, threads, x_in_global);
  if (N == 0 || out == 0) return;
  args.y = y.data_ptr();

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const cudaError_t err = pk_bitmap_linear_cuda(&args, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
}

// The launch configuration bitmap_linear would use for these tensors (for benchmarks).
pybind11::dict bitmap_linear_config(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmap,
                                    const at::Tensor& row_ptr, int64_t rows_per_pass, int64_t threads,
                                    bool x_in_global) {
  PkBitmapLinearArgs args = make_args(x, values, bitmap, row_ptr);
  set_knobs(args, rows_per_pass, threads, x_in_global);
  const c10::cuda::CUDAGuard guard(x.device());
  PkBitmapLinearConfig cfg{};
  const cudaError_t err = pk_bitmap_linear_cuda_config(&args, &cfg);
  TORCH_CHECK(err == cudaSuccess, kOp, ": no launch configuration: ", cudaGetErrorString(err));
  pybind11::dict d;
  d["rows_per_pass"] = cfg.rows_per_pass;
  d["x_mode"] = cfg.x_mode == 0 ? "smem_f32" : cfg.x_mode == 1 ? "smem_native" : "global";
  d["threads"] = cfg.threads;
  d["lanes_per_row"] = cfg.lanes_per_row;
  d["grid"] = pybind11::make_tuple(cfg.grid_x, cfg.grid_y);
  d["smem_bytes"] = cfg.smem_bytes;
  d["blocks_per_sm"] = cfg.blocks_per_sm;
  d["num_sms"] = cfg.num_sms;
  return d;
}

}  // namespace

void register_bitmap_linear(pybind11::module_& m) {
  m.def("bitmap_linear", &bitmap_linear,
        "masked_linear on the bitmap format on a CUDA device: y [N, out] = x [N, in] W^T (+ bias), float32 "
        "accumulation, W given as values [nnz] / bitmap int32 [out, ceil(in/32)] / row_ptr int64 [out+1]. "
        "rows_per_pass (0 auto; 1, 2, 4, 8), threads (0 auto; 128, 256, 512) and x_in_global are tuning knobs.",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("bitmap"), pybind11::arg("row_ptr"),
        pybind11::arg("bias"), pybind11::arg("y"), pybind11::arg("rows_per_pass") = 0, pybind11::arg("threads") = 0,
        pybind11::arg("x_in_global") = false);
  m.def("bitmap_linear_config", &bitmap_linear_config,
        "The launch configuration bitmap_linear picks for these tensors on the current device (a dict).",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("bitmap"), pybind11::arg("row_ptr"),
        pybind11::arg("rows_per_pass") = 0, pybind11::arg("threads") = 0, pybind11::arg("x_in_global") = false);
}

}  // namespace persona_kernels_cuda
