// CUDA kernel of masked_linear on the BitmapWeight format (no torch headers; see
// bitmap_linear.h for the interface and bitmap_linear_binding.cpp for the binding).
//
// Contract: y[n, o] = sum over the kept (o, i) of W[o, i] * x[n, i] (+ bias[o]), float32
// accumulation, y in the input dtype. The weight is values [nnz] (kept weights, row-major
// packed), bitmap int32 [out, W] (W = ceil(in / 32), bit j of word w of row o is column
// 32 w + j, LSB first, bits past `in` zero) and row_ptr int64 [out + 1]. Built for decode
// (N = 1..16 rows of x); any N >= 1 is handled, by passes over the weight.
//
// Work decomposition
// ------------------
// A warp owns an output row (or, for rows of fewer than 32 bitmap words, 32 / S rows of S
// lanes each) and walks it in "items" of 32 bitmap words, one word per lane (1024 columns).
// Per item:
//   * each lane counts its word (popc); a warp inclusive scan (shfl_up) gives each lane the
//     offset of its word's values in the item's run of values, which is contiguous in
//     `values` (rows are packed back to back, so the runs of consecutive rows are too);
//   * the warp copies that run into a per-warp shared-memory buffer with 16-byte cp.async
//     (aligned down to 16 bytes, so any element alignment of `values` works; the last chunk
//     reads only the run's bytes), coalesced;
//   * each lane then walks its own word's set bits from the highest down (bfind, clear),
//     reading its values from the buffer two at a time (one aligned 4-byte / 8-byte load per
//     pair of values; the single values at either end of the run that share a pair with the
//     neighbouring lane's run are done first, branch-free), and multiplies each with
//     x[n, column] for the NB rows of x of the pass;
//   * at the end of a row, a segmented xor-shuffle reduction; the row's lanes write y (+ bias,
//     added in float32, one rounding).
// Items are double-buffered per warp: while item i is computed, the copy of item i+1's values
// and the load of item i+2's bitmap words are in flight (cp.async groups: the copy holds no
// registers). The per-warp buffers (2 x (1024 values + 16 bytes)) are sized for a fully dense
// item, so any mask works.
//
// x is staged once per block in shared memory (float32 for one row of 16-bit x when that
// stays <= 32 KiB, else in the input dtype): column c of the pass's NB rows at byte offset
//   (c / 32) * (32 * V + P) + (c % 32) * V,  V = NB * element bytes, P = max(4, min(V, 16)),
// i.e. one pad slot per 32 columns, so lanes (one per bitmap word) reading their k-th set bit
// spread over the banks instead of piling onto the same bit position. For a very large `in`
// (x would not fit) the kernel reads x from global memory instead (NB = 1, slow path).
//
// The grid is persistent (as many blocks as are resident, at most one warp per row step);
// warp g of block b takes the row steps (b + g * gridDim.x) + k * (total warps), so rows left
// over for a last round are spread over all the SMs. gridDim.y covers the passes of NB rows of
// x (grid-stride beyond 65535). The launcher picks NB (the next power of two >= N, at most 8,
// or 4 for float32, fewer if x would not leave 16 warps resident per SM), the x stage type and
// the block size (512 / 256 / 128 threads: most resident warps with work, then fewest per SM)
// with the occupancy API.
#include "bitmap_linear.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxThreads = 512;
constexpr int kMinBlocks = 2;          // 512 x 2 threads: <= 64 registers per thread
constexpr int kItemWords = 32;         // bitmap words per warp item (one per lane)
constexpr int kItemValues = kItemWords * 32;

enum XMode { kXSmemF32 = 0, kXSmemNative = 1, kXGlobal = 2 };

// Host-computed geometry of one launch.
struct Plan {
  int64_t steps;          // row steps: ceil(out / rows_per_step)
  int64_t groups;         // passes: ceil(N / NB)
  int32_t lanes_log2;     // log2 of S, the lanes per output row
  int32_t items_per_row;  // G: items of 32 words per row (1 when S < 32)
  int32_t x_bytes;        // bytes of the x stage (multiple of 16; 0 in global mode)
  int32_t buf_bytes;      // bytes of one value buffer (multiple of 16)
};

