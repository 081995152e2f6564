// CPU (C++/OpenMP) kernel of accumulate_stats, stage 1: chunk partials.
//
// Contract (see persona_kernels/ops/accumulate_stats/partials.py): for every chunk k (rows
// start[k] .. start[k]+length[k]-1 of x viewed as [R, C]) and channel c, over the chunk's
// *valid* rows only, write sum, mean (float64, or float32 if the caller allocated that), M2,
// sumsq, sumabs, pos (count of x > 0), min, max and absmax; and, when edges are given, add one
// histogram count per valid element at hist[persona[k], c, bin] (bin i holds
// edges[i] < x <= edges[i+1], outer bins open). Python entry points: accumulate_stats_partials,
// hist_search_info (registered by register_accumulate_stats; the module is csrc/cpu/module.cpp).
//
// Layout of the work
// ------------------
// One streaming pass over x. The channels are split into S contiguous *slices* (multiples of
// 16 channels, at least `min_slice` wide) and the threads into S x G: thread (s, g) handles
// slice s of the chunks it takes from slice s's queue (G threads share a queue). With a large
// C and few threads (the common case: C = 4096, 2 threads) G = 1: each thread owns half of
// the channels of every row, so the histogram cells it touches are its own and need neither
// atomics nor private copies. With G > 1 the threads of one slice could hit the same cell
// (two chunks of one persona), so group g > 0 counts into a private copy that is added to
// the output at the end (or, if the copies would be too large, every group uses relaxed
// atomics).
//
// Inside a chunk the valid rows are gathered, then folded kTile = 8 rows at a time: for each
// channel the tile's exact (count, mean, M2) comes from the 8 values in registers (mean
// first, then centred squares), and is Chan-merged into the running pair. The loop over
// channels is vectorised with native-width GCC vector types (16 lanes with AVX-512, 8 with
// AVX, 4 otherwise); all channels of a row share its validity, so the merge weights are
// per-tile scalars. Numerics: the first two moments are kept for y = x - shift
// (shift = the chunk's first valid row): the Welford pair (mean_y, M2) and a compensated
// (TwoSum) running sum S_y. The chunk mean is written in float64 as shift + S_y / n and the
// sum as n * shift + S_y, so both M2 and the mean that stage 2 merges with stay accurate when
// |mean| >> std, and the mean stays accurate for means near 0.
// Channels are walked in blocks of kBlock so that a tile block (8 x 512 floats, 16 KiB) stays
// in L1 for the histogram pass and for the float scratch that fp16/bf16 rows are converted
// into.
//
// Histogram bins are found without a per-element binary search: a uniform grid of M cells
// over the interior edges maps x to a cell, a table gives a lower bound of the bin for every
// x in that cell, and a fixed number of comparisons against the real float32 edges finishes
// the count. The cell index is a monotone function of x, evaluated with the same float code
// when the table is built, so the result is exactly "number of interior edges < x" (what a
// binary search gives), whatever the rounding. Edges too irregular for a small grid fall back
// to a branchless binary search. With AVX-512 the two outer bins (x <= first interior edge,
// x > last interior edge) are counted per channel with mask arithmetic, and only the
// interior values are compressed into a buffer, binned 16 at a time with gathers, and
// counted one by one.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// GCC 12 reports -Wmaybe-uninitialized inside its own masked AVX-512 intrinsics
// (_mm512_maskz_*): a false positive, silenced for this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

constexpr int kTile = 8;           // valid rows folded per Chan merge
constexpr int64_t kBlock = 512;    // channels per block (kTile * kBlock floats = 16 KiB)
constexpr int64_t kVec = 16;       // slice granularity in channels (one AVX-512 vector)
constexpr int64_t kPrivateHistBudget = int64_t(256) << 20;  // bytes of private histogram copies
constexpr int64_t kSerialElements = int64_t(1) << 15;       // below this, no threads

// ------------------------------------------------------------------------------------------
// accumulators of one chunk: pointers to its row of every output tensor
struct Acc {
  float* sum;
  float* mean;
  float* m2;
  float* sumsq;
  float* sumabs;
  int32_t* pos;
  float* mn;
  float* mx;
  float* amx;

  Acc at(int64_t c) const { return {sum + c, mean ? mean + c : nullptr, m2 + c, sumsq + c, sumabs + c, pos + c, mn + c, mx + c, amx + c}; }
};

// ------------------------------------------------------------------------------------------
// Native-width vectors (GCC/Clang vector extensions: zmm with AVX-512, ymm with AVX, xmm
// otherwise; a wider-than-native vector type would make GCC scalarise the selects) and the
// same operations on plain scalars, so that the vector body and the scalar channel tail share
// one template.
#if defined(__AVX512F__)
#define PK_VEC_BYTES 64
#elif defined(__AVX__)
#define PK_VEC_BYTES 32
#else
#define PK_VEC_BYTES 16
#endif
typedef float vfN __attribute__((vector_size(PK_VEC_BYTES)));
typedef int32_t viN __attribute__((vector_size(PK_VEC_BYTES)));
constexpr int64_t kLanes = PK_VEC_BYTES / 4;

