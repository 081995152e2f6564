// The row kernel shared by the dense and the compacted GEMV/GEMM (dense_linear.cpp,
// compacted_linear.cpp): every weight row is streamed once and dotted with up to NB rows of x
// (accumulators in registers), rows split over OpenMP threads in contiguous ranges.
#pragma once

#include <algorithm>

#include "vec.h"

namespace pk {

constexpr int ROWS_NB = 8;  // rows of x per pass (accumulators live in registers)
constexpr int ROWS_PREFETCH_BYTES = 4096;  // how far ahead of the weight stream to prefetch

// Two accumulators per x row (alternate 16-lane chunks) so the FMA latency chain is not the
// limit when the weight row is in cache. The prefetch runs a few KB ahead of the stream: with
// rows of a few hundred columns the hardware prefetcher alone left the loads waiting (a
// 49152x576 fp32 GEMV on Zen 4: 2.9 ms without, 2.6 ms with, 16 GB/s for torch's F.linear).
template <typename scalar_t, int NBT>
void dot_rows(const scalar_t* w, int64_t len, const float* x, int64_t ldx, float* acc) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 sum[2][NBT];
  for (int n = 0; n < NBT; ++n) sum[0][n] = sum[1][n] = _mm512_setzero_ps();
  for (; i + 32 <= len; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i) + ROWS_PREFETCH_BYTES, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + i + 16) + ROWS_PREFETCH_BYTES, _MM_HINT_T0);  // fp32: 2 lines a step
    const __m512 v0 = load16(w + i), v1 = load16(w + i + 16);
    for (int n = 0; n < NBT; ++n) {
      sum[0][n] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + n * ldx + i), sum[0][n]);
      sum[1][n] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + n * ldx + i + 16), sum[1][n]);
    }
  }
  for (; i + 16 <= len; i += 16) {
    const __m512 v = load16(w + i);
    for (int n = 0; n < NBT; ++n) sum[0][n] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + n * ldx + i), sum[0][n]);
  }
  for (int n = 0; n < NBT; ++n) acc[n] += _mm512_reduce_add_ps(_mm512_add_ps(sum[0][n], sum[1][n]));
#endif
  for (; i < len; ++i) {
    const float v = to_float(w[i]);
    for (int n = 0; n < NBT; ++n) acc[n] += v * x[n * ldx + i];
  }
}

// y[n, out_col(r)] = W[r] . xs[n] + bias[out_col(r)] for every row r of W [rows, len].
template <typename scalar_t>
void gemv_rows(const scalar_t* w, int64_t rows, int64_t len, const float* xs, int64_t batch,
               const int64_t* out_col /* nullptr: identity */, const float* bias, scalar_t* y, int64_t ldy) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = out_col ? out_col[r] : r;
    const float b = bias ? bias[o] : 0.0f;
    for (int64_t n0 = 0; n0 < batch; n0 += ROWS_NB) {
      const int nb = static_cast<int>(std::min<int64_t>(ROWS_NB, batch - n0));
      float acc[ROWS_NB] = {0};
      with_row_count(nb, [&](auto nbt) {
        dot_rows<scalar_t, decltype(nbt)::value>(w + r * len, len, xs + n0 * len, len, acc);
      });
      for (int n = 0; n < nb; ++n) y[(n0 + n) * ldy + o] = static_cast<scalar_t>(acc[n] + b);
    }
  }
}

}  // namespace pk