template <int DT> struct Elt { static constexpr int bytes = DT == PK_BML_F32 ? 4 : 2; };

// Geometry of the x stage.
template <int DT, int NB, int XM> struct XGeom {
  static constexpr int es = (XM == kXSmemNative && DT != PK_BML_F32) ? 2 : 4;  // bytes per element
  static constexpr int V = NB * es;                                           // bytes per column
  static constexpr int P = V < 4 ? 4 : (V > 16 ? 16 : V);                     // pad per 32 columns
  static constexpr int word_bytes = 32 * V + P;                               // per bitmap word
};

// ---- conversions ----------------------------------------------------------------------------
template <int DT> __device__ __forceinline__ float lo16(uint32_t u) {
  if constexpr (DT == PK_BML_BF16) {
    return __uint_as_float(u << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  }
}
template <int DT> __device__ __forceinline__ float hi16(uint32_t u) {
  if constexpr (DT == PK_BML_BF16) {
    return __uint_as_float(u & 0xffff0000u);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
  }
}

template <int DT> __device__ __forceinline__ float load_global_elem(const void* p, int64_t i) {
  if constexpr (DT == PK_BML_F32) {
    return __ldg(static_cast<const float*>(p) + i);
  } else {
    return lo16<DT>(__ldg(static_cast<const unsigned short*>(p) + i));
  }
}

template <int DT> __device__ __forceinline__ void store_out(void* y, int64_t i, float v) {
  if constexpr (DT == PK_BML_F32) {
    static_cast<float*>(y)[i] = v;
  } else if constexpr (DT == PK_BML_BF16) {
    static_cast<unsigned short*>(y)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    static_cast<unsigned short*>(y)[i] = __half_as_ushort(__float2half_rn(v));
  }
}

// ---- cp.async (plain copy before sm_80) ------------------------------------------------------
// Copies the 16-byte chunk at gmem_src (16-byte aligned) to smem_dst; only its first
// src_bytes (1..16) are read, the rest of the destination is zero-filled.
__device__ __forceinline__ void copy16_async(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem_src), "r"(src_bytes) : "memory");
#else
  (void)src_bytes;  // whole chunk (the tail bytes are never used)
  *static_cast<uint4*>(smem_dst) = __ldg(static_cast<const uint4*>(gmem_src));
#endif
}
__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int PENDING> __device__ __forceinline__ void copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// Position of the highest set bit of w, -1 if w == 0 (one FLO).
__device__ __forceinline__ int bfind32(uint32_t w) {
#ifdef __CUDA_ARCH__
  int b;
  asm("bfind.u32 %0, %1;" : "=r"(b) : "r"(w));
  return b;
#else
  return w != 0u ? 31 - __builtin_clz(w) : -1;
#endif
}

// Position of the highest set bit of w (w != 0), which is then cleared.
__device__ __forceinline__ int pop_top(uint32_t& w) {
  const int b = bfind32(w);
  w ^= 1u << b;
  return b;
}

// ---- values from the shared buffer (element positions; pairs start at even positions) ------
template <int DT> __device__ __forceinline__ float load_value(const unsigned char* buf, int pos) {
  if constexpr (DT == PK_BML_F32) {
    return *reinterpret_cast<const float*>(buf + 4 * pos);
  } else {
    return lo16<DT>(*reinterpret_cast<const unsigned short*>(buf + 2 * pos));
  }
}
template <int DT> __device__ __forceinline__ void load_value_pair(const unsigned char* buf, int pos, float& lo, float& hi) {
  if constexpr (DT == PK_BML_F32) {
    const float2 v = *reinterpret_cast<const float2*>(buf + 4 * pos);
    lo = v.x;
    hi = v.y;
  } else {
    const uint32_t u = *reinterpret_cast<const uint32_t*>(buf + 2 * pos);
    lo = lo16<DT>(u);
    hi = hi16<DT>(u);
  }
}

