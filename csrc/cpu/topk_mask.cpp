// Per-row top-k masks with a deterministic tie rule, and the mask methods' scores fused into
// the selection. Per-row top-k mask: rank each row by (score desc, column asc)
// and keep the first k. One std::nth_element per row over (value, column) pairs, rows in
// parallel with OpenMP. Bit-identical to the PyTorch reference (kthvalue + lowest-column ties)
// because the order is total.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

namespace {

template <typename scalar_t>
struct Entry {
  scalar_t value;
  int64_t column;
};

template <typename scalar_t>
void topk_rows(const scalar_t* score, bool* keep, int64_t rows, int64_t n, int64_t k) {
#pragma omp parallel
  {
    std::vector<Entry<scalar_t>> buf(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = score + r * n;
      bool* out = keep + r * n;
      for (int64_t j = 0; j < n; ++j) buf[j] = {s[j], j};
      auto before = [](const Entry<scalar_t>& a, const Entry<scalar_t>& b) {
        return a.value > b.value || (a.value == b.value && a.column < b.column);
      };
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), before);
      std::fill(out, out + n, false);
      for (int64_t j = 0; j < k; ++j) out[buf[j].column] = true;
    }
  }
}

// Lexicographic form: (score desc, tie_break desc, column asc). Contrastive-Wanda's rows tie
// at relu(z) = 0 over most of their length; the persona's Wanda score orders those ties.
template <typename scalar_t>
struct LexEntry {
  scalar_t value;
  scalar_t second;
  int64_t column;
};

template <typename scalar_t>
void topk_rows_lex(const scalar_t* score, const scalar_t* tie, bool* keep, int64_t rows, int64_t n, int64_t k) {
#pragma omp parallel
  {
    std::vector<LexEntry<scalar_t>> buf(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = score + r * n;
      const scalar_t* t = tie + r * n;
      bool* out = keep + r * n;
      for (int64_t j = 0; j < n; ++j) buf[j] = {s[j], t[j], j};
      auto before = [](const LexEntry<scalar_t>& a, const LexEntry<scalar_t>& b) {
        if (a.value != b.value) return a.value > b.value;
        if (a.second != b.second) return a.second > b.second;
        return a.column < b.column;
      };
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), before);
      std::fill(out, out + n, false);
      for (int64_t j = 0; j < k; ++j) out[buf[j].column] = true;
    }
  }
}

// ---- scores and selection in one pass per row (the mask methods, per-row granularity) -------
// Each row's scores are computed into a thread-local buffer and selected by threshold: the k-th
// largest key by nth_element over the values alone, every key above it kept, and the keys equal
// to it taken by the tie rule: the lower column, or the higher second key then the lower column,
// or (ties_high) the higher column. The same total orders as topk_rows / topk_rows_lex.

template <typename T>
struct RowSelect {
  std::vector<T> tmp;
  std::vector<int64_t> tied;

  void operator()(const T* key, const T* second, bool ties_high, int64_t n, int64_t k, bool* out) {
    tmp.assign(key, key + n);
    std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), std::greater<T>());
    const T thr = tmp[k - 1];
    int64_t need = k;
    tied.clear();
    for (int64_t j = 0; j < n; ++j) {
      out[j] = key[j] > thr;
      need -= out[j];
      if (key[j] == thr) tied.push_back(j);
    }
    if (second != nullptr && need < static_cast<int64_t>(tied.size())) {
      std::nth_element(tied.begin(), tied.begin() + (need - 1), tied.end(), [second](int64_t a, int64_t b) {
        return second[a] > second[b] || (second[a] == second[b] && a < b);
      });
      for (int64_t i = 0; i < need; ++i) out[tied[i]] = true;
    } else if (ties_high) {
      for (int64_t i = static_cast<int64_t>(tied.size()) - 1; i >= 0 && need > 0; --i, --need) out[tied[i]] = true;
    } else {
      for (int64_t i = 0; i < static_cast<int64_t>(tied.size()) && need > 0; ++i, --need) out[tied[i]] = true;
    }
  }
};