inline float load(const float* p, float) { return *p; }
inline vfN load(const float* p, vfN) {
  vfN v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline int32_t load(const int32_t* p, int32_t) { return *p; }
inline viN load(const int32_t* p, viN) {
  viN v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, vfN v) { std::memcpy(p, &v, sizeof v); }
inline void store(int32_t* p, int32_t v) { *p = v; }
inline void store(int32_t* p, viN v) { std::memcpy(p, &v, sizeof v); }

inline float vmin(float a, float b) { return b < a ? b : a; }
inline vfN vmin(vfN a, vfN b) { return b < a ? b : a; }
inline float vmax(float a, float b) { return b > a ? b : a; }
inline vfN vmax(vfN a, vfN b) { return b > a ? b : a; }
inline float vabs(float a) { return std::fabs(a); }
inline vfN vabs(vfN a) { return (vfN)((viN)a & 0x7fffffff); }
inline int32_t positive(float a) { return a > 0.f ? 1 : 0; }
inline viN positive(vfN a) { return -(a > 0.f); }  // comparison lanes are -1 / 0

template <class V> struct IntOf;
template <> struct IntOf<float> { using type = int32_t; };
template <> struct IntOf<vfN> { using type = viN; };

// pairwise reduction of N values (a balanced tree: short dependency chains, and the same
// order for every channel)
template <int N>
struct Tree {
  template <class V, class F>
  static inline V reduce(const V* v, F f) {
    if constexpr (N == 1) {
      return v[0];
    } else {
      constexpr int H = N / 2;
      return f(Tree<H>::reduce(v, f), Tree<N - H>::reduce(v + H, f));
    }
  }
};

struct Add { template <class V> inline V operator()(V a, V b) const { return a + b; } };
struct Min { template <class V> inline V operator()(V a, V b) const { return vmin(a, b); } };
struct Max { template <class V> inline V operator()(V a, V b) const { return vmax(a, b); } };

void init_acc(const Acc& a, int64_t n) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    a.sum[c] = 0.f; a.m2[c] = 0.f; a.sumsq[c] = 0.f; a.sumabs[c] = 0.f;
    a.pos[c] = 0; a.mn[c] = inf; a.mx[c] = -inf; a.amx[c] = 0.f;
  }
}

// Fold NT rows into the accumulators of the channels c .. c + lanes(V) - 1.
// frac = NT / n_new and w = n_old * NT / n_new are the Chan merge weights. Everything about
// the first two moments is kept for the shifted values y = x - shift (shift = the chunk's
// first valid row; y is exact when x is within a factor 2 of it): the Welford pair (a.mean
// holds the running mean of y, M2) and the running sum of y, compensated (TwoSum: a.sum + lo
// is the exact sum of the tiles' sums). finish_chunk turns them into mean = shift + S_y / n
// (float64) and sum = n * shift + S_y, accurate both when |mean| >> std and for means near 0.
template <int NT, class V>
__attribute__((always_inline)) inline void tile_step(const float* const* r, const float* shift, float* lo_sum, const Acc& a, int64_t c, float frac,
                      float w, float inv_nt) {
  using VI = typename IntOf<V>::type;
  V x[NT], y[NT], d2[NT], q[NT], ab[NT];
  VI p = load(a.pos + c, VI());
  const V k = load(shift + c, V());
  for (int i = 0; i < NT; ++i) {
    x[i] = load(r[i] + c, V());
    y[i] = x[i] - k;
  }
  const V s = Tree<NT>::reduce(y, Add());
  const V tm = s * inv_nt;
  for (int i = 0; i < NT; ++i) {
    const V d = y[i] - tm;
    d2[i] = d * d;
    q[i] = x[i] * x[i];
    ab[i] = vabs(x[i]);
    p += positive(x[i]);
  }
  const V tm2 = Tree<NT>::reduce(d2, Add());
  const V sq = Tree<NT>::reduce(q, Add());
  const V sa = Tree<NT>::reduce(ab, Add());
  const V lo = Tree<NT>::reduce(x, Min());
  const V hi = Tree<NT>::reduce(x, Max());
  const V am = Tree<NT>::reduce(ab, Max());

  const V m0 = load(a.mean + c, V());
  const V delta = tm - m0;
  store(a.mean + c, m0 + delta * frac);
  store(a.m2 + c, load(a.m2 + c, V()) + (tm2 + delta * delta * w));
  const V s0 = load(a.sum + c, V());
  const V t = s0 + s;  // TwoSum: t + err == s0 + s exactly
  const V bp = t - s0;
  const V ap = t - bp;
  store(lo_sum + c, load(lo_sum + c, V()) + ((s0 - ap) + (s - bp)));
  store(a.sum + c, t);
  store(a.sumsq + c, load(a.sumsq + c, V()) + sq);
  store(a.sumabs + c, load(a.sumabs + c, V()) + sa);
  store(a.pos + c, p);
  store(a.mn + c, vmin(load(a.mn + c, V()), lo));
  store(a.mx + c, vmax(load(a.mx + c, V()), hi));
  store(a.amx + c, vmax(load(a.amx + c, V()), am));
}

// Fold NT rows (pointers to nc floats each) into the accumulators a[0 .. nc).
template <int NT>
void tile_update(const float* const* rows, const float* shift, float* lo_sum, int64_t nc, const Acc& a, float frac,
                 float w, float inv_nt) {
  const float* r[NT];
  for (int i = 0; i < NT; ++i) r[i] = rows[i];
  int64_t c = 0;
  for (; c + kLanes <= nc; c += kLanes) tile_step<NT, vfN>(r, shift, lo_sum, a, c, frac, w, inv_nt);
  for (; c < nc; ++c) tile_step<NT, float>(r, shift, lo_sum, a, c, frac, w, inv_nt);
}