// ---- x columns from the stage ----------------------------------------------------------------
template <int DT, int NB, int XM> __device__ __forceinline__ void load_x(const unsigned char* p, float (&xv)[NB]) {
  using G = XGeom<DT, NB, XM>;
  if constexpr (G::es == 4) {
    if constexpr (NB == 1) {
      xv[0] = *reinterpret_cast<const float*>(p);
    } else if constexpr (NB == 2) {
      const float2 v = *reinterpret_cast<const float2*>(p);
      xv[0] = v.x;
      xv[1] = v.y;
    } else {
#pragma unroll
      for (int k = 0; k < NB; k += 4) {
        const float4 v = *reinterpret_cast<const float4*>(p + 4 * k);
        xv[k] = v.x;
        xv[k + 1] = v.y;
        xv[k + 2] = v.z;
        xv[k + 3] = v.w;
      }
    }
  } else {
    if constexpr (NB == 1) {
      xv[0] = lo16<DT>(*reinterpret_cast<const unsigned short*>(p));
    } else if constexpr (NB == 2) {
      const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
      xv[0] = lo16<DT>(u);
      xv[1] = hi16<DT>(u);
    } else if constexpr (NB == 4) {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      xv[0] = lo16<DT>(u.x);
      xv[1] = hi16<DT>(u.x);
      xv[2] = lo16<DT>(u.y);
      xv[3] = hi16<DT>(u.y);
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      xv[0] = lo16<DT>(u.x);
      xv[1] = hi16<DT>(u.x);
      xv[2] = lo16<DT>(u.y);
      xv[3] = hi16<DT>(u.y);
      xv[4] = lo16<DT>(u.z);
      xv[5] = hi16<DT>(u.z);
      xv[6] = lo16<DT>(u.w);
      xv[7] = hi16<DT>(u.w);
    }
  }
}

// Stage x[n0 : n0 + NB, :] (rows past N and columns past `in` as zeros) for all W * 32 columns.
// Consecutive threads take consecutive columns (coalesced loads, conflict-free stores); each
// thread has 8 (NB = 8: 4) columns of one row in flight before it stores them.
template <int DT, int NB, int XM>
__device__ __forceinline__ void stage_x(unsigned char* xs, const void* x, int64_t in, int words, int64_t n0,
                                        int nvalid) {
  using G = XGeom<DT, NB, XM>;
  using Raw = typename std::conditional<DT == PK_BML_F32, uint32_t, unsigned short>::type;
  constexpr int kU = NB >= 8 ? 4 : 8;  // columns per thread per round (registers: NB = 8 is tight)
  const int ncols = words * 32;  // < 2^31 (the stage fits in shared memory)
  const int step = blockDim.x;
#pragma unroll 1
  for (int n = 0; n < NB; ++n) {
    const bool row_ok = n < nvalid;
    const Raw* xr = static_cast<const Raw*>(x) + (row_ok ? (n0 + n) * in : 0);
#pragma unroll 1
    for (int base = threadIdx.x; base < ncols; base += kU * step) {
      uint32_t v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int c = base + u * step;
        v[u] = (row_ok && c < in) ? static_cast<uint32_t>(__ldg(xr + c)) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int c = base + u * step;
        if (c >= ncols) break;
        unsigned char* d = xs + (c >> 5) * G::word_bytes + (c & 31) * G::V;
        if constexpr (DT == PK_BML_F32) {  // float32 input: staged as is
          reinterpret_cast<uint32_t*>(d)[n] = v[u];
        } else if constexpr (G::es == 4) {  // 16-bit input staged as float32
          reinterpret_cast<float*>(d)[n] = lo16<DT>(v[u]);
        } else {
          reinterpret_cast<unsigned short*>(d)[n] = static_cast<unsigned short>(v[u]);
        }
      }
    }
  }
}

// One item of a warp, as the compute step needs it once its values are in the buffer; packed
// into four registers (two items are live at a time).
struct Item {
  int32_t row;    // this lane's output row (>= out: the lane has no bits)
  uint32_t w;     // this lane's bitmap word
  uint32_t se;    // element positions of this lane's values in the buffer, [s, e): s | e << 16
  uint32_t wif;   // word index within the row << 2 | buffer << 1 | last item of the row
};

