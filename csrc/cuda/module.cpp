// persona_kernels._C_cuda: the CUDA kernels' Python module. Each op keeps its binding in
// csrc/cuda/<op>_binding.cpp with a register_<op>(m) function; add one line per op below.
#include <torch/extension.h>

namespace persona_kernels_cuda {
void register_accumulate_stats(pybind11::module_& m);
void register_bitmap_linear(pybind11::module_& m);
}  // namespace persona_kernels_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "persona_kernels CUDA kernels";
  persona_kernels_cuda::register_accumulate_stats(m);
  persona_kernels_cuda::register_bitmap_linear(m);
}
