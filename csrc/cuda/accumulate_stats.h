// accumulate_stats, CUDA backend: the interface between the kernels (accumulate_stats.cu,
// compiled by nvcc, no torch headers) and the torch binding (accumulate_stats_binding.cpp).
// Plain C types only, so that both sides agree on the layout whatever compiles them.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of x
enum { PK_ACC_F32 = 0, PK_ACC_F16 = 1, PK_ACC_BF16 = 2 };

// Threads per block and channels per thread ("vec") of the kernels; a block covers
// PK_ACC_THREADS * vec channels of one chunk. Python's cuda.py mirrors these numbers for its
// default rows_per_chunk (a mismatch only costs speed).
#define PK_ACC_THREADS 128
#define PK_ACC_MIN_BLOCKS_PER_SM 8
// Edges up to this many are staged in shared memory (16 KiB); more are read from global memory.
#define PK_ACC_MAX_SMEM_EDGES 4096

typedef struct PkAccumulateStatsArgs {
  const void* x;                 // [R, C] contiguous, dtype `dtype`
  int32_t dtype;                 // PK_ACC_F32 / PK_ACC_F16 / PK_ACC_BF16
  int32_t vec;                   // channels per thread: 1, or 2 (needs C even and x 2*elsize aligned)
  int64_t num_rows;              // R
  int64_t num_channels;          // C
  const uint8_t* valid;          // [R] 0/1
  const int64_t* chunk_start;    // [K] first row of each chunk
  const int64_t* chunk_length;   // [K] rows of each chunk (0 <= start, start + length <= R)
  const int64_t* chunk_persona;  // [K] persona of each chunk (in [0, P); used for the histogram)
  int64_t num_chunks;            // K
  const float* edges;            // [E] strictly increasing, or NULL: no histogram
  int64_t num_edges;             // E (>= 2 when edges != NULL)
  int32_t* hist;                 // [P, C, E - 1], counts are added
  // outputs, [K, C] each, every element written
  float* sum;
  void* mean;                    // float32, or float64 when mean_is_f64
  int32_t mean_is_f64;
  float* m2;
  float* sumsq;
  float* sumabs;
  int32_t* pos;
  float* min;
  float* max;
  float* absmax;
} PkAccumulateStatsArgs;

// Launches the stage-1 kernel on `stream`. Returns cudaErrorInvalidValue for arguments the
// kernel cannot take (see the checks in the .cu), else the launch status (cudaGetLastError).
cudaError_t pk_accumulate_stats_cuda(const PkAccumulateStatsArgs* args, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