// ---- the kernel --------------------------------------------------------------------------------
template <int DT, int NB, int XM>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
bitmap_linear_kernel(const PkBitmapLinearArgs a, const Plan p) {
  extern __shared__ __align__(16) unsigned char smem[];
  using XG = XGeom<DT, NB, XM>;
  constexpr int kElt = Elt<DT>::bytes;
  static_assert(XM != kXGlobal || NB == 1, "the global-x path handles one row of x per pass");

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int S = 1 << p.lanes_log2;
  const int seg = lane >> p.lanes_log2;  // which row of the step
  const int sl = lane & (S - 1);         // lane within the row
  const int out = static_cast<int>(a.out_features);  // <= 2^29 (launcher)
  const int W = static_cast<int>(a.words_per_row);   // < 2^26
  // Rows of the steps of this warp: first_row, first_row + row_stride, ... (< out).
  const int rows_per_step = 32 >> p.lanes_log2;
  const int first_row = (warp * static_cast<int>(gridDim.x) + static_cast<int>(blockIdx.x)) * rows_per_step;
  const int row_stride = (static_cast<int>(blockDim.x) >> 5) * static_cast<int>(gridDim.x) * rows_per_step;

  unsigned char* const xs = smem;
  unsigned char* const bufs = smem + p.x_bytes + warp * 2 * p.buf_bytes;

  float acc[NB];
#pragma unroll
  for (int n = 0; n < NB; ++n) acc[n] = 0.f;

  for (int64_t grp = blockIdx.y; grp < p.groups; grp += gridDim.y) {
    const int64_t n0 = grp * NB;
    const int nvalid = static_cast<int>(a.num_rows - n0 < NB ? a.num_rows - n0 : NB);

    // The cursor: the item to start next (rows from row0 = the step's first row).
    int row0 = first_row;
    int wi = sl;             // this lane's word index within the row
    uintptr_t vaddr = 0;     // address of the item's first value
    auto row_values = [&]() {
      vaddr = reinterpret_cast<uintptr_t>(a.values) + static_cast<uintptr_t>(__ldg(a.row_ptr + row0)) * kElt;
    };
    auto fetch_word = [&]() -> uint32_t {
      const int row = row0 + seg;
      return (row < out && wi < W) ? static_cast<uint32_t>(__ldg(a.bitmap + static_cast<int64_t>(row) * W + wi)) : 0u;
    };

    // Scan the cursor item's words and start the copy of its values into buffer `stage`.
    auto start_item = [&](Item& it, int& total, uint32_t w, int stage) {
      const int c = __popc(w);
      int incl = c;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int t = __shfl_up_sync(kFull, incl, d);
        if (lane >= d) incl += t;
      }
      total = __shfl_sync(kFull, incl, 31);
      const int delta = static_cast<int>(vaddr & 15u);
      const unsigned char* src = reinterpret_cast<const unsigned char*>(vaddr - delta);
      unsigned char* dst = bufs + stage * p.buf_bytes;
      const int end = delta + total * kElt;  // bytes of the run from src
      const int chunks = total > 0 ? (end + 15) >> 4 : 0;
      for (int i = lane; i < chunks; i += 32) {
        const int left = end - 16 * i;
        copy16_async(dst + 16 * i, src + 16 * i, left < 16 ? left : 16);
      }
      copy_commit();
      const int e = delta / kElt + incl;
      const bool last = wi - sl + S >= W;  // no item of this row after this one
      it.row = row0 + seg;
      it.w = w;
      it.se = static_cast<uint32_t>(e - c) | static_cast<uint32_t>(e) << 16;
      it.wif = static_cast<uint32_t>(wi) << 2 | static_cast<uint32_t>(stage) << 1 | (last ? 1u : 0u);
    };

    // Compute one item whose values are in its buffer.
    auto compute = [&](const Item& it) {
      const int wi_it = static_cast<int>(it.wif >> 2);
      const unsigned char* buf = bufs + ((it.wif >> 1) & 1u) * p.buf_bytes;
      uint32_t w = it.w;
      int s = static_cast<int>(it.se & 0xffffu);
      int e = static_cast<int>(it.se >> 16);
      // this word's 32 columns in the stage (smem modes). Lanes past the row's last word have no
      // bits, but the branch-free singles below still read x: point them at word 0.
      const unsigned char* xl = XM == kXGlobal ? xs : xs + (wi_it < W ? wi_it : 0) * XG::word_bytes;
      auto fma_col = [&](int b, float v) {
        float xv[NB];
        if constexpr (XM == kXGlobal) {
          xv[0] = load_global_elem<DT>(a.x, n0 * a.in_features + static_cast<int64_t>(wi_it) * 32 + b);
        } else {
          load_x<DT, NB, XM>(xl + b * XG::V, xv);
        }
#pragma unroll
        for (int n = 0; n < NB; ++n) acc[n] = fmaf(v, xv[n], acc[n]);
      };
      // Single values at the ends of the run that share a 4-byte (8-byte) pair with the next
      // or previous lane's run; then the run is pair-aligned at both ends. Branch-free: both
      // are computed with in-range indices and kept or dropped by selects.
      {
        const int bt = bfind32(w) & 31;  // top single: the value at e - 1 (e odd), the highest bit
        const bool top = (e & 1) && w != 0u;
        w = top ? w ^ (1u << bt) : w;
        e -= top ? 1 : 0;
        const uint32_t low = w & (0u - w);
        const int bb = bfind32(low) & 31;  // bottom single: the value at s (s odd), the lowest remaining bit
        const bool bot = (s & 1) && w != 0u;
        w = bot ? w ^ low : w;
        // positions e and s are inside the buffer even when unused (0 <= s <= e <= 1031)
        const float vt = load_value<DT>(buf, e);
        const float vb = load_value<DT>(buf, s);
        s += bot ? 1 : 0;
        float xt[NB], xb[NB];
        if constexpr (XM == kXGlobal) {
          const int64_t x0 = n0 * a.in_features + static_cast<int64_t>(wi_it) * 32;
          xt[0] = top ? load_global_elem<DT>(a.x, x0 + bt) : 0.f;
          xb[0] = bot ? load_global_elem<DT>(a.x, x0 + bb) : 0.f;
        } else {
          load_x<DT, NB, XM>(xl + bt * XG::V, xt);
          load_x<DT, NB, XM>(xl + bb * XG::V, xb);
        }
#pragma unroll
        for (int n = 0; n < NB; ++n) {
          acc[n] = top ? fmaf(vt, xt[n], acc[n]) : acc[n];
          acc[n] = bot ? fmaf(vb, xb[n], acc[n]) : acc[n];
        }
      }
      while (e > s) {  // (e - 2, e - 1) is an aligned pair: the two highest remaining bits
        const int b1 = pop_top(w);
        const int b0 = pop_top(w);
        e -= 2;
        float lo, hi;
        load_value_pair<DT>(buf, e, lo, hi);
        fma_col(b1, hi);
        fma_col(b0, lo);
      }
      if (it.wif & 1u) {  // end of the row(s): reduce over the row's lanes and write
        for (int off = S >> 1; off > 0; off >>= 1) {
#pragma unroll
          for (int n = 0; n < NB; ++n) acc[n] += __shfl_xor_sync(kFull, acc[n], off);
        }
        if (it.row < out) {
          const float bias = a.bias != nullptr ? load_global_elem<DT>(a.bias, it.row) : 0.f;
#pragma unroll
          for (int n = 0; n < NB; ++n) {
            if ((n & (S - 1)) == sl && n < nvalid) store_out<DT>(a.y, (n0 + n) * out + it.row, acc[n] + bias);
          }
        }
#pragma unroll
        for (int n = 0; n < NB; ++n) acc[n] = 0.f;
      }
    };

    // First item: its words and row pointer are loaded before x is staged, its values are in
    // flight while the block waits for the stage.
    bool has_cur = row0 < out;
    uint32_t w0 = 0u;
    if (has_cur) {
      row_values();
      w0 = fetch_word();
    }
    if constexpr (XM != kXGlobal) stage_x<DT, NB, XM>(xs, a.x, a.in_features, W, n0, nvalid);
    Item cur, prev;
    int cur_total = 0;
    int stage = 0;
    if (has_cur) start_item(cur, cur_total, w0, stage);
    __syncthreads();

    bool has_prev = false;
    while (has_cur) {
      // advance the cursor and fetch the next item's word (in flight while `prev` is computed)
      if (!(cur.wif & 1u)) {  // same row, next 32 words
        wi += 32;
        vaddr += static_cast<uintptr_t>(cur_total) * kElt;
      } else {
        row0 += row_stride;
        wi = sl;
        has_cur = row0 < out;
        if (has_cur) row_values();
      }
      const uint32_t wn = has_cur ? fetch_word() : 0u;
      if (has_prev) {
        copy_wait<1>();  // all but the newest copy (cur's) are done: prev's values are in
        __syncwarp();
        compute(prev);
      }
      prev = cur;
      has_prev = true;
      stage ^= 1;
      if (has_cur) {
        __syncwarp();  // every lane is done with the buffer the next copy overwrites
        start_item(cur, cur_total, wn, stage);
      }
    }
    if (has_prev) {
      copy_wait<0>();
      __syncwarp();
      compute(prev);
    }
    __syncthreads();  // the next pass restages x
  }
}

