// persona_kernels._C_cpu: the C++/OpenMP kernels' Python module. setup.py builds every
// csrc/cpu/*.cpp into this one extension; each op file defines register_<op>(m), and adding an
// op is one declaration and one call below.
#include <torch/extension.h>

void register_accumulate_stats(pybind11::module_& m);
void register_bitmap_linear(pybind11::module_& m);
void register_compacted_linear(pybind11::module_& m);
void register_dense_linear(pybind11::module_& m);
void register_shared_bitmask_linear(pybind11::module_& m);
void register_induce_neurons(pybind11::module_& m);
void register_topk_mask(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "persona_kernels C++/OpenMP CPU kernels";
  // whether the kernels were built with their AVX-512 paths (-march=native on a CPU that has it);
  // without, they run scalar loops, and the dense GEMV is not offered (the vendor's is faster)
#if defined(__AVX512F__)
  m.attr("avx512") = true;
#else
  m.attr("avx512") = false;
#endif
  register_accumulate_stats(m);
  register_bitmap_linear(m);
  register_compacted_linear(m);
  register_dense_linear(m);
  register_shared_bitmask_linear(m);
  register_induce_neurons(m);
  register_topk_mask(m);
}