using TileFn = void (*)(const float* const*, const float*, float*, int64_t, const Acc&, float, float, float);
constexpr TileFn kTileFns[kTile + 1] = {nullptr, tile_update<1>, tile_update<2>, tile_update<3>, tile_update<4>,
                                        tile_update<5>, tile_update<6>, tile_update<7>, tile_update<8>};

// ------------------------------------------------------------------------------------------
// fp16 / bf16 -> float conversion of one row block into the scratch buffer
inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c));
    _mm512_storeu_ps(dst + c, _mm512_cvtph_ps(h));
  }
#elif defined(__F16C__)
  for (; c + 8 <= n; c += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
    _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(h));
  }
#endif
  for (; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) d[c] = uint32_t(s[c]) << 16;
}

// ------------------------------------------------------------------------------------------
// histogram bin search
//
// Only the interior edges f[j] = edges[j + 1], j < NI = E - 2, matter: the bin of x is
// exactly #{j : f[j] < x} (0 below/at the first interior edge or for NaN, E - 2 above the
// last one). `f` is padded with one +inf so that searches may step one past the last edge.
enum class HistMode { kSingleBin, kLut, kBinarySearch };

struct HistSearch {
  HistMode mode = HistMode::kSingleBin;
  int64_t bins = 1;        // E - 1
  int ni = 0;              // interior edges
  int steps = 0;           // comparisons after the table lookup (kLut)
  float f0 = 0.f;          // first interior edge
  float scale = 1.f;       // cells per unit
  float cells = 0.f;       // M, as float
  std::vector<float> f;    // interior edges + one +inf
  std::vector<int32_t> lb; // [M + 2] lower bound of the bin for each cell index
  std::vector<int64_t> lbf; // [M + 2] lb[i] | bits(f[lb[i]]) << 32: one gather for steps == 1

  // monotone (non-decreasing) cell index in [0, M + 1]; NaN -> 0
  inline int cell(float v) const {
    float t = (v - f0) * scale;
    t = t > -1.f ? t : -1.f;
    t = t < cells ? t : cells;
    return static_cast<int>(t + 1.f);
  }
};

HistSearch make_hist_search(const float* e, int64_t E) {
  HistSearch h;
  h.bins = E - 1;
  h.ni = static_cast<int>(E - 2);
  if (h.ni <= 0) {
    h.mode = HistMode::kSingleBin;
    return h;
  }
  h.f.assign(e + 1, e + 1 + h.ni);
  h.f.push_back(std::numeric_limits<float>::infinity());
  h.f0 = h.f[0];
  const double range = double(h.f[h.ni - 1]) - double(h.f0);
  constexpr int64_t kMaxCells = int64_t(1) << 16;
  bool ok = false;
  std::vector<int32_t> cnt;
  for (int64_t M = std::max<int64_t>(16, 2 * int64_t(h.ni)); M <= kMaxCells; M *= 2) {
    double sc = h.ni >= 2 ? double(M) / range : 1.0;
    float scf = static_cast<float>(sc);
    if (!(std::isfinite(scf) && scf > 0.f)) break;
    h.scale = scf;
    h.cells = static_cast<float>(M);
    cnt.assign(M + 2, 0);
    int most = 0;
    for (int j = 0; j < h.ni; ++j) most = std::max(most, ++cnt[h.cell(h.f[j])]);
    h.steps = most;
    ok = true;
    if (most <= 2 || M * 2 > kMaxCells) break;
  }
  if (!ok || h.steps > 4) {
    h.mode = HistMode::kBinarySearch;
    return h;
  }
  h.mode = HistMode::kLut;
  // lb[i] = #{j : cell(f[j]) < i}: every x in cell i has at least these edges below it, and
  // at most cnt[i] more (those in its own cell), hence `steps` comparisons finish the count.
  h.lb.assign(cnt.size(), 0);
  int32_t acc = 0;
  for (size_t i = 0; i < cnt.size(); ++i) {
    h.lb[i] = acc;
    acc += cnt[i];
  }
  h.lbf.resize(h.lb.size());
  for (size_t i = 0; i < h.lb.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &h.f[h.lb[i]], sizeof bits);
    h.lbf[i] = static_cast<int64_t>((uint64_t(bits) << 32) | uint32_t(h.lb[i]));
  }
  return h;
}

template <bool ATOMIC>
inline void bump(int32_t* p, int32_t by = 1) {
  if constexpr (ATOMIC) {
    __atomic_fetch_add(p, by, __ATOMIC_RELAXED);
  } else {
    *p += by;
  }
}

// Histogram of one tile block: rows rp[0 .. nt), channels [0, nc) of the block, counted into
// h[c * bins + bin] (h: the block's first channel in the persona's [C, bins] histogram).
// Kernels picked with HistKernel::outer_counts count the two outer bins (0 and E - 2) per
// channel into out0[c] / outL[c] instead (vector counters, flushed into h at the end of the
// chunk), and only the interior elements are incremented one by one.
struct HistTile {
  const float* const* rp;
  int nt;
  int64_t nc;
  int32_t* h;
  int32_t* out0;
  int32_t* outL;
  int32_t* addr;  // scratch for kTile * block + 16 addresses
  float* vals;    // scratch for kTile * block + 16 values
};
using HistFn = void (*)(const HistTile&, const HistSearch&);

