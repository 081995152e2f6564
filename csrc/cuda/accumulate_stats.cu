// CUDA kernel of accumulate_stats, stage 1: chunk partials (no torch headers; see
// accumulate_stats.h for the interface and accumulate_stats_binding.cpp for the binding).
//
// Contract (persona_kernels/ops/accumulate_stats/partials.py): for every chunk k (rows
// start[k] .. start[k]+length[k]-1 of x viewed as [R, C]) and channel c, over the chunk's
// *valid* rows only, write sum, mean, M2, sumsq, sumabs, pos (count of x > 0), min, max and
// absmax; when edges are given, add one count per valid element to hist[persona[k], c, bin]
// (bin i holds edges[i] < x <= edges[i+1], outer bins open, compared in float32).
//
// Work decomposition
// ------------------
// Grid (K chunks, ceil(C / (128 * VEC)) channel blocks), 128 threads per block. Thread t of
// channel block b owns the VEC (1 or 2) adjacent channels c0 = (b * 128 + t) * VEC, so a warp
// reads 32 * VEC consecutive elements of a row (one 128 B line for bf16/fp16 pairs, two for
// float2) and the block streams the chunk's rows through registers.
//
// Validity is a per-row scalar shared by all channels. Each segment of up to 1024 rows of the
// chunk is first compacted by the block: the indices of its valid rows, and the Welford weight
// 1 / n of each (n = running count, correctly rounded, computed once per row), go to shared
// memory. The main loop then walks only the valid rows, in batches of 8 (4 for float2) whose
// loads are issued one batch ahead (two register buffers): padding is neither read nor
// branched on, and every thread keeps a batch of loads in flight while it computes.
//
// Numerics
// --------
// Mean and M2 are a Welford recurrence on the *shifted* values y = x - x_first, where x_first
// is the chunk's first valid value of the channel (delta = y - mean; mean += delta / n;
// m2 += delta * (y - mean)). The shift keeps the float32 running mean small, so data with
// |mean| >> std keeps its variance, and the chunk mean is written as x_first + mean_y in
// float64 when the mean output is float64 (plain float32 Welford loses ~1e-3 of the variance
// of 1000 + 0.01 * randn). `sum` is n * (x_first + mean_y), computed in float64: a NaN/Inf
// among the valid values makes the Welford mean, hence the sum, NaN/Inf. sumsq and sumabs
// are plain float32 sums. min/max, pos (x > 0) and the histogram comparisons are exact and
// immune to --use_fast_math's flush-to-zero: min/max and the positivity masks are inline PTX
// without .ftz (bf16x2/f16x2 packed for 16-bit pairs), and the histogram compares
// order-preserving integer keys of the float32 values.
//
// Histogram (template flag, absent from the kernels without one): a branchless binary search
// over the edges' keys (staged in shared memory when E <= 4096, else read from global
// memory) finds the bin; consecutive elements of a channel that fall into the same bin are
// counted in a register and flushed with one atomicAdd when the bin changes.
#include "accumulate_stats.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = PK_ACC_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kFlagsPerThread = 8;                  // validity flags read per thread per segment
constexpr int kSegRows = kThreads * kFlagsPerThread;  // rows compacted at a time
static_assert(kThreads % 32 == 0, "whole warps");

enum HistMode { kNoHist = 0, kHistSmem = 1, kHistGlobal = 2 };

// ---- element and vector types -----------------------------------------------------------
template <int DT> struct Elem { using type = uint16_t; };  // fp16 / bf16 bits
template <> struct Elem<PK_ACC_F32> { using type = float; };

template <int DT, int VEC> struct Raw;
template <> struct Raw<PK_ACC_F32, 1> { using type = float; };
template <> struct Raw<PK_ACC_F32, 2> { using type = float2; };
template <> struct Raw<PK_ACC_F16, 1> { using type = unsigned short; };
template <> struct Raw<PK_ACC_F16, 2> { using type = unsigned int; };
template <> struct Raw<PK_ACC_BF16, 1> { using type = unsigned short; };
template <> struct Raw<PK_ACC_BF16, 2> { using type = unsigned int; };