// ---- host side ----------------------------------------------------------------------------------
using KernelFn = void (*)(const PkBitmapLinearArgs, const Plan);

template <int DT, int NB, int XM> KernelFn kernel_of() { return bitmap_linear_kernel<DT, NB, XM>; }

template <int DT, int XM> KernelFn kernel_nb(int nb) {
  switch (nb) {
    case 1: return kernel_of<DT, 1, XM>();
    case 2: return kernel_of<DT, 2, XM>();
    case 4: return kernel_of<DT, 4, XM>();
    default: return kernel_of<DT, 8, XM>();
  }
}

// The instantiated kernels: x as float32 in shared memory (NB = 1, 2, 4 for float32, NB = 1 for
// 16-bit types), x in the 16-bit input dtype (NB = 1, 2, 4, 8), x from global memory (NB = 1).
template <int DT> KernelFn select_kernel(int nb, int xm) {
  if (xm == kXGlobal) return kernel_of<DT, 1, kXGlobal>();
  if constexpr (DT == PK_BML_F32) {
    switch (nb) {  // at most 4 rows per pass: 8 float32 x values per column would spill
      case 1: return kernel_of<DT, 1, kXSmemF32>();
      case 2: return kernel_of<DT, 2, kXSmemF32>();
      default: return kernel_of<DT, 4, kXSmemF32>();
    }
  } else {
    if (xm == kXSmemF32) return kernel_of<DT, 1, kXSmemF32>();
    return kernel_nb<DT, kXSmemNative>(nb);
  }
}