template <bool ATOMIC, int STEPS>
void hist_tile_lut(const HistTile& t, const HistSearch& hs) {
  const int32_t* lb = hs.lb.data();
  const float* f = hs.f.data();
  const int64_t bins = hs.bins;
  for (int i = 0; i < t.nt; ++i) {
    const float* __restrict xr = t.rp[i];
    for (int64_t c = 0; c < t.nc; ++c) {
      const float v = xr[c];
      int b = lb[hs.cell(v)];
      for (int s = 0; s < STEPS; ++s) b += f[b] < v ? 1 : 0;
      bump<ATOMIC>(t.h + c * bins + b);
    }
  }
}

template <bool ATOMIC>
void hist_tile_bsearch(const HistTile& t, const HistSearch& hs) {
  const float* f = hs.f.data();
  const int64_t bins = hs.bins;
  for (int i = 0; i < t.nt; ++i) {
    const float* __restrict xr = t.rp[i];
    for (int64_t c = 0; c < t.nc; ++c) {
      const float v = xr[c];
      const float* base = f;
      int64_t n = hs.ni;
      while (n > 1) {
        const int64_t half = n / 2;
        base = base[half] < v ? base + half : base;
        n -= half;
      }
      const int64_t b = (base - f) + (base[0] < v ? 1 : 0);
      bump<ATOMIC>(t.h + c * bins + b);
    }
  }
}

#if defined(__AVX512F__)
constexpr bool kVectorHist = true;

// bins of 16 values: exactly HistSearch::cell + table + STEPS comparisons, in vector form
// (max_ps(t, -1) maps NaN to -1 like the scalar `t > -1 ? t : -1`)
template <int STEPS>
inline __m512i bins16(__m512 v, __m512 f0, __m512 scale, __m512 cells, const int32_t* lb, const float* f,
                      const int64_t* lbf) {
  __m512 t = _mm512_mul_ps(_mm512_sub_ps(v, f0), scale);
  t = _mm512_max_ps(t, _mm512_set1_ps(-1.f));
  t = _mm512_min_ps(t, cells);
  const __m512i idx = _mm512_cvttps_epi32(_mm512_add_ps(t, _mm512_set1_ps(1.f)));
  if constexpr (STEPS == 1) {
    // (lb[i], f[lb[i]]) pairs in one 64-bit gather per 8 lanes
    const __m512i p0 = _mm512_i32gather_epi64(_mm512_castsi512_si256(idx), lbf, 8);
    const __m512i p1 = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(idx, 1), lbf, 8);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i b = _mm512_permutex2var_epi32(p0, even, p1);
    const __m512 fb = _mm512_castsi512_ps(_mm512_permutex2var_epi32(p0, odd, p1));
    return _mm512_mask_add_epi32(b, _mm512_cmp_ps_mask(fb, v, _CMP_LT_OQ), b, _mm512_set1_epi32(1));
  }
  __m512i b = _mm512_i32gather_epi32(idx, lb, 4);
  for (int s = 0; s < STEPS; ++s) {
    const __m512 fb = _mm512_i32gather_ps(b, f, 4);
    b = _mm512_mask_add_epi32(b, _mm512_cmp_ps_mask(fb, v, _CMP_LT_OQ), b, _mm512_set1_epi32(1));
  }
  return b;
}

// Vector histogram of a tile block. Values at or below the first interior edge (or NaN) fall
// in bin 0, values above the last interior edge in bin E - 2: both are counted per channel
// with mask arithmetic. The remaining (interior) values are compressed, with the address of
// their channel's histogram row, into dense buffers; their bins are then searched 16 at a
// time (table and edge gathers) and counted one by one.
template <bool ATOMIC, int STEPS>
void hist_tile_avx512(const HistTile& t, const HistSearch& hs) {
  const __m512 f0 = _mm512_set1_ps(hs.f0), scale = _mm512_set1_ps(hs.scale), cells = _mm512_set1_ps(hs.cells);
  const __m512 lo_edge = _mm512_set1_ps(hs.f[0]), hi_edge = _mm512_set1_ps(hs.f[hs.ni - 1]);
  const int32_t* lb = hs.lb.data();
  const float* f = hs.f.data();
  const int32_t bins = static_cast<int32_t>(hs.bins);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i lane_off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(bins));
  int32_t* addr = t.addr;
  float* vals = t.vals;
  int64_t na = 0;
  for (int64_t c = 0; c < t.nc; c += 16) {
    const __mmask16 live = t.nc - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (t.nc - c)) - 1u);
    __m512i n0 = _mm512_maskz_loadu_epi32(live, t.out0 + c);
    __m512i nl = _mm512_maskz_loadu_epi32(live, t.outL + c);
    const __m512i base = _mm512_add_epi32(lane_off, _mm512_set1_epi32(static_cast<int32_t>(c) * bins));
    for (int i = 0; i < t.nt; ++i) {
      const __m512 v = _mm512_maskz_loadu_ps(live, t.rp[i] + c);
      const __mmask16 above0 = _mm512_cmp_ps_mask(v, lo_edge, _CMP_GT_OQ);  // false for NaN
      const __mmask16 ml = live & _mm512_cmp_ps_mask(v, hi_edge, _CMP_GT_OQ);
      const __mmask16 m0 = live & ~above0;
      n0 = _mm512_mask_add_epi32(n0, m0, n0, one);
      nl = _mm512_mask_add_epi32(nl, ml, nl, one);
      const __mmask16 mi = live & above0 & ~ml;
      // register-form compress + full store (the memory form is slow on some cores)
      _mm512_storeu_ps(vals + na, _mm512_maskz_compress_ps(mi, v));
      _mm512_storeu_si512(addr + na, _mm512_maskz_compress_epi32(mi, base));
      na += __builtin_popcount(static_cast<unsigned>(mi));
    }
    _mm512_mask_storeu_epi32(t.out0 + c, live, n0);
    _mm512_mask_storeu_epi32(t.outL + c, live, nl);
  }
  for (int64_t j = 0; j < na; j += 16) {
    const __mmask16 live = na - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (na - j)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(live, vals + j);  // padding lanes: 0 -> a valid cell
    const __m512i b = bins16<STEPS>(v, f0, scale, cells, lb, f, hs.lbf.data());
    _mm512_mask_storeu_epi32(addr + j, live, _mm512_add_epi32(_mm512_maskz_loadu_epi32(live, addr + j), b));
  }
  for (int64_t j = 0; j < na; ++j) bump<ATOMIC>(t.h + addr[j]);
}
#else
constexpr bool kVectorHist = false;
#endif