// streaming load (each element is read once): evict-first
template <int DT, int VEC>
__device__ __forceinline__ typename Raw<DT, VEC>::type load_raw(const char* p) {
  return __ldcs(reinterpret_cast<const typename Raw<DT, VEC>::type*>(p));
}

// 32 x 32 -> 64-bit product (one IMAD.WIDE.U32 with the add that follows)
__device__ __forceinline__ uint64_t wide_mul(uint32_t a, uint32_t b) {
  uint64_t d;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ float bf16_bits_to_float(uint32_t b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ float f16_bits_to_float(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0xffffu)));
}

template <int DT, int VEC>
__device__ __forceinline__ void unpack(const typename Raw<DT, VEC>::type r, float (&v)[VEC]) {
  if constexpr (DT == PK_ACC_F32) {
    if constexpr (VEC == 1) {
      v[0] = r;
    } else {
      v[0] = r.x;
      v[1] = r.y;
    }
  } else if constexpr (DT == PK_ACC_BF16) {
    if constexpr (VEC == 1) {
      v[0] = bf16_bits_to_float(r);
    } else {
      v[0] = bf16_bits_to_float(r);
      v[1] = __uint_as_float(r & 0xffff0000u);
    }
  } else {
    if constexpr (VEC == 1) {
      v[0] = f16_bits_to_float(r);
    } else {
      v[0] = f16_bits_to_float(r);
      v[1] = f16_bits_to_float(r >> 16);
    }
  }
}