template <typename W>
inline float absf(W v) {
  return std::fabs(static_cast<float>(v));
}

// Rows in parallel, each with its own selector and scratch rows: body(row weights, selector,
// scratch, r) for every row r.
template <typename T, typename W, typename Body>
void for_each_row(const W* w, int64_t rows, int64_t n, int scratch_rows, Body body) {
#pragma omp parallel
  {
    RowSelect<T> sel;
    std::vector<std::vector<T>> scratch(scratch_rows, std::vector<T>(n));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) body(w + r * n, sel, scratch, r);
  }
}

template <typename W>
void wanda_rows(const W* w, const float* a, bool* keep, int64_t rows, int64_t n, int64_t k) {
  for_each_row<float>(w, rows, n, 1, [&](const W* wr, RowSelect<float>& sel, auto& s, int64_t r) {
    for (int64_t j = 0; j < n; ++j) s[0][j] = absf(wr[j]) * a[j];
    sel(s[0].data(), nullptr, false, n, k, keep + r * n);
  });
}

// Contrastive-Wanda: keys |W| g+ and |W| g-; ties (relu(z) = 0) by the persona's |W| A, then column.
template <typename W>
void contrastive_wanda_rows(const W* w, const float* gp, const float* gn, const float* ap, const float* an, bool* kp,
                            bool* kn, int64_t rows, int64_t n, int64_t k) {
  for_each_row<float>(w, rows, n, 2, [&](const W* wr, RowSelect<float>& sel, auto& s, int64_t r) {
    for (const auto& [g, a, out] : {std::tuple{gp, ap, kp}, std::tuple{gn, an, kn}}) {
      for (int64_t j = 0; j < n; ++j) {
        const float m = absf(wr[j]);
        s[0][j] = m * g[j];
        s[1][j] = m * a[j];
      }
      sel(s[0].data(), s[1].data(), false, n, k, out + r * n);
    }
  });
}

// Contrastive-Sparse: D = S+ / sum(S+) - S- / sum(S-) in float64 (sums left to right); + keeps the
// k largest D (ties to the lower column), - the k smallest (ties to the higher column).
template <typename W>
void contrastive_sparse_rows(const W* w, const float* ap, const float* an, bool* kp, bool* kn, int64_t rows, int64_t n,
                             int64_t k) {
  for_each_row<double>(w, rows, n, 3, [&](const W* wr, RowSelect<double>& sel, auto& s, int64_t r) {
    double tp = 0.0, tn = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const float m = absf(wr[j]);
      s[0][j] = static_cast<double>(m * ap[j]);
      s[1][j] = static_cast<double>(m * an[j]);
      tp += s[0][j];
      tn += s[1][j];
    }
    tp = std::max(tp, 1e-300);
    tn = std::max(tn, 1e-300);
    for (int64_t j = 0; j < n; ++j) s[2][j] = s[0][j] / tp - s[1][j] / tn;
    sel(s[2].data(), nullptr, false, n, k, kp + r * n);
    for (int64_t j = 0; j < n; ++j) s[2][j] = -s[2][j];
    sel(s[2].data(), nullptr, true, n, k, kn + r * n);
  });
}

// The released Contrastive-Sparse: one score |W| c; + its top-k, - the top-k of the rest (the +
// entries at -inf, so past half a row - takes them back, lowest columns first).
template <typename W>
void contrastive_sparse_code_rows(const W* w, const float* c, bool* kp, bool* kn, int64_t rows, int64_t n, int64_t k) {
  for_each_row<float>(w, rows, n, 1, [&](const W* wr, RowSelect<float>& sel, auto& s, int64_t r) {
    for (int64_t j = 0; j < n; ++j) s[0][j] = absf(wr[j]) * c[j];
    bool* p = kp + r * n;
    sel(s[0].data(), nullptr, false, n, k, p);
    for (int64_t j = 0; j < n; ++j) s[0][j] = p[j] ? -std::numeric_limits<float>::infinity() : s[0][j];
    sel(s[0].data(), nullptr, false, n, k, kn + r * n);
  });
}

