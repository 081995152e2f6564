// NPTI induction: out = (deactivate ? min(f(a), 0) : f(a)) + add, broadcast over rows, where f is
// the MLP's activation when the op is fused into it (act = 1: SiLU, 2: tanh-GELU; a is then
// the gate projection's output) or the identity (act = 0: a is already activated). One pass
// over the activation instead of two. Rows in parallel; with AVX-512 16 neurons per step, exp
// computed in registers (vec.h's exp16).
#include <algorithm>
#include <cmath>

#include "vec.h"

namespace {

enum Act { kIdentity = 0, kSilu = 1, kGeluTanh = 2 };
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)

inline float act_scalar(float v, int act) {
  if (act == kSilu) return v / (1.0f + std::exp(-v));
  if (act == kGeluTanh) return 0.5f * v * (1.0f + std::tanh(kGeluC * (v + 0.044715f * v * v * v)));
  return v;
}

#if defined(__AVX512F__)
// silu(v) = v / (1 + e^-v);  gelu_tanh(v) = v - v / (1 + e^(2u)), u = c (v + 0.044715 v^3)
inline __m512 act16(__m512 v, int act) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if (act == kSilu) return _mm512_div_ps(v, _mm512_add_ps(one, pk::exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
  if (act == kGeluTanh) {
    const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(kGeluC), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
    const __m512 e = pk::exp16(_mm512_add_ps(u, u));
    return _mm512_sub_ps(v, _mm512_div_ps(v, _mm512_add_ps(one, e)));
  }
  return v;
}

template <typename scalar_t>
inline void store16(scalar_t* p, __m512 v) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    _mm512_storeu_ps(p, v);
  } else {
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, v);
    for (int k = 0; k < 16; ++k) p[k] = static_cast<scalar_t>(tmp[k]);
  }
}
#endif

template <typename scalar_t>
void induce_rows(const scalar_t* a, scalar_t* out, const uint8_t* deact, const float* add, int64_t rows, int64_t n,
                 int act) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* ar = a + r * n;
    scalar_t* o = out + r * n;
    int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    for (; j + 16 <= n; j += 16) {
      const __m512 v = act16(pk::load16(ar + j), act);
      const __mmask16 d = _mm_cmpneq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(deact + j)),
                                               _mm_setzero_si128());
      const __m512 clipped = _mm512_mask_min_ps(v, d, v, _mm512_setzero_ps());
      store16(o + j, _mm512_add_ps(clipped, _mm512_loadu_ps(add + j)));
    }
#endif
    for (; j < n; ++j) {
      const float v = act_scalar(static_cast<float>(ar[j]), act);
      const float clipped = deact[j] ? std::min(v, 0.0f) : v;
      o[j] = static_cast<scalar_t>(clipped + add[j]);
    }
  }
}

}  // namespace

void induce_neurons(const torch::Tensor& a, torch::Tensor& out, const torch::Tensor& deactivate,
                    const torch::Tensor& add, int64_t act) {
  TORCH_CHECK(a.device().is_cpu() && out.device().is_cpu(), "induce_neurons (cpp): tensors must be on the CPU");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && out.is_contiguous() && out.sizes() == a.sizes() &&
                  out.scalar_type() == a.scalar_type(),
              "induce_neurons (cpp): a and out must be contiguous [rows, n] of one dtype");
  TORCH_CHECK(act >= kIdentity && act <= kGeluTanh, "induce_neurons (cpp): act must be 0 (none), 1 (silu) or 2 (gelu_tanh)");
  const int64_t rows = a.size(0), n = a.size(1);
  TORCH_CHECK(deactivate.scalar_type() == torch::kUInt8 && deactivate.numel() == n && deactivate.is_contiguous(),
              "induce_neurons (cpp): deactivate must be uint8 [n]");
  TORCH_CHECK(add.scalar_type() == torch::kFloat32 && add.numel() == n && add.is_contiguous(),
              "induce_neurons (cpp): add must be float32 [n]");
  const uint8_t* d = deactivate.data_ptr<uint8_t>();
  const float* ad = add.data_ptr<float>();
  const int f = static_cast<int>(act);
  switch (a.scalar_type()) {
    case torch::kFloat32:
      induce_rows<float>(a.data_ptr<float>(), out.data_ptr<float>(), d, ad, rows, n, f);
      break;
    case torch::kFloat16:
      induce_rows<at::Half>(a.data_ptr<at::Half>(), out.data_ptr<at::Half>(), d, ad, rows, n, f);
      break;
    case torch::kBFloat16:
      induce_rows<at::BFloat16>(a.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), d, ad, rows, n, f);
      break;
    default:
      TORCH_CHECK(false, "induce_neurons (cpp): unsupported dtype ", a.scalar_type());
  }
}

void register_induce_neurons(pybind11::module_& m) {
  m.def("induce_neurons", &induce_neurons, "NPTI induction, optionally fused with the activation: "
        "out = (deact ? min(f(a), 0) : f(a)) + add", pybind11::arg("a"), pybind11::arg("out"),
        pybind11::arg("deactivate"), pybind11::arg("add"), pybind11::arg("act") = 0);
}