KernelFn select_kernel(int dtype, int nb, int xm) {
  switch (dtype) {
    case PK_BML_F32: return select_kernel<PK_BML_F32>(nb, xm);
    case PK_BML_F16: return select_kernel<PK_BML_F16>(nb, xm);
    default: return select_kernel<PK_BML_BF16>(nb, xm);
  }
}

int64_t x_stage_bytes(int dtype, int nb, int xm, int64_t words) {
  if (xm == kXGlobal) return 0;
  const int64_t es = (xm == kXSmemNative && dtype != PK_BML_F32) ? 2 : 4;
  const int64_t v = nb * es;
  const int64_t pad = v < 4 ? 4 : (v > 16 ? 16 : v);
  return (words * (32 * v + pad) + 15) / 16 * 16;
}

int64_t buffer_bytes(int dtype) {
  const int64_t elt = dtype == PK_BML_F32 ? 4 : 2;
  return kItemValues * elt + 16;  // a run of <= 1024 values starting anywhere in a 16-byte chunk
}

// x as float32 saves a conversion per product; used for one row of 16-bit x up to this size.
constexpr int64_t kMaxF32StageBytes = 32 * 1024;
// Passes with more rows of x are taken while at least this many warps stay resident per SM.
constexpr int kMinResidentWarps = 16;

// Lets `fn` use up to the device's opt-in maximum of dynamic shared memory; done once per
// kernel and device.
cudaError_t allow_max_smem(KernelFn fn, int dev, int optin) {
  static std::mutex mu;
  static std::vector<std::pair<KernelFn, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& d : done)
    if (d.first == fn && d.second == dev) return cudaSuccess;
  const cudaError_t e =
      cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (e != cudaSuccess) return e;
  done.emplace_back(fn, dev);
  return cudaSuccess;
}