// whether `fn` counts the outer bins into out0 / outL
struct HistKernel {
  HistFn fn = nullptr;
  bool outer_counts = false;
};

template <bool ATOMIC>
HistKernel pick_hist_kernel(const HistSearch& hs, bool allow_vector) {
  if (hs.mode == HistMode::kSingleBin) return {nullptr, false};  // counted from the valid rows
  if (hs.mode == HistMode::kBinarySearch) return {hist_tile_bsearch<ATOMIC>, false};
#if defined(__AVX512F__)
  if (allow_vector) {
    switch (hs.steps) {
      case 1: return {hist_tile_avx512<ATOMIC, 1>, true};
      case 2: return {hist_tile_avx512<ATOMIC, 2>, true};
      case 3: return {hist_tile_avx512<ATOMIC, 3>, true};
      default: return {hist_tile_avx512<ATOMIC, 4>, true};
    }
  }
#endif
  switch (hs.steps) {
    case 1: return {hist_tile_lut<ATOMIC, 1>, false};
    case 2: return {hist_tile_lut<ATOMIC, 2>, false};
    case 3: return {hist_tile_lut<ATOMIC, 3>, false};
    default: return {hist_tile_lut<ATOMIC, 4>, false};
  }
}

// ------------------------------------------------------------------------------------------
// one chunk, channels [c0, c1)
struct ThreadBuffers {
  std::vector<int64_t> rows;
  std::unique_ptr<float[]> scratch;
  std::vector<float> shift;  // [C]: the first valid row as float (fp16/bf16 input only)
  std::vector<float> lo;     // [C]: compensation of the running sum of y
  std::vector<float> mu;     // [C]: running mean of y (Welford)
  std::vector<int32_t> out0, outL;  // [C]: outer-bin counts of the chunk (vector histogram)
  std::unique_ptr<int32_t[]> addr;  // histogram addresses of one tile block
  std::unique_ptr<float[]> vals;    // interior values of one tile block
};

struct HistCtx {
  int32_t* h = nullptr;  // the chunk's persona's [C, bins] histogram, or null (no histogram)
  HistKernel kernel;
  bool atomic = false;
  const HistSearch* hs = nullptr;
};

