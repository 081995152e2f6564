// masked_linear on the BitmapWeight format, CUDA backend: the interface between the kernels
// (bitmap_linear.cu, compiled by nvcc, no torch headers) and the torch binding
// (bitmap_linear_binding.cpp). Plain C types only, so that both sides agree on the layout
// whatever compiles them.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of x / values / bias / y (all four share one dtype)
enum { PK_BML_F32 = 0, PK_BML_F16 = 1, PK_BML_BF16 = 2 };

typedef struct PkBitmapLinearArgs {
  const void* x;           // [N, in] contiguous, dtype `dtype`
  const void* values;      // [nnz] kept weights, row-major packed, dtype `dtype` (element-aligned)
  const int32_t* bitmap;   // [out, W] contiguous, W = ceil(in / 32); bit j of word w of row o is
                           // column 32 w + j (LSB first); the bits past `in` are 0
  const int64_t* row_ptr;  // [out + 1]: row o's values are values[row_ptr[o] : row_ptr[o + 1]],
                           // row_ptr[o + 1] - row_ptr[o] == popcount of bitmap row o
  const void* bias;        // [out] dtype `dtype`, or NULL
  void* y;                 // [N, out] contiguous, dtype `dtype`; every element is written
  int32_t dtype;           // PK_BML_F32 / PK_BML_F16 / PK_BML_BF16
  int64_t num_rows;        // N >= 0
  int64_t in_features;     // >= 0
  int64_t out_features;    // >= 0
  int64_t words_per_row;   // W, must equal ceil(in / 32)
  // Tuning / testing knobs; 0 = automatic (the launcher's choice).
  int32_t rows_per_pass;   // rows of x per pass over the weight: 1, 2, 4 or 8 (float32: 8 -> 4)
  int32_t threads;         // threads per block: 256 or 512
  int32_t x_in_global;     // 1: read x from global memory instead of shared memory (the
                           // fallback for very large `in`; forces rows_per_pass = 1)
} PkBitmapLinearArgs;

// What the launcher chose (pk_bitmap_linear_cuda_config); for benchmarks and diagnostics.
typedef struct PkBitmapLinearConfig {
  int32_t rows_per_pass;       // NB: rows of x accumulated per pass (x rows padded up to it)
  int32_t x_mode;              // 0: x staged in shared memory as float32, 1: in the input
                               // dtype, 2: read from global memory
  int32_t threads;             // threads per block
  int32_t lanes_per_row;       // S: lanes of a warp per output row (32, or fewer for short rows)
  int32_t grid_x;              // persistent blocks per pass group
  int32_t grid_y;              // pass groups launched (ceil(N / NB), at most 65535)
  int64_t smem_bytes;          // dynamic shared memory per block
  int32_t blocks_per_sm;       // occupancy of that configuration
  int32_t num_sms;
} PkBitmapLinearConfig;

// Fills *cfg with the launch configuration pk_bitmap_linear_cuda would use on the current
// device. Returns cudaErrorInvalidValue for arguments the kernel cannot take.
cudaError_t pk_bitmap_linear_cuda_config(const PkBitmapLinearArgs* args, PkBitmapLinearConfig* cfg);

// y = x W^T (+ bias) on `stream`, float32 accumulation. Returns cudaErrorInvalidValue for
// arguments the kernel cannot take (see the checks in the .cu), else the launch status.
cudaError_t pk_bitmap_linear_cuda(const PkBitmapLinearArgs* args, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