struct Choice {
  int nb = 0, xm = 0, threads = 0, occ = 0;
  int64_t smem = 0;
  int64_t grid_x = 0, grid_y = 0;
};

cudaError_t plan_launch(const PkBitmapLinearArgs& a, Plan& plan, Choice& ch, int& num_sms) {
  if (a.dtype != PK_BML_F32 && a.dtype != PK_BML_F16 && a.dtype != PK_BML_BF16) return cudaErrorInvalidValue;
  if (a.num_rows < 0 || a.in_features < 0 || a.out_features < 0) return cudaErrorInvalidValue;
  if (a.words_per_row != (a.in_features + 31) / 32) return cudaErrorInvalidValue;
  // rows and row strides are int32 in the kernel (a warp's row may run past `out` by one
  // stride, which is at most about `out`)
  if (a.out_features > (int64_t{1} << 29) || a.in_features > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (a.rows_per_pass != 0 && a.rows_per_pass != 1 && a.rows_per_pass != 2 && a.rows_per_pass != 4 &&
      a.rows_per_pass != 8)
    return cudaErrorInvalidValue;
  if (a.threads != 0 && a.threads != 128 && a.threads != 256 && a.threads != 512) return cudaErrorInvalidValue;

  const int64_t W = a.words_per_row;
  int lanes_log2 = 5;
  if (W < 32) {
    lanes_log2 = 0;
    while ((int64_t{1} << lanes_log2) < W) ++lanes_log2;
  }
  const int rows_per_step = 32 >> lanes_log2;
  plan.lanes_log2 = lanes_log2;
  plan.items_per_row = lanes_log2 == 5 ? static_cast<int32_t>((W + kItemWords - 1) / kItemWords) : 1;
  if (plan.items_per_row < 1) plan.items_per_row = 1;
  plan.steps = (a.out_features + rows_per_step - 1) / rows_per_step;
  plan.buf_bytes = static_cast<int32_t>(buffer_bytes(a.dtype));

  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int optin = 0;
  if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess) return err;

  // rows of x per pass: the next power of two >= N, at most 8 (4 for float32)
  const int nb_cap = a.dtype == PK_BML_F32 ? 4 : 8;
  int nb_max = 1;
  while (nb_max < nb_cap && nb_max < a.num_rows) nb_max *= 2;
  if (a.rows_per_pass != 0) nb_max = a.rows_per_pass < nb_cap ? a.rows_per_pass : nb_cap;
  const bool force_global = a.x_in_global != 0;
  if (force_global) nb_max = 1;

  // Among the block sizes, the one that keeps the most warps with work resident, then spreads
  // them most evenly over the SMs (fewest per SM), then the largest (fewest copies of x).
  auto best_threads = [&](int nb, int xm, Choice& out) -> cudaError_t {
    out = Choice{};
    const int64_t xb = x_stage_bytes(a.dtype, nb, xm, W);
    int64_t best_active = -1, best_per_sm = 0;
    for (int threads : {512, 256, 128}) {
      if (a.threads != 0 && threads != a.threads) continue;
      const int warps = threads / 32;
      const int64_t smem = xb + static_cast<int64_t>(warps) * 2 * plan.buf_bytes;
      if (smem > optin) continue;
      KernelFn fn = select_kernel(a.dtype, nb, xm);
      cudaError_t e = allow_max_smem(fn, dev, optin);
      if (e != cudaSuccess) return e;
      int occ = 0;
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, threads, static_cast<size_t>(smem));
      if (e != cudaSuccess) return e;
      if (occ < 1) continue;
      const int64_t blocks = (plan.steps + warps - 1) / warps;
      const int64_t slots = static_cast<int64_t>(occ) * num_sms;
      const int64_t resident_blocks = blocks < slots ? blocks : slots;
      const int64_t active = resident_blocks * warps < plan.steps ? resident_blocks * warps : plan.steps;
      const int64_t per_sm = (resident_blocks + num_sms - 1) / num_sms * warps;
      if (active > best_active || (active == best_active && per_sm < best_per_sm)) {
        best_active = active;
        best_per_sm = per_sm;
        out.nb = nb;
        out.xm = xm;
        out.threads = threads;
        out.occ = occ;
        out.smem = smem;
      }
    }
    return cudaSuccess;
  };

  Choice pick;
  for (int nb = nb_max; nb >= 1 && pick.nb == 0; nb /= 2) {
    int xm = kXSmemNative;
    if (force_global) {
      xm = kXGlobal;
    } else if (a.dtype == PK_BML_F32 ||
               (nb == 1 && x_stage_bytes(a.dtype, 1, kXSmemF32, W) <= kMaxF32StageBytes)) {
      xm = kXSmemF32;
    }
    Choice c;
    err = best_threads(nb, xm, c);
    if (err != cudaSuccess) return err;
    if (c.nb == 0) continue;
    if (nb == 1 || static_cast<int64_t>(c.occ) * (c.threads / 32) >= kMinResidentWarps) pick = c;
  }
  if (pick.nb == 0) {  // x does not fit in shared memory even for one row: read it from global
    err = best_threads(1, kXGlobal, pick);
    if (err != cudaSuccess) return err;
    if (pick.nb == 0) return cudaErrorInvalidConfiguration;
  }
  ch = pick;
  plan.x_bytes = static_cast<int32_t>(x_stage_bytes(a.dtype, ch.nb, ch.xm, W));
  plan.groups = (a.num_rows + ch.nb - 1) / ch.nb;
  ch.grid_y = plan.groups < 65535 ? plan.groups : 65535;
  const int warps = ch.threads / 32;
  const int64_t blocks = (plan.steps + warps - 1) / warps;
  int64_t slots = static_cast<int64_t>(ch.occ) * num_sms / (ch.grid_y > 0 ? ch.grid_y : 1);
  if (slots < 1) slots = 1;
  ch.grid_x = blocks < slots ? blocks : slots;
  if (ch.grid_x < 1) ch.grid_x = 1;
  return cudaSuccess;
}

}  // namespace