template <typename T>
void process_chunk(const T* x, int64_t C, const bool* valid, int64_t start, int64_t len, int64_t c0, int64_t c1,
                   const Acc& out, double* mean64, float* mean32, const HistCtx& hc, ThreadBuffers& tb,
                   int64_t block, bool block_outer) {
  // the chunk's output mean row is float64 (mean64) or float32 (mean32); `out.mean` is unused
  Acc acc = out;
  tb.mu.resize(static_cast<size_t>(C));
  acc.mean = tb.mu.data();
  init_acc(acc.at(c0), c1 - c0);
  std::fill(tb.mu.begin() + c0, tb.mu.begin() + c1, 0.f);
  for (int64_t c = c0; c < c1; ++c) {
    if (mean64 != nullptr) mean64[c] = 0.0; else mean32[c] = 0.f;
  }
  std::vector<int64_t>& rows = tb.rows;
  rows.clear();
  for (int64_t r = start; r < start + len; ++r)
    if (valid[r]) rows.push_back(r);
  const int64_t nv = static_cast<int64_t>(rows.size());
  if (nv == 0) return;
  float* scratch = tb.scratch.get();
  const float* shift;  // indexed by absolute channel
  if constexpr (std::is_same_v<T, float>) {
    shift = x + rows[0] * C;
  } else {
    tb.shift.resize(static_cast<size_t>(C));
    to_float(x + rows[0] * C + c0, tb.shift.data() + c0, c1 - c0);
    shift = tb.shift.data();
  }
  tb.lo.resize(static_cast<size_t>(C));
  float* lo = tb.lo.data();
  std::fill(lo + c0, lo + c1, 0.f);
  const HistFn hist_fn = hc.h != nullptr ? hc.kernel.fn : nullptr;
  const int64_t bins = hc.hs != nullptr ? hc.hs->bins : 0;
  const bool outer_counts = hist_fn != nullptr && hc.kernel.outer_counts;
  if (outer_counts) {
    tb.out0.resize(static_cast<size_t>(C));
    tb.outL.resize(static_cast<size_t>(C));
    std::fill(tb.out0.begin() + c0, tb.out0.begin() + c1, 0);
    std::fill(tb.outL.begin() + c0, tb.outL.begin() + c1, 0);
  }
  // fold tile [t0, t0 + kTile) of the valid rows, channels [cb, cb + nc)
  auto do_tile = [&](int64_t t0, int64_t cb, int64_t nc) {
    const int nt = static_cast<int>(std::min<int64_t>(kTile, nv - t0));
    const int64_t n_old = t0, n_new = t0 + nt;
    const float frac = static_cast<float>(double(nt) / double(n_new));
    const float w = static_cast<float>(double(n_old) * double(nt) / double(n_new));
    const float inv_nt = 1.f / static_cast<float>(nt);
    const float* rp[kTile];
    for (int i = 0; i < nt; ++i) {
      const T* src = x + rows[t0 + i] * C + cb;
      if constexpr (std::is_same_v<T, float>) {
        rp[i] = src;
      } else {
        to_float(src, scratch + i * block, nc);
        rp[i] = scratch + i * block;
      }
    }
    kTileFns[nt](rp, shift + cb, lo + cb, nc, acc.at(cb), frac, w, inv_nt);
    if (hist_fn != nullptr) {
      HistTile ht{rp, nt, nc, hc.h + cb * bins, outer_counts ? tb.out0.data() + cb : nullptr,
                  outer_counts ? tb.outL.data() + cb : nullptr, tb.addr.get(), tb.vals.get()};
      hist_fn(ht, *hc.hs);
    }
  };
  if (block_outer) {
    for (int64_t cb = c0; cb < c1; cb += block)
      for (int64_t t0 = 0; t0 < nv; t0 += kTile) do_tile(t0, cb, std::min(block, c1 - cb));
  } else {
    for (int64_t t0 = 0; t0 < nv; t0 += kTile)
      for (int64_t cb = c0; cb < c1; cb += block) do_tile(t0, cb, std::min(block, c1 - cb));
  }
  // finish: S_y = hi + lo; mean = shift + S_y / n, sum = n * shift + S_y (the running mean of
  // y only served the M2 merges)
  float* __restrict sum = acc.sum;
  const double dn = double(nv);
  for (int64_t c = c0; c < c1; ++c) {
    const double sy = double(sum[c]) + double(lo[c]);
    const double k = double(shift[c]);
    sum[c] = static_cast<float>(dn * k + sy);
    const double m = k + sy / dn;
    if (mean64 != nullptr) mean64[c] = m; else mean32[c] = static_cast<float>(m);
  }
  if (hc.h != nullptr) {
    auto add = [&](int32_t* p, int32_t by) {
      if (by == 0) return;
      if (hc.atomic) bump<true>(p, by); else bump<false>(p, by);
    };
    if (hc.hs->mode == HistMode::kSingleBin) {
      for (int64_t c = c0; c < c1; ++c) add(hc.h + c * bins, static_cast<int32_t>(nv));
    } else if (outer_counts) {
      const int64_t last = hc.hs->ni;
      for (int64_t c = c0; c < c1; ++c) {
        add(hc.h + c * bins, tb.out0[c]);
        add(hc.h + c * bins + last, tb.outL[c]);
      }
    }
  }
}

void check_out(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t K, int64_t C) {
  TORCH_CHECK(t.device().is_cpu(), "accumulate_stats_partials: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "accumulate_stats_partials: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == C, "accumulate_stats_partials: ", name,
              " must have shape [", K, ", ", C, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "accumulate_stats_partials: ", name, " must be contiguous");
}

void check_index(const at::Tensor& t, const char* name, int64_t K) {
  TORCH_CHECK(t.device().is_cpu(), "accumulate_stats_partials: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, "accumulate_stats_partials: ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == K && t.is_contiguous(), "accumulate_stats_partials: ", name,
              " must be a contiguous [", K, "] tensor, got ", t.sizes());
}

}  // namespace