template <typename F>
void dispatch_weight(const torch::Tensor& w, F&& f) {
  switch (w.scalar_type()) {
    case torch::kFloat32: f(w.data_ptr<float>()); break;
    case torch::kFloat16: f(w.data_ptr<at::Half>()); break;
    case torch::kBFloat16: f(w.data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "mask selection (cpp): weight must be float32, float16 or bfloat16");
  }
}

void check_rows(const torch::Tensor& w, int64_t k, std::initializer_list<torch::Tensor> vecs) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2, "mask selection (cpp): weight must be a 2-D CPU tensor");
  TORCH_CHECK(k >= 1 && k < w.size(1), "mask selection (cpp): k must be in [1, in)");
  for (const auto& v : vecs) {
    TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == torch::kFloat32 && v.dim() == 1 && v.size(0) == w.size(1),
                "mask selection (cpp): per-input vectors must be float32 [in] on the CPU");
  }
}

}  // namespace

torch::Tensor wanda_topk(const torch::Tensor& weight, const torch::Tensor& act, int64_t k) {
  check_rows(weight, k, {act});
  auto w = weight.contiguous();
  auto a = act.contiguous();
  auto keep = torch::empty(w.sizes(), w.options().dtype(torch::kBool));
  dispatch_weight(w, [&](auto* p) { wanda_rows(p, a.data_ptr<float>(), keep.data_ptr<bool>(), w.size(0), w.size(1), k); });
  return keep;
}

std::vector<torch::Tensor> contrastive_wanda_topk(const torch::Tensor& weight, const torch::Tensor& g_pos,
                                                  const torch::Tensor& g_neg, const torch::Tensor& a_pos,
                                                  const torch::Tensor& a_neg, int64_t k) {
  check_rows(weight, k, {g_pos, g_neg, a_pos, a_neg});
  auto w = weight.contiguous();
  auto kp = torch::empty(w.sizes(), w.options().dtype(torch::kBool));
  auto kn = torch::empty_like(kp);
  auto gp = g_pos.contiguous(), gn = g_neg.contiguous(), ap = a_pos.contiguous(), an = a_neg.contiguous();
  dispatch_weight(w, [&](auto* p) {
    contrastive_wanda_rows(p, gp.data_ptr<float>(), gn.data_ptr<float>(), ap.data_ptr<float>(), an.data_ptr<float>(),
                           kp.data_ptr<bool>(), kn.data_ptr<bool>(), w.size(0), w.size(1), k);
  });
  return {kp, kn};
}

std::vector<torch::Tensor> contrastive_sparse_topk(const torch::Tensor& weight, const torch::Tensor& a_pos,
                                                   const torch::Tensor& a_neg, int64_t k) {
  check_rows(weight, k, {a_pos, a_neg});
  auto w = weight.contiguous();
  auto kp = torch::empty(w.sizes(), w.options().dtype(torch::kBool));
  auto kn = torch::empty_like(kp);
  auto ap = a_pos.contiguous(), an = a_neg.contiguous();
  dispatch_weight(w, [&](auto* p) {
    contrastive_sparse_rows(p, ap.data_ptr<float>(), an.data_ptr<float>(), kp.data_ptr<bool>(), kn.data_ptr<bool>(),
                            w.size(0), w.size(1), k);
  });
  return {kp, kn};
}