extern "C" cudaError_t pk_bitmap_linear_cuda_config(const PkBitmapLinearArgs* args, PkBitmapLinearConfig* cfg) {
  if (args == nullptr || cfg == nullptr) return cudaErrorInvalidValue;
  Plan plan{};
  Choice ch;
  int num_sms = 0;
  const cudaError_t err = plan_launch(*args, plan, ch, num_sms);
  if (err != cudaSuccess) return err;
  cfg->rows_per_pass = ch.nb;
  cfg->x_mode = ch.xm;
  cfg->threads = ch.threads;
  cfg->lanes_per_row = 1 << plan.lanes_log2;
  cfg->grid_x = static_cast<int32_t>(ch.grid_x);
  cfg->grid_y = static_cast<int32_t>(ch.grid_y);
  cfg->smem_bytes = ch.smem;
  cfg->blocks_per_sm = ch.occ;
  cfg->num_sms = num_sms;
  return cudaSuccess;
}

extern "C" cudaError_t pk_bitmap_linear_cuda(const PkBitmapLinearArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const PkBitmapLinearArgs& a = *args;
  if (a.num_rows < 0 || a.out_features < 0) return cudaErrorInvalidValue;
  if (a.num_rows == 0 || a.out_features == 0) return cudaSuccess;
  // (empty tensors may have null data: bitmap when in == 0, values when nnz == 0)
  if (a.y == nullptr || a.row_ptr == nullptr || (a.in_features > 0 && (a.x == nullptr || a.bitmap == nullptr)))
    return cudaErrorInvalidValue;
  Plan plan{};
  Choice ch;
  int num_sms = 0;
  const cudaError_t err = plan_launch(a, plan, ch, num_sms);
  if (err != cudaSuccess) return err;
  KernelFn fn = select_kernel(a.dtype, ch.nb, ch.xm);
  const dim3 grid(static_cast<unsigned>(ch.grid_x), static_cast<unsigned>(ch.grid_y));
  fn<<<grid, ch.threads, static_cast<size_t>(ch.smem), stream>>>(a, plan);
  return cudaGetLastError();
}