// ---- min / max that never flush subnormals (inline PTX is not touched by -ftz) -----------
__device__ __forceinline__ float fmin_exact(float a, float b) {
  float d;
  asm("min.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float fmax_exact(float a, float b) {
  float d;
  asm("max.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// packed min / max of two fp16 or bf16 values (exact: no rounding involved)
template <int DT, bool MAX>
__device__ __forceinline__ uint32_t minmax_x2(uint32_t a, uint32_t b) {
  uint32_t d;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // no packed 16-bit min/max before sm_80: go through float (still exact)
  float fa[2], fb[2];
  unpack<DT, 2>(a, fa);
  unpack<DT, 2>(b, fb);
  uint32_t h[2];
  for (int e = 0; e < 2; ++e) {
    const float r = MAX ? fmax_exact(fa[e], fb[e]) : fmin_exact(fa[e], fb[e]);
    h[e] = DT == PK_ACC_BF16 ? (__float_as_uint(r) >> 16) : __half_as_ushort(__float2half_rn(r));
  }
  d = h[0] | (h[1] << 16);
#else
  if constexpr (DT == PK_ACC_BF16) {
    if constexpr (MAX) {
      asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    } else {
      asm("min.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    }
  } else {
    if constexpr (MAX) {
      asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    } else {
      asm("min.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    }
  }
#endif
  return d;
}

// 0xffffffff if x > 0 else 0 (NaN: 0); inline PTX, so -ftz does not drop positive subnormals
__device__ __forceinline__ uint32_t positive_mask(float x) {
  uint32_t d;
  asm("set.gt.u32.f32 %0, %1, 0f00000000;" : "=r"(d) : "f"(x));
  return d;
}

// per 16-bit half of a packed fp16/bf16 pair: 0xffff if that value is > 0 else 0 (NaN: 0)
template <int DT>
__device__ __forceinline__ uint32_t positive_mask_x2(uint32_t w) {
  uint32_t d;
  if constexpr (DT == PK_ACC_F16) {
    asm("set.gt.u32.f16x2 %0, %1, %2;" : "=r"(d) : "r"(w), "r"(0u));
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    // set.bf16x2 needs sm_90; compare the unpacked values instead
    float v[2];
    unpack<DT, 2>(w, v);
    d = (positive_mask(v[0]) & 0xffffu) | (positive_mask(v[1]) & 0xffff0000u);
#else
    asm("set.gt.u32.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(w), "r"(0u));
#endif
  }
  return d;
}

// Two 16-bit counts kept in one register: acc -= mask_x2 per row adds 1 to the low half for
// a positive low value and, with the borrow, (hi - lo) to the high half. decode_counts_x2
// recovers both counts exactly while each stays below 2^16 (it is flushed every segment).
__device__ __forceinline__ void decode_counts_x2(uint32_t acc, int& lo, int& hi) {
  lo = static_cast<int>(acc & 0xffffu);
  hi = static_cast<int>(((acc >> 16) + acc) & 0xffffu);
}

// a pointer the compiler cannot split back into base + offsets (so that each row address is
// one IMAD.WIDE.U32 from it)
__device__ __forceinline__ const char* opaque(const char* p) {
  asm("mov.b64 %0, %0;" : "+l"(p));
  return p;
}

// +inf / -inf in both halves of a packed pair
template <int DT> __device__ __forceinline__ uint32_t pos_inf_x2() { return DT == PK_ACC_BF16 ? 0x7f807f80u : 0x7c007c00u; }
template <int DT> __device__ __forceinline__ uint32_t neg_inf_x2() { return DT == PK_ACC_BF16 ? 0xff80ff80u : 0xfc00fc00u; }

// Order-preserving integer key of a float: a < b (as floats, not NaN) <=> key(a) < key(b),
// with key(-0) == key(+0) == 0. Integer compares are immune to flush-to-zero.
__device__ __forceinline__ int float_key(float f) {
  const int b = __float_as_int(f);
  return b >= 0 ? b : -(b & 0x7fffffff);
}

template <int HIST>
__device__ __forceinline__ int edge_key(const int* s_keys, const float* edges, int i) {
  if constexpr (HIST == kHistSmem) {
    return s_keys[i];
  } else {
    return float_key(__ldg(edges + i));
  }
}

// number of edges strictly below the value of key `key` (branchless lower bound; the trip
// count depends only on E, so the warp never diverges here)
template <int HIST>
__device__ __forceinline__ int count_below(const int* s_keys, const float* edges, int num_edges, int key) {
  int lo = 0;
  int m = num_edges;
  while (m > 1) {
    const int half = m >> 1;
    lo = edge_key<HIST>(s_keys, edges, lo + half) < key ? lo + half : lo;
    m -= half;
  }
  return lo + (edge_key<HIST>(s_keys, edges, lo) < key ? 1 : 0);
}

// ---- the kernel ---------------------------------------------------------------------------
// 8 blocks of 128 threads per SM (<= 64 registers) without a histogram; the histogram kernels,
// bound by the search and the atomics, get up to 80 registers (6 blocks).
template <int DT, int VEC, int HIST>
__global__ void __launch_bounds__(kThreads, HIST == kNoHist ? PK_ACC_MIN_BLOCKS_PER_SM : 6)
accumulate_stats_kernel(const PkAccumulateStatsArgs a) {
  using R = typename Raw<DT, VEC>::type;
  constexpr bool kPacked = DT != PK_ACC_F32 && VEC == 2;  // min/max on packed 16-bit pairs
  constexpr bool kHist = HIST != kNoHist;
  constexpr int kElemBytes = DT == PK_ACC_F32 ? 4 : 2;
  // rows per batch: 8 (4 for float2, whose two buffers would not fit in 64 registers)
  constexpr int kUnroll = VEC * kElemBytes > 4 ? 4 : 8;
  static_assert(kUnroll % 4 == 0, "batches read the shared row list as int4");

  __shared__ __align__(16) int s_row[kSegRows];     // valid rows of the segment (segment-relative)
  __shared__ __align__(16) float s_inv[kSegRows];   // 1 / (running count) at each of them
  __shared__ int s_warp[kWarps];
  extern __shared__ int s_keys[];                   // [E] edge keys (kHistSmem only)

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t k = blockIdx.x;
  const int C = static_cast<int>(a.num_channels);                  // < 2^31 (launcher)
  const int c0 = (static_cast<int>(blockIdx.y) * kThreads + tid) * VEC;  // < 2^31 (launcher)
  const bool active = c0 < C;                                      // C % VEC == 0 (launcher)
  const int64_t start = a.chunk_start[k];
  const int64_t len = a.chunk_length[k];
  const uint32_t row_bytes = static_cast<uint32_t>(C) * kElemBytes;  // < 2^32 (launcher)
  const int num_edges = kHist ? static_cast<int>(a.num_edges) : 0;

  if constexpr (HIST == kHistSmem) {
    // read before the first use: the segment loop syncs between compaction and processing
    for (int i = tid; i < num_edges; i += kThreads) s_keys[i] = float_key(a.edges[i]);
  }

  // histogram state: this thread's [E-1] bin rows, and the pending run of one bin per channel
  int32_t* hrow[VEC];
  int cur_bin[VEC];
  int run[VEC];
  if constexpr (kHist) {
    const int64_t persona = a.chunk_persona[k];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      hrow[e] = a.hist + (persona * C + c0 + e) * static_cast<int64_t>(num_edges - 1);
      cur_bin[e] = 0;
      run[e] = 0;
    }
  }

  // accumulators
  float shift[VEC], mean[VEC], m2[VEC], sumsq[VEC], sumabs[VEC], mn[VEC], mx[VEC];
  int pos[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    shift[e] = 0.f;
    mean[e] = 0.f;
    m2[e] = 0.f;
    sumsq[e] = 0.f;
    sumabs[e] = 0.f;
    mn[e] = __int_as_float(0x7f800000);
    mx[e] = __int_as_float(static_cast<int>(0xff800000u));
    pos[e] = 0;
  }
  uint32_t pmn = pos_inf_x2<DT>(), pmx = neg_inf_x2<DT>();
  uint32_t pos_x2 = 0;  // packed pair counts of x > 0 (kPacked), see decode_counts_x2
  int n = 0;  // valid rows folded so far (the same in every thread)

  auto update = [&](const R raw, const float inv) {
    float v[VEC];
    unpack<DT, VEC>(raw, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = v[e];
      const float y = x - shift[e];
      const float d = y - mean[e];
      mean[e] = fmaf(d, inv, mean[e]);
      m2[e] = fmaf(d, y - mean[e], m2[e]);
      sumsq[e] = fmaf(x, x, sumsq[e]);
      sumabs[e] += fabsf(x);
      if constexpr (!kPacked) {
        pos[e] -= static_cast<int>(positive_mask(x));  // -(-1)
        mn[e] = fmin_exact(mn[e], x);
        mx[e] = fmax_exact(mx[e], x);
      }
      if constexpr (kHist) {
        int b = count_below<HIST>(s_keys, a.edges, num_edges, float_key(x)) - 1;
        b = min(max(b, 0), num_edges - 2);
        if (b == cur_bin[e]) {
          ++run[e];
        } else {
          if (run[e] > 0) atomicAdd(hrow[e] + cur_bin[e], run[e]);
          cur_bin[e] = b;
          run[e] = 1;
        }
      }
    }
    if constexpr (kPacked) {
      pos_x2 -= positive_mask_x2<DT>(raw);
      pmn = minmax_x2<DT, false>(pmn, raw);
      pmx = minmax_x2<DT, true>(pmx, raw);
    }
  };

  // address of this thread's channels in row r (segment-relative) of a segment
  auto row_ptr = [&](const char* xseg, int r) { return xseg + wide_mul(static_cast<uint32_t>(r), row_bytes); };
  auto load_batch = [&](const char* xseg, int j, R (&buf)[kUnroll]) {
#pragma unroll
    for (int q = 0; q < kUnroll; q += 4) {
      const int4 r4 = *reinterpret_cast<const int4*>(s_row + j + q);  // j % 4 == 0: aligned
      buf[q + 0] = load_raw<DT, VEC>(row_ptr(xseg, r4.x));
      buf[q + 1] = load_raw<DT, VEC>(row_ptr(xseg, r4.y));
      buf[q + 2] = load_raw<DT, VEC>(row_ptr(xseg, r4.z));
      buf[q + 3] = load_raw<DT, VEC>(row_ptr(xseg, r4.w));
    }
  };
  auto fold_batch = [&](int j, const R (&buf)[kUnroll]) {
#pragma unroll
    for (int q = 0; q < kUnroll; q += 4) {
      const float4 i4 = *reinterpret_cast<const float4*>(s_inv + j + q);
      update(buf[q + 0], i4.x);
      update(buf[q + 1], i4.y);
      update(buf[q + 2], i4.z);
      update(buf[q + 3], i4.w);
    }
  };

  // this thread's channels in the chunk's first row
  const char* xchunk = static_cast<const char*>(a.x) + (start * C + c0) * kElemBytes;

  for (int64_t seg = 0; seg < len; seg += kSegRows) {
    // ---- compact the segment's valid rows into s_row / s_inv ----
    const int seg_len = static_cast<int>(len - seg < kSegRows ? len - seg : kSegRows);
    const uint8_t* vflags = a.valid + start + seg;
    const int r0 = tid * kFlagsPerThread;
    uint32_t flags = 0;
#pragma unroll
    for (int j = 0; j < kFlagsPerThread; ++j)
      if (r0 + j < seg_len && vflags[r0 + j] != 0) flags |= 1u << j;
    const int cnt = __popc(flags);
    int incl = cnt;  // inclusive scan of cnt over the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    int slot = incl - cnt, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int t = s_warp[w];
      slot += w < warp ? t : 0;
      total += t;
    }
#pragma unroll
    for (int j = 0; j < kFlagsPerThread; ++j) {
      if (flags & (1u << j)) {
        s_row[slot] = r0 + j;
        s_inv[slot] = __frcp_rn(static_cast<float>(n + slot + 1));  // exact 1/n, whatever -ftz/-prec-div
        ++slot;
      }
    }
    __syncthreads();

    // ---- fold the valid rows ----
    if (active && total > 0) {
      const char* xseg = opaque(xchunk + static_cast<int64_t>(seg) * row_bytes);
      if (n == 0) {  // the chunk's first valid row: the shift
        float v[VEC];
        unpack<DT, VEC>(load_raw<DT, VEC>(row_ptr(xseg, s_row[0])), v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) shift[e] = v[e];
      }
      // kUnroll rows per batch; the next batch's loads are issued before the current batch is
      // folded (two register buffers, used alternately), so every thread keeps loads in flight.
      int j = 0;
      if (total >= kUnroll) {
        R buf_a[kUnroll], buf_b[kUnroll];
        load_batch(xseg, j, buf_a);
        for (;;) {
          const bool more_a = j + 2 * kUnroll <= total;
          if (more_a) load_batch(xseg, j + kUnroll, buf_b);
          fold_batch(j, buf_a);
          j += kUnroll;
          if (!more_a) break;
          const bool more_b = j + 2 * kUnroll <= total;
          if (more_b) load_batch(xseg, j + kUnroll, buf_a);
          fold_batch(j, buf_b);
          j += kUnroll;
          if (!more_b) break;
        }
      }
      for (; j < total; ++j) update(load_raw<DT, VEC>(row_ptr(xseg, s_row[j])), s_inv[j]);
    }
    if constexpr (kPacked) {  // keep both 16-bit counts below 2^16
      int lo, hi;
      decode_counts_x2(pos_x2, lo, hi);
      pos[0] += lo;
      pos[1] += hi;
      pos_x2 = 0;
    }
    n += total;
    __syncthreads();  // the next segment rewrites s_row / s_inv / s_warp
  }

  if (!active) return;
  if constexpr (kHist) {
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (run[e] > 0) atomicAdd(hrow[e] + cur_bin[e], run[e]);
  }
  if constexpr (kPacked) {
    float lo[2], hi[2];
    unpack<DT, 2>(pmn, lo);
    unpack<DT, 2>(pmx, hi);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      mn[e] = lo[e];
      mx[e] = hi[e];
    }
  }
  const int64_t o = k * C + c0;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const double m = n > 0 ? static_cast<double>(shift[e]) + static_cast<double>(mean[e]) : 0.0;
    a.sum[o + e] = static_cast<float>(static_cast<double>(n) * m);
    if (a.mean_is_f64) {
      static_cast<double*>(a.mean)[o + e] = m;
    } else {
      static_cast<float*>(a.mean)[o + e] = static_cast<float>(m);
    }
    a.m2[o + e] = m2[e];
    a.sumsq[o + e] = sumsq[e];
    a.sumabs[o + e] = sumabs[e];
    a.pos[o + e] = pos[e];
    a.min[o + e] = mn[e];
    a.max[o + e] = mx[e];
    // max |x| = max(max, -min) when there is a value; 0 when there is none (max(-inf, +0))
    a.absmax[o + e] = fmax_exact(fmax_exact(mx[e], __int_as_float(__float_as_int(mn[e]) ^ 0x80000000)), 0.f);
  }
}

// ---- host-side dispatch -------------------------------------------------------------------
template <int DT, int VEC, int HIST>
void launch(const PkAccumulateStatsArgs& a, dim3 grid, size_t smem, cudaStream_t stream) {
  accumulate_stats_kernel<DT, VEC, HIST><<<grid, kThreads, smem, stream>>>(a);
}

template <int DT, int VEC>
void launch_hist(const PkAccumulateStatsArgs& a, int hist, dim3 grid, size_t smem, cudaStream_t stream) {
  switch (hist) {
    case kNoHist: launch<DT, VEC, kNoHist>(a, grid, smem, stream); break;
    case kHistSmem: launch<DT, VEC, kHistSmem>(a, grid, smem, stream); break;
    default: launch<DT, VEC, kHistGlobal>(a, grid, smem, stream); break;
  }
}

template <int DT>
void launch_vec(const PkAccumulateStatsArgs& a, int hist, dim3 grid, size_t smem, cudaStream_t stream) {
  if (a.vec == 2) {
    launch_hist<DT, 2>(a, hist, grid, smem, stream);
  } else {
    launch_hist<DT, 1>(a, hist, grid, smem, stream);
  }
}

}  // namespace

extern "C" cudaError_t pk_accumulate_stats_cuda(const PkAccumulateStatsArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const PkAccumulateStatsArgs& a = *args;
  if (a.num_chunks < 0 || a.num_channels < 0 || a.num_rows < 0) return cudaErrorInvalidValue;
  if (a.num_chunks == 0 || a.num_channels == 0) return cudaSuccess;
  if (a.dtype != PK_ACC_F32 && a.dtype != PK_ACC_F16 && a.dtype != PK_ACC_BF16) return cudaErrorInvalidValue;
  if (a.vec != 1 && a.vec != 2) return cudaErrorInvalidValue;
  const int64_t elem_bytes = a.dtype == PK_ACC_F32 ? 4 : 2;
  if (a.num_channels % a.vec != 0) return cudaErrorInvalidValue;
  if (a.vec == 2 && reinterpret_cast<uintptr_t>(a.x) % static_cast<uintptr_t>(2 * elem_bytes) != 0)
    return cudaErrorInvalidValue;
  if (a.num_channels * elem_bytes > static_cast<int64_t>(UINT32_MAX)) return cudaErrorInvalidValue;
  const int64_t per_block = static_cast<int64_t>(kThreads) * a.vec;
  const int64_t channel_blocks = (a.num_channels + per_block - 1) / per_block;
  if (channel_blocks > 65535 || a.num_chunks > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (a.x == nullptr || a.valid == nullptr || a.chunk_start == nullptr || a.chunk_length == nullptr ||
      a.sum == nullptr || a.mean == nullptr || a.m2 == nullptr || a.sumsq == nullptr || a.sumabs == nullptr ||
      a.pos == nullptr || a.min == nullptr || a.max == nullptr || a.absmax == nullptr)
    return cudaErrorInvalidValue;

  int hist = kNoHist;
  size_t smem = 0;
  if (a.edges != nullptr) {
    if (a.num_edges < 2 || a.num_edges > 0x7fffffffLL || a.hist == nullptr || a.chunk_persona == nullptr)
      return cudaErrorInvalidValue;
    if (a.num_edges <= PK_ACC_MAX_SMEM_EDGES) {
      hist = kHistSmem;
      smem = static_cast<size_t>(a.num_edges) * sizeof(int);
    } else {
      hist = kHistGlobal;
    }
  }

  const dim3 grid(static_cast<unsigned>(a.num_chunks), static_cast<unsigned>(channel_blocks));
  switch (a.dtype) {
    case PK_ACC_F32: launch_vec<PK_ACC_F32>(a, hist, grid, smem, stream); break;
    case PK_ACC_F16: launch_vec<PK_ACC_F16>(a, hist, grid, smem, stream); break;
    default: launch_vec<PK_ACC_BF16>(a, hist, grid, smem, stream); break;
  }
  return cudaGetLastError();
}
