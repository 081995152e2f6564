// Bitmap-compressed GEMV/GEMM on the CPU: y[n, o] = sum over kept (o, i) of W[o, i] x[n, i].
//
// Format (persona_kernels/formats/bitmap.py): packed kept values row-major, an int32 bitmap
// word per 32 inputs (LSB first) and row offsets. Each output row walks its words once; with
// AVX-512 a 16-bit half-word drives one VEXPANDPS that places the next popcount(mask) packed
// values into their columns, so decoding costs a few instructions per 16 weights and the
// values stream sequentially from memory. Rows are split over OpenMP threads in contiguous ranges
// (schedule(static)) and both streams are prefetched a few KB ahead: the value pointer advances by
// a data-dependent popcount, and without the prefetch the loads waited on memory (measured on
// Zen 4, 3072x576 at 70% from DRAM: 148 us with dynamic scheduling and no prefetch, 52 us with
// both, 45 GB/s; 4096x14336 at 30%: 8.4 -> 3.9 ms once every line of the step is prefetched). For batches > 1 every decoded vector is reused for all rows of x (up to NB at a
// time, kept in registers).
#include <algorithm>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using pk::to_float;

constexpr int NB = 8;  // rows of x per pass (accumulators live in registers)
constexpr int PREFETCH_BYTES = 4096;  // how far ahead of the values / bitmap stream to prefetch

// Scalar decode of one row for any value type: walk the set bits of each word.
template <typename scalar_t>
void row_scalar(const scalar_t* vals, const int32_t* words, int64_t nwords, const float* x, int64_t ldx, int nb,
                float* acc) {
  for (int64_t w = 0; w < nwords; ++w) {
    uint32_t bits = static_cast<uint32_t>(words[w]);
    while (bits) {
      const int j = __builtin_ctz(bits);
      bits &= bits - 1;
      const float v = to_float(*vals++);
      const int64_t col = w * 32 + j;
      for (int n = 0; n < nb; ++n) acc[n] += v * x[n * ldx + col];
    }
  }
}

#if defined(__AVX512F__)
// Decoding one 32-bit bitmap word into two 16-lane float vectors (columns 0-15 and 16-31),
// returning how many packed values it used. Loads run at most 16 values past the last one,
// which the format's zero padding (bitmap.py PAD) covers.
// fp32: two unaligned loads and two in-register VEXPANDPS. Measured on AMD Zen 4: register
// expand ~3.3 ns per word, the memory form of expand ~18 ns, a variable-mask load ~11 ns.
inline int decode_word(const float* vals, uint32_t bits, __m512* v0, __m512* v1) {
  const __mmask16 lo = static_cast<__mmask16>(bits & 0xFFFF), hi = static_cast<__mmask16>(bits >> 16);
  const int c0 = __builtin_popcount(lo);
  *v0 = _mm512_maskz_expand_ps(lo, _mm512_loadu_ps(vals));
  *v1 = _mm512_maskz_expand_ps(hi, _mm512_loadu_ps(vals + c0));
  return c0 + __builtin_popcount(hi);
}

// fp16 / bf16: widen the next 16 packed values to float32 in registers, then the same fp32
// expands. (One VPEXPANDW per word was measured slower on Zen 4: ~5 ns per word against ~3.5.)
template <typename half_t>
inline int decode_word(const half_t* vals, uint32_t bits, __m512* v0, __m512* v1) {
  const __mmask16 lo = static_cast<__mmask16>(bits & 0xFFFF), hi = static_cast<__mmask16>(bits >> 16);
  const int c0 = __builtin_popcount(lo);
  *v0 = _mm512_maskz_expand_ps(lo, pk::load16(vals));
  *v1 = _mm512_maskz_expand_ps(hi, pk::load16(vals + c0));
  return c0 + __builtin_popcount(hi);
}

// NBT rows of x are a compile-time count so the accumulators stay in registers. Each x row
// gets one accumulator per half-word and, for NBT <= 2, per word of an unrolled pair: with a
// single one the 4-cycle FMA latency chain (two FMAs per word) was the limit at high sparsity.
template <typename scalar_t, int NBT>
void row_avx512(const scalar_t* vals, const int32_t* words, int64_t nwords, const float* x, int64_t ldx,
                int64_t in_f, float* acc) {
  constexpr int U = NBT <= 2 ? 2 : 1;  // words per step
  __m512 sum[U][2][NBT];
  for (int u = 0; u < U; ++u)
    for (int n = 0; n < NBT; ++n) sum[u][0][n] = sum[u][1][n] = _mm512_setzero_ps();
  const int64_t full = in_f / 32;  // words whose 32 columns all exist in x
  int64_t w = 0;
  for (; w + U <= full; w += U) {
    // a step consumes up to 2 x 32 values (256 bytes at fp32): prefetch 4 lines, or dense rows
    // outrun the prefetch (4096x14336 at 30% sparsity: 8.4 ms with one line a step, 3.9 with 4)
    for (int line = 0; line < 4; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(vals) + PREFETCH_BYTES + 64 * line, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(words + w) + PREFETCH_BYTES / 8, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      __m512 v0, v1;
      vals += decode_word(vals, static_cast<uint32_t>(words[w + u]), &v0, &v1);
      for (int n = 0; n < NBT; ++n) {
        const float* xr = x + n * ldx + (w + u) * 32;
        sum[u][0][n] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xr), sum[u][0][n]);
        sum[u][1][n] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xr + 16), sum[u][1][n]);
      }
    }
  }
  for (int n = 0; n < NBT; ++n) {
    __m512 t = _mm512_add_ps(sum[0][0][n], sum[0][1][n]);
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, _mm512_add_ps(sum[u][0][n], sum[u][1][n]));
    acc[n] += _mm512_reduce_add_ps(t);
  }
  if (w < nwords) row_scalar<scalar_t>(vals, words + w, nwords - w, x + w * 32, ldx, NBT, acc);
}

