// Small helpers shared by the CPU kernels: float conversion of the three weight dtypes, and
// (with AVX-512) a 16-lane load of any of them as float32.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pk {

inline float to_float(float v) { return v; }
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Kernels that keep one accumulator per row of x in registers need the row count (1..8) at
// compile time: this calls f(std::integral_constant<int, nb>{}).
template <typename F>
inline void with_row_count(int nb, F&& f) {
  switch (nb) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

#if defined(__AVX512F__)
// 16 half-precision values already in a register -> float32 (the pointer only picks the type).
inline __m512 widen16(__m256i h, const at::Half*) { return _mm512_cvtph_ps(h); }
// bf16 is the high half of a float32: widen to 32 bits and shift into place.
inline __m512 widen16(__m256i h, const at::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
template <typename half_t>
inline __m512 load16(const half_t* p) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), p);
}

// e^x for 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 Taylor polynomial for e^r
// (relative error < 2e-7 on that interval), then VSCALEFPS multiplies by 2^n, which also gives
// inf / 0 for large |x| without special cases.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split in two for accuracy
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace pk