// ------------------------------------------------------------------------------------------
void accumulate_stats_partials(const at::Tensor& x, const at::Tensor& valid, const at::Tensor& start,
                               const at::Tensor& length, const at::Tensor& persona,
                               const c10::optional<at::Tensor>& edges_opt, const c10::optional<at::Tensor>& hist_opt,
                               at::Tensor& sum, at::Tensor& mean, at::Tensor& m2, at::Tensor& sumsq,
                               at::Tensor& sumabs, at::Tensor& pos, at::Tensor& mn, at::Tensor& mx, at::Tensor& amx,
                               int64_t num_threads, int64_t min_slice, int64_t block, int64_t order, int64_t vector_hist_opt,
                               int64_t private_budget) {
  // ---- validation ----
  TORCH_CHECK(x.device().is_cpu(), "accumulate_stats_partials: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "accumulate_stats_partials: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, "accumulate_stats_partials: x must be [B, T, C], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "accumulate_stats_partials: x must be contiguous");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), R = B * T;
  TORCH_CHECK(C >= 1, "accumulate_stats_partials: x needs at least one channel");
  TORCH_CHECK(valid.device().is_cpu() && valid.scalar_type() == at::kBool,
              "accumulate_stats_partials: valid must be a CPU bool tensor, got ", valid.scalar_type(), " on ",
              valid.device());
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == B && valid.size(1) == T && valid.is_contiguous(),
              "accumulate_stats_partials: valid must be a contiguous [", B, ", ", T, "] tensor, got ", valid.sizes());
  const int64_t K = start.numel();
  check_index(start, "start", K);
  check_index(length, "length", K);
  check_index(persona, "persona", K);
  check_out(sum, "sum", at::kFloat, K, C);
  TORCH_CHECK(mean.scalar_type() == at::kDouble || mean.scalar_type() == at::kFloat,
              "accumulate_stats_partials: mean must be float64 (or float32), got ", mean.scalar_type());
  check_out(mean, "mean", mean.scalar_type(), K, C);
  check_out(m2, "m2", at::kFloat, K, C);
  check_out(sumsq, "sumsq", at::kFloat, K, C);
  check_out(sumabs, "sumabs", at::kFloat, K, C);
  check_out(pos, "pos", at::kInt, K, C);
  check_out(mn, "min", at::kFloat, K, C);
  check_out(mx, "max", at::kFloat, K, C);
  check_out(amx, "absmax", at::kFloat, K, C);

  const int64_t* st = start.data_ptr<int64_t>();
  const int64_t* ln = length.data_ptr<int64_t>();
  const int64_t* pe = persona.data_ptr<int64_t>();
  int64_t rows_total = 0, max_len = 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(st[k] >= 0 && ln[k] >= 0 && st[k] + ln[k] <= R, "accumulate_stats_partials: chunk ", k, " (start ",
                st[k], ", length ", ln[k], ") lies outside the ", R, " rows of x");
    rows_total += ln[k];
    max_len = std::max(max_len, ln[k]);
  }

  TORCH_CHECK(edges_opt.has_value() == hist_opt.has_value(),
              "accumulate_stats_partials: edges and hist must be given together");
  const bool has_hist = edges_opt.has_value();
  HistSearch hs;
  int32_t* hist = nullptr;
  int64_t P = 0;
  if (has_hist) {
    const at::Tensor& edges = *edges_opt;
    const at::Tensor& h = *hist_opt;
    TORCH_CHECK(edges.device().is_cpu() && edges.scalar_type() == at::kFloat && edges.dim() == 1 &&
                    edges.is_contiguous(),
                "accumulate_stats_partials: edges must be a contiguous 1-D float32 CPU tensor");
    const int64_t E = edges.numel();
    TORCH_CHECK(E >= 2 && E <= (int64_t(1) << 24), "accumulate_stats_partials: edges need 2 .. 2^24 values, got ", E);
    const float* e = edges.data_ptr<float>();
    for (int64_t i = 0; i + 1 < E; ++i)
      TORCH_CHECK(e[i + 1] > e[i], "accumulate_stats_partials: edges must be strictly increasing (edges[", i + 1,
                  "] = ", e[i + 1], " after ", e[i], ")");
    TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kInt && h.dim() == 3 && h.size(1) == C &&
                    h.size(2) == E - 1 && h.is_contiguous(),
                "accumulate_stats_partials: hist must be a contiguous int32 [P, ", C, ", ", E - 1,
                "] CPU tensor, got ", h.scalar_type(), " ", h.sizes());
    P = h.size(0);
    for (int64_t k = 0; k < K; ++k)
      TORCH_CHECK(pe[k] >= 0 && pe[k] < P, "accumulate_stats_partials: persona ", pe[k], " of chunk ", k,
                  " is outside [0, ", P, ")");
    hist = h.data_ptr<int32_t>();
    hs = make_hist_search(e, E);
  }
  if (K == 0) return;

  Acc base{sum.data_ptr<float>(), nullptr, m2.data_ptr<float>(), sumsq.data_ptr<float>(),
           sumabs.data_ptr<float>(), pos.data_ptr<int32_t>(), mn.data_ptr<float>(), mx.data_ptr<float>(),
           amx.data_ptr<float>()};
  const bool* vp = valid.data_ptr<bool>();
  double* mean64 = mean.scalar_type() == at::kDouble ? mean.data_ptr<double>() : nullptr;
  float* mean32 = mean.scalar_type() == at::kFloat ? mean.data_ptr<float>() : nullptr;

  // ---- decomposition: S channel slices x G chunk groups ----
  int64_t nthreads = num_threads > 0 ? num_threads : at::get_num_threads();
  if (rows_total * C < kSerialElements) nthreads = 1;
  nthreads = std::max<int64_t>(1, nthreads);
  const int64_t nvec = (C + kVec - 1) / kVec;
  const int64_t slice_vecs = std::max<int64_t>(1, (min_slice > 0 ? min_slice : 256) / kVec);
  const int64_t S = std::max<int64_t>(1, std::min({nthreads, nvec / slice_vecs, nvec}));
  const int64_t G = std::max<int64_t>(1, std::min(nthreads / S, K));
  const int64_t hist_elems = P * C * hs.bins;
  const int64_t budget = private_budget >= 0 ? private_budget : kPrivateHistBudget;
  const bool use_private = has_hist && G > 1 && (G - 1) * hist_elems * 4 <= budget;
  const bool use_atomic = has_hist && G > 1 && !use_private;
  std::vector<int32_t> priv;
  if (use_private) priv.assign(static_cast<size_t>((G - 1) * hist_elems), 0);
  const int64_t blk = std::max<int64_t>(kLanes, block > 0 ? block : kBlock);
  const bool outer = order > 0;
  // the vector histogram addresses a block's cells with int32 offsets
  const bool vector_hist = kVectorHist && vector_hist_opt != 0 && blk * hs.bins < (int64_t(1) << 31) - 16 * hs.bins;
  HistKernel hk;
  if (has_hist) hk = use_atomic ? pick_hist_kernel<true>(hs, vector_hist) : pick_hist_kernel<false>(hs, vector_hist);
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[S]);
  for (int64_t s = 0; s < S; ++s) next[s].store(0);

  auto run = [&](auto* xp, int64_t tid) {
    const int64_t s = tid % S, g = tid / S;
    const int64_t c0 = std::min(C, kVec * ((nvec * s) / S));
    const int64_t c1 = std::min(C, kVec * ((nvec * (s + 1)) / S));
    int32_t* hbase = !has_hist ? nullptr : (use_private && g > 0 ? priv.data() + (g - 1) * hist_elems : hist);
    ThreadBuffers tb;
    tb.scratch.reset(new float[kTile * blk]);
    tb.addr.reset(new int32_t[kTile * blk + 16]);
    tb.vals.reset(new float[kTile * blk + 16]);
    HistCtx hc;
    hc.kernel = hk;
    hc.atomic = use_atomic;
    hc.hs = &hs;
    tb.rows.reserve(static_cast<size_t>(max_len));
    for (;;) {
      const int64_t k = next[s].fetch_add(1, std::memory_order_relaxed);
      if (k >= K) break;
      hc.h = hbase == nullptr ? nullptr : hbase + pe[k] * C * hs.bins;
      process_chunk(xp, C, vp, st[k], ln[k], c0, c1, base.at(k * C), mean64 ? mean64 + k * C : nullptr,
                    mean32 ? mean32 + k * C : nullptr, hc, tb, blk, outer);
    }
  };
  std::exception_ptr error;
  auto launch = [&](auto* xp) {
    const int64_t team = S * G;
    if (team == 1) {
      run(xp, 0);
      return;
    }
#pragma omp parallel num_threads(static_cast<int>(team))
    {
#ifdef _OPENMP
      const int64_t tid = omp_get_thread_num();
      const int64_t got = omp_get_num_threads();
#else
      const int64_t tid = 0, got = 1;
#endif
      // a runtime that gave fewer threads than asked: the present ones take the rest
      try {
        for (int64_t t = tid; t < team; t += got) run(xp, t);
      } catch (...) {  // an exception must not leave the parallel region (std::terminate)
#pragma omp critical(accumulate_stats_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  };
  switch (x.scalar_type()) {
    case at::kFloat: launch(x.data_ptr<float>()); break;
    case at::kHalf: launch(x.data_ptr<c10::Half>()); break;
    case at::kBFloat16: launch(x.data_ptr<c10::BFloat16>()); break;
    default: TORCH_CHECK(false, "unreachable");
  }

  if (use_private) {
    const int64_t copies = G - 1;
#pragma omp parallel for num_threads(static_cast<int>(nthreads)) schedule(static)
    for (int64_t i = 0; i < hist_elems; ++i) {
      int32_t a = hist[i];
      for (int64_t j = 0; j < copies; ++j) a += priv[j * hist_elems + i];
      hist[i] = a;
    }
  }
}

// how the histogram bins of `edges` are searched: (mode, comparisons after the table, cells)
std::tuple<std::string, int64_t, int64_t> hist_search_info(const at::Tensor& edges) {
  TORCH_CHECK(edges.device().is_cpu() && edges.scalar_type() == at::kFloat && edges.dim() == 1 &&
                  edges.is_contiguous() && edges.numel() >= 2,
              "hist_search_info: edges must be a contiguous 1-D float32 CPU tensor of at least 2 values");
  const HistSearch h = make_hist_search(edges.data_ptr<float>(), edges.numel());
  const char* mode = h.mode == HistMode::kSingleBin ? "single" : h.mode == HistMode::kLut ? "table" : "binary_search";
  return {mode, h.steps, h.mode == HistMode::kLut ? static_cast<int64_t>(h.cells) : 0};
}

void register_accumulate_stats(pybind11::module_& m) {
  m.def("accumulate_stats_partials", &accumulate_stats_partials,
        "accumulate_stats stage 1: fill the chunk partials (sum, mean, m2, sumsq, sumabs, pos, min, max, absmax) "
        "over the valid rows of each chunk of x [B, T, C], and add the histogram counts into hist [P, C, E-1].",
        py::arg("x"), py::arg("valid"), py::arg("start"), py::arg("length"), py::arg("persona"), py::arg("edges"),
        py::arg("hist"), py::arg("sum"), py::arg("mean"), py::arg("m2"), py::arg("sumsq"), py::arg("sumabs"),
        py::arg("pos"), py::arg("min"), py::arg("max"), py::arg("absmax"), py::arg("num_threads") = -1,
        py::arg("min_slice") = 256, py::arg("block") = -1, py::arg("order") = 0, py::arg("vector_hist") = 1,
        py::arg("private_budget") = -1, py::call_guard<py::gil_scoped_release>());
  m.def("hist_search_info", &hist_search_info, "how accumulate_stats_partials searches the bins of `edges`: "
        "(mode, comparisons after the table lookup, table cells)", py::arg("edges"));
  m.attr("vector_histogram") = py::bool_(kVectorHist);
}