#endif

template <typename scalar_t>
void bitmap_rows(const scalar_t* values, const int32_t* bitmap, const int64_t* row_ptr, const float* x, int64_t ldx,
                 int64_t batch, int64_t out_f, int64_t in_f, const float* bias, scalar_t* y) {
  const int64_t nwords = (in_f + 31) / 32;
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out_f; ++o) {
    for (int64_t n0 = 0; n0 < batch; n0 += NB) {
      const int nb = static_cast<int>(std::min<int64_t>(NB, batch - n0));
      float acc[NB] = {0};
      const scalar_t* vals = values + row_ptr[o];
      const int32_t* words = bitmap + o * nwords;
      const float* xb = x + n0 * ldx;
#if defined(__AVX512F__)
      pk::with_row_count(nb, [&](auto nbt) {
        row_avx512<scalar_t, decltype(nbt)::value>(vals, words, nwords, xb, ldx, in_f, acc);
      });
#else
      row_scalar<scalar_t>(vals, words, nwords, xb, ldx, nb, acc);
#endif
      const float b = bias ? bias[o] : 0.0f;
      for (int n = 0; n < nb; ++n) y[(n0 + n) * out_f + o] = static_cast<scalar_t>(acc[n] + b);
    }
  }
}

}  // namespace

// x [N, in] (any float dtype; converted to float32 once), values [nnz], bitmap int32 [out, W],
// row_ptr int64 [out + 1], bias float32 [out] or empty; y [N, out] in the values' dtype.
void bitmap_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& bitmap,
                   const torch::Tensor& row_ptr, const torch::Tensor& bias, torch::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu(), "bitmap_linear (cpp): tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && bitmap.dim() == 2 && y.dim() == 2, "bitmap_linear (cpp): x, bitmap, y must be 2-D");
  const int64_t batch = x.size(0), in_f = x.size(1), out_f = bitmap.size(0);
  TORCH_CHECK(bitmap.scalar_type() == torch::kInt32 && bitmap.is_contiguous() && bitmap.size(1) == (in_f + 31) / 32,
              "bitmap_linear (cpp): bitmap must be contiguous int32 [out, ceil(in/32)]");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kInt64 && row_ptr.numel() == out_f + 1 && row_ptr.is_contiguous(),
              "bitmap_linear (cpp): row_ptr must be int64 [out + 1]");
  TORCH_CHECK(values.is_contiguous() && values.dim() == 1, "bitmap_linear (cpp): values must be contiguous 1-D");
  TORCH_CHECK(y.size(0) == batch && y.size(1) == out_f && y.is_contiguous() && y.scalar_type() == values.scalar_type(),
              "bitmap_linear (cpp): y must be contiguous [N, out] in the values' dtype");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == out_f),
              "bitmap_linear (cpp): bias must be float32 [out] or empty");
  auto xf = x.to(torch::kFloat32).contiguous();
  const float* bptr = bias.numel() ? bias.data_ptr<float>() : nullptr;
  switch (values.scalar_type()) {
    case torch::kFloat32:
      bitmap_rows<float>(values.data_ptr<float>(), bitmap.data_ptr<int32_t>(), row_ptr.data_ptr<int64_t>(),
                         xf.data_ptr<float>(), in_f, batch, out_f, in_f, bptr, y.data_ptr<float>());
      break;
    case torch::kFloat16:
      bitmap_rows<at::Half>(values.data_ptr<at::Half>(), bitmap.data_ptr<int32_t>(), row_ptr.data_ptr<int64_t>(),
                            xf.data_ptr<float>(), in_f, batch, out_f, in_f, bptr, y.data_ptr<at::Half>());
      break;
    case torch::kBFloat16:
      bitmap_rows<at::BFloat16>(values.data_ptr<at::BFloat16>(), bitmap.data_ptr<int32_t>(),
                                row_ptr.data_ptr<int64_t>(), xf.data_ptr<float>(), in_f, batch, out_f, in_f, bptr,
                                y.data_ptr<at::BFloat16>());
      break;
    default:
      TORCH_CHECK(false, "bitmap_linear (cpp): unsupported dtype ", values.scalar_type());
  }
}

void register_bitmap_linear(pybind11::module_& m) {
  m.def("bitmap_linear", &bitmap_linear, "bitmap-compressed GEMV/GEMM (y = x W_masked^T + b)", pybind11::arg("x"),
        pybind11::arg("values"), pybind11::arg("bitmap"), pybind11::arg("row_ptr"), pybind11::arg("bias"),
        pybind11::arg("y"));
}