std::vector<torch::Tensor> contrastive_sparse_code_topk(const torch::Tensor& weight, const torch::Tensor& contrast, int64_t k) {
  check_rows(weight, k, {contrast});
  auto w = weight.contiguous();
  auto kp = torch::empty(w.sizes(), w.options().dtype(torch::kBool));
  auto kn = torch::empty_like(kp);
  auto c = contrast.contiguous();
  dispatch_weight(w, [&](auto* p) {
    contrastive_sparse_code_rows(p, c.data_ptr<float>(), kp.data_ptr<bool>(), kn.data_ptr<bool>(), w.size(0), w.size(1), k);
  });
  return {kp, kn};
}

torch::Tensor topk_mask_lex(const torch::Tensor& score, const torch::Tensor& tie_break, int64_t k) {
  TORCH_CHECK(score.device().is_cpu() && tie_break.device().is_cpu(), "topk_mask_lex (cpp): tensors must be on the CPU");
  TORCH_CHECK(score.dim() == 2 && tie_break.sizes() == score.sizes(), "topk_mask_lex (cpp): 2-D score and tie_break of one shape");
  TORCH_CHECK(score.scalar_type() == tie_break.scalar_type() &&
                  (score.scalar_type() == torch::kFloat32 || score.scalar_type() == torch::kFloat64),
              "topk_mask_lex (cpp): float32 or float64 score and tie_break of the same dtype");
  const int64_t rows = score.size(0), n = score.size(1);
  TORCH_CHECK(k >= 1 && k < n, "topk_mask_lex (cpp): k must be in [1, n)");
  auto s = score.contiguous();
  auto t = tie_break.contiguous();
  auto keep = torch::empty({rows, n}, score.options().dtype(torch::kBool));
  if (score.scalar_type() == torch::kFloat32) {
    topk_rows_lex<float>(s.data_ptr<float>(), t.data_ptr<float>(), keep.data_ptr<bool>(), rows, n, k);
  } else {
    topk_rows_lex<double>(s.data_ptr<double>(), t.data_ptr<double>(), keep.data_ptr<bool>(), rows, n, k);
  }
  return keep;
}

torch::Tensor topk_mask(const torch::Tensor& score, int64_t k) {
  TORCH_CHECK(score.device().is_cpu(), "topk_mask (cpp): score must be on the CPU");
  TORCH_CHECK(score.dim() == 2, "topk_mask (cpp): score must be 2-D [rows, n]");
  TORCH_CHECK(score.scalar_type() == torch::kFloat32 || score.scalar_type() == torch::kFloat64,
              "topk_mask (cpp): score must be float32 or float64");
  const int64_t rows = score.size(0), n = score.size(1);
  TORCH_CHECK(k >= 1 && k < n, "topk_mask (cpp): k must be in [1, n)");
  auto s = score.contiguous();
  auto keep = torch::empty({rows, n}, score.options().dtype(torch::kBool));
  if (score.scalar_type() == torch::kFloat32) {
    topk_rows<float>(s.data_ptr<float>(), keep.data_ptr<bool>(), rows, n, k);
  } else {
    topk_rows<double>(s.data_ptr<double>(), keep.data_ptr<bool>(), rows, n, k);
  }
  return keep;
}

void register_topk_mask(pybind11::module_& m) {
  m.def("topk_mask", &topk_mask, "per-row top-k mask, ties to the lower column", pybind11::arg("score"),
        pybind11::arg("k"));
  m.def("topk_mask_lex", &topk_mask_lex, "per-row top-k mask by (score desc, tie_break desc, column asc)",
        pybind11::arg("score"), pybind11::arg("tie_break"), pybind11::arg("k"));
  m.def("wanda_topk", &wanda_topk, "per-row top-k of |W| a, scored and selected in one pass");
  m.def("contrastive_wanda_topk", &contrastive_wanda_topk, "Contrastive-Wanda's two masks in one pass");
  m.def("contrastive_sparse_topk", &contrastive_sparse_topk, "Contrastive-Sparse's disjoint masks in one pass");
  m.def("contrastive_sparse_code_topk", &contrastive_sparse_code_topk, "the released Contrastive-Sparse in one pass");
}
