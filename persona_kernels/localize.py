"""Layer localization of persona representations (after arXiv 2505.24539).

Each persona is described by a set of statements. Every statement goes through the model
(as a system message of the tokenizer's chat template when it has one) and the hidden state of
its last real token is kept at every layer. Per layer we then ask how well the personas separate:

* PCA of the states (top components and their explained-variance ratio);
* clustering metrics: silhouette, Calinski-Harabasz, Davies-Bouldin, distance between centroids;
* the held-out accuracy of a linear classifier (stratified k-fold, multinomial logistic regression).

Everything is plain torch (float64 for the metrics); scikit-learn is not needed. Layer index ``i``
is ``hidden_states[i]`` of a transformers model: 0 is the embedding output, ``i >= 1`` the output
of decoder block ``i - 1``.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .hf import max_positions, padded_inputs
from .io import atomic_write, atomic_write_text

METRIC_SPACES = ("full", "pca")
# metric name -> True when a higher value means the personas are further apart
METRICS = {
    "silhouette": True,
    "calinski_harabasz": True,
    "davies_bouldin": False,
    "centroid_distance": True,
    "cv_accuracy": True,
}


@dataclass
class LocalizeConfig:
    """How to localize.

    batch_size, max_length: batching and tokenisation (longer statements are truncated).
    pca_components:   PCA components kept per layer (clipped to the number of statements and
                      the hidden size).
    cv_folds:         folds of the classifier's stratified cross-validation. When a persona has
                      fewer statements than that, the folds drop to the smallest persona's
                      statement count (every persona needs at least 2).
    seed:             seed of the fold assignment (the classifier itself is deterministic).
    use_chat_template: put each statement in a system message through the tokenizer's chat
                      template when it has one; otherwise (or when False) the raw statement.
    add_generation_prompt: passed to the chat template. False (default) keeps the last token
                      inside the system turn.
    metric_space:     'full' (default): silhouette, Calinski-Harabasz, Davies-Bouldin and the
                      centroid distance use the full hidden states; 'pca': they use the
                      ``pca_components``-dimensional PCA projection. The classifier always uses
                      the full states.
    cv_l2:            L2 strength of the classifier, as scikit-learn's ``1 / C``.
    cv_steps:         LBFGS iterations of the classifier per fold.
    """

    batch_size: int = 8
    max_length: int = 256
    pca_components: int = 2
    cv_folds: int = 5
    seed: int = 0
    use_chat_template: bool = True
    add_generation_prompt: bool = False
    metric_space: str = "full"
    cv_l2: float = 1.0
    cv_steps: int = 100

    def __post_init__(self):
        for name in ("batch_size", "max_length", "pca_components", "cv_steps"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("cv_folds", self.cv_folds)
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be at least 2, got {self.cv_folds}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.metric_space not in METRIC_SPACES:
            raise ValueError(f"metric_space must be one of {METRIC_SPACES}, got {self.metric_space!r}")
        if not isinstance(self.cv_l2, (int, float)) or not math.isfinite(self.cv_l2) or self.cv_l2 < 0:
            raise ValueError(f"cv_l2 must be a finite number >= 0, got {self.cv_l2!r}")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- hidden states

def _check_statements(statements_by_persona: Mapping[str, Sequence[str]]) -> None:
    """Raise ValueError unless there are >= 2 personas, each with >= 2 non-empty statements."""
    if not isinstance(statements_by_persona, Mapping):
        raise ValueError("statements_by_persona must be a mapping {persona: [statement, ...]}")
    if len(statements_by_persona) < 2:
        raise ValueError(f"need at least 2 personas to compare, got {len(statements_by_persona)}")
    for persona, statements in statements_by_persona.items():
        if isinstance(statements, str) or not isinstance(statements, Sequence):
            raise ValueError(f"persona {persona!r}: statements must be a list of strings")
        if len(statements) < 2:
            raise ValueError(f"persona {persona!r}: need at least 2 statements, got {len(statements)}")
        for i, s in enumerate(statements):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"persona {persona!r}: statement {i} is empty or not a string")


def _format(tokenizer, statement: str, config: LocalizeConfig) -> str:
    """The text fed to the model: the statement as a system message, or the raw statement."""
    if not (config.use_chat_template and getattr(tokenizer, "chat_template", None)):
        return statement
    messages = [{"role": "system", "content": statement}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=config.add_generation_prompt)
    except Exception as exc:  # e.g. templates that reject the system role
        raise ValueError(f"the tokenizer's chat template failed on a system message ({exc}); "
                         "pass use_chat_template=False to use raw statements") from exc


def _last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended position, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.int64) * positions).argmax(1)


def last_token_states(model, tokenizer, statements_by_persona: Mapping[str, Sequence[str]],
                      config: Optional[LocalizeConfig] = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Hidden state of each statement's last real token at every layer.

    Returns ``(H, labels, personas)``: H is float32 [num_hidden_states, N, hidden] on the CPU
    (num_hidden_states = layers + 1, the embeddings first), labels int64 [N] indexes
    ``personas`` (the mapping's keys, in order); statements keep the mapping's order.
    The tokenizer's padding side is respected; a missing pad token is borrowed from EOS for
    the call, and the model's train/eval mode is restored afterwards.
    """
    cfg = config or LocalizeConfig()
    _check_statements(statements_by_persona)
    personas = list(statements_by_persona)
    texts = [_format(tokenizer, s, cfg) for p in personas for s in statements_by_persona[p]]
    labels = torch.tensor([i for i, p in enumerate(personas) for _ in statements_by_persona[p]], dtype=torch.int64)
    # a chat template already holds its special tokens
    add_special = not (cfg.use_chat_template and getattr(tokenizer, "chat_template", None))
    # similar lengths together keep padding small
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]

    pad_added = tokenizer.pad_token is None
    if pad_added:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    H = None
    try:
        for batch in batches:
            with torch.inference_mode():
                states = _batch_states(model, tokenizer, [texts[i] for i in batch], cfg, add_special, device)
            # H is allocated outside inference mode so callers may modify it in place
            if H is None:
                H = torch.empty(states.shape[0], len(texts), states.shape[2], dtype=torch.float32)
            H[:, batch] = states
    finally:
        model.train(was_training)
        if pad_added:
            tokenizer.pad_token = None
    return H, labels, personas


def _batch_states(model, tokenizer, texts: list[str], cfg: LocalizeConfig, add_special: bool,
                  device) -> torch.Tensor:
    """[num_hidden_states, len(texts), hidden] float32 CPU states of one batch's last real tokens."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                    max_length=min(cfg.max_length, max_positions(model) or cfg.max_length),
                    add_special_tokens=add_special)
    ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if not bool((attn.sum(1) > 0).all()):
        raise ValueError("a statement tokenised to no tokens at all")
    # positions count real tokens only, so a left-padded row sees the same positions as alone
    out = model(input_ids=ids, **padded_inputs(model, attn), output_hidden_states=True, use_cache=False)
    rows = torch.arange(ids.shape[0], device=device)
    last = _last_real_index(attn)
    return torch.stack([h[rows, last] for h in out.hidden_states]).float().cpu()


# --------------------------------------------------------------------------- metrics

def _prepare(X: torch.Tensor, y: torch.Tensor, min_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor, int]:
    """X as float64 [N, D], y as contiguous class ids 0..K-1, and K; ValueError on bad shapes."""
    X = torch.as_tensor(X)
    y = torch.as_tensor(y)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"expected X [N, D] and y [N], got {tuple(X.shape)} and {tuple(y.shape)}")
    X = X.detach().to(torch.float64)
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X holds NaN or infinite values")
    _, y = torch.unique(y.detach().cpu(), return_inverse=True)
    y = y.to(X.device)
    k = int(y.max()) + 1 if y.numel() else 0
    if k < min_classes:
        raise ValueError(f"need at least {min_classes} classes, got {k}")
    return X, y, k


def _centroids(X: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means [K, D] and class sizes [K] (float64)."""
    counts = torch.bincount(y, minlength=k).to(X.dtype)
    sums = torch.zeros(k, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, y, X)
    return sums / counts[:, None], counts


def _pairwise_distances(X: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix [N, N]; the data is centred first to limit cancellation."""
    Xc = X - X.mean(0)
    sq = (Xc * Xc).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * Xc @ Xc.T).clamp_min_(0)
    d2.fill_diagonal_(0)
    return d2.sqrt()


def pca(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` principal components of ``X`` [N, D] via SVD of the centred data.

    Returns ``(projected [N, k], explained_variance_ratio [k])`` in float64. Signs are fixed so
    that each component's largest-magnitude loading is positive (deterministic output). Data
    with no variance gets ratios of 0.
    """
    X = torch.as_tensor(X).detach().to(torch.float64)
    if X.ndim != 2:
        raise ValueError(f"expected X [N, D], got {tuple(X.shape)}")
    if not isinstance(k, int) or not 1 <= k <= min(X.shape):
        raise ValueError(f"k must be an int in [1, min(N, D) = {min(X.shape)}], got {k!r}")
    Xc = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    Vh = Vh[:k]
    signs = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))
    Vh = Vh * torch.where(signs == 0, torch.ones_like(signs), signs)
    var = S * S
    total = var.sum()
    ratio = var[:k] / total if total > 0 else torch.zeros(k, dtype=X.dtype, device=X.device)
    return Xc @ Vh.T, ratio


def silhouette(X: torch.Tensor, y: torch.Tensor) -> float:
    """Mean silhouette coefficient (Euclidean), in [-1, 1]; higher = better separated.

    s(i) = (b - a) / max(a, b) with a the mean distance from i to the other points of its class
    and b the smallest mean distance to another class. Points of a singleton class, and points
    with a = b = 0, count as 0. Needs 2 <= classes <= N - 1; memory is O(N^2).
    """
    X, y, k = _prepare(X, y)
    n = X.shape[0]
    if k > n - 1:
        raise ValueError(f"silhouette needs at most N - 1 = {n - 1} classes, got {k}")
    onehot = F.one_hot(y, k).to(X.dtype)
    counts = onehot.sum(0)
    class_sums = _pairwise_distances(X) @ onehot  # [N, K]: summed distance from i to each class
    own = onehot.bool()
    a = class_sums[own] / (counts[y] - 1).clamp_min(1)
    b = (class_sums / counts).masked_fill(own, math.inf).min(1).values
    denom = torch.maximum(a, b)
    s = torch.where(denom > 0, (b - a) / denom.clamp_min(torch.finfo(X.dtype).tiny), torch.zeros_like(a))
    s = torch.where(counts[y] > 1, s, torch.zeros_like(s))
    return float(s.mean())


def calinski_harabasz(X: torch.Tensor, y: torch.Tensor) -> float:
    """Calinski-Harabasz index: (B / (K - 1)) / (W / (N - K)); higher = better separated.

    B is the between-class dispersion (sum of n_j |c_j - c|^2), W the within-class one. When
    all centroids coincide (B = 0) it is 0; when B > 0 and every class is a single point
    repeated (W = 0) it is +inf. Needs N > K >= 2.
    """
    X, y, k = _prepare(X, y)
    n = X.shape[0]
    if n <= k:
        raise ValueError(f"calinski_harabasz needs more points than classes, got N={n}, K={k}")
    centroids, counts = _centroids(X, y, k)
    between = float((counts * ((centroids - X.mean(0)) ** 2).sum(1)).sum())
    within = float(((X - centroids[y]) ** 2).sum())
    if between == 0:
        return 0.0
    if within == 0:
        return math.inf
    return (between / (k - 1)) / (within / (n - k))


def davies_bouldin(X: torch.Tensor, y: torch.Tensor) -> float:
    """Davies-Bouldin index: mean over classes of max_j (s_i + s_j) / |c_i - c_j|; lower = better.

    s_i is the mean distance of class i's points to their centroid. Coinciding centroids give
    that pair a ratio of +inf (the classes cannot be told apart).
    """
    X, y, k = _prepare(X, y)
    centroids, counts = _centroids(X, y, k)
    spread = torch.zeros(k, dtype=X.dtype, device=X.device).index_add_(0, y, (X - centroids[y]).norm(dim=1)) / counts
    gaps = torch.cdist(centroids, centroids, compute_mode="donot_use_mm_for_euclid_dist")
    ratios = torch.where(gaps > 0, (spread[:, None] + spread[None, :]) / gaps.clamp_min(torch.finfo(X.dtype).tiny),
                         torch.full_like(gaps, math.inf))
    ratios.fill_diagonal_(-math.inf)
    return float(ratios.max(1).values.mean())


def centroid_distance(X: torch.Tensor, y: torch.Tensor) -> float:
    """Euclidean distance between the class means; for more than 2 classes, the mean over pairs."""
    X, y, k = _prepare(X, y)
    centroids, _ = _centroids(X, y, k)
    gaps = torch.cdist(centroids, centroids, compute_mode="donot_use_mm_for_euclid_dist")
    i, j = torch.triu_indices(k, k, offset=1)
    return float(gaps[i, j].mean())


# --------------------------------------------------------------------------- classifier

def effective_folds(y: torch.Tensor, folds: int) -> int:
    """``folds`` lowered to the smallest class size; ValueError if a class has < 2 samples."""
    counts = torch.unique(torch.as_tensor(y).cpu(), return_counts=True)[1]
    smallest = int(counts.min())
    if smallest < 2:
        raise ValueError(f"every class needs at least 2 samples for cross-validation, smallest has {smallest}")
    return min(folds, smallest)


def stratified_folds(y: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """Fold id [N] per sample: each class shuffled (seeded) and dealt round-robin over the folds.

    The dealing continues from one class to the next, so fold sizes differ by at most one.
    """
    y = torch.as_tensor(y).cpu()
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(y.shape[0], dtype=torch.int64)
    start = 0
    for cls in torch.unique(y):
        members = torch.nonzero(y == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        fold[members] = (start + torch.arange(members.numel())) % folds
        start += members.numel()
    return fold


def _fit_logistic(X: torch.Tensor, y: torch.Tensor, k: int, l2: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (weights [D, K], bias [K]) trained by LBFGS from zero.

    Loss: summed cross-entropy + l2/2 |W|^2 (scikit-learn's C = 1 / l2), divided by N for scale.
    """
    W = torch.zeros(X.shape[1], k, dtype=X.dtype, requires_grad=True)
    b = torch.zeros(k, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W + b, y) + 0.5 * l2 * (W * W).sum() / X.shape[0]
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def cv_linear_accuracy(X: torch.Tensor, y: torch.Tensor, folds: int = 5, seed: int = 0, l2: float = 1.0,
                       steps: int = 100) -> float:
    """Mean held-out accuracy of a multinomial logistic regression under stratified k-fold CV.

    Features are standardised with the training fold's mean and std; training is full-batch
    LBFGS for ``steps`` iterations from zero weights, so the result is deterministic for a
    given ``seed`` (which only shuffles the fold assignment). When a class has fewer samples
    than ``folds``, the folds drop to the smallest class size (with a warning); a class with
    fewer than 2 samples is a ValueError.
    """
    X, y, k = _prepare(X, y)
    _check_positive_int("steps", steps)
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    used = effective_folds(y, folds)
    if used < folds:
        warnings.warn(f"smallest class has {used} samples: using {used} folds instead of {folds}", stacklevel=2)
    fold = stratified_folds(y, used, seed).to(X.device)
    accuracies = []
    # the caller may be inside inference mode; training needs autograd
    with torch.inference_mode(False), torch.enable_grad():
        X, y = X.clone(), y.clone()
        for f in range(used):
            train, test = fold != f, fold == f
            mean, std = X[train].mean(0), X[train].std(0, unbiased=False)
            std = torch.where(std > 0, std, torch.ones_like(std))
            W, b = _fit_logistic((X[train] - mean) / std, y[train], k, l2, steps)
            predicted = (((X[test] - mean) / std) @ W + b).argmax(1)
            accuracies.append(float((predicted == y[test]).to(X.dtype).mean()))
    return sum(accuracies) / len(accuracies)


# --------------------------------------------------------------------------- result

@dataclass
class LocalizationResult:
    """Per-layer separation of personas.

    ``layers`` holds one dict per hidden state: ``layer`` (0 = embeddings), ``silhouette``,
    ``calinski_harabasz``, ``davies_bouldin``, ``centroid_distance``, ``cv_accuracy`` and
    ``explained_variance_ratio`` (list, one per PCA component). ``cv_folds`` is the number of
    folds actually used; ``config`` the LocalizeConfig as a dict.
    """

    personas: list
    layers: list
    cv_folds: int = 0
    statements_per_persona: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def most_divergent(self, k: int = 3, metric: str = "silhouette", include_embeddings: bool = False) -> list[int]:
        """Indices of the ``k`` layers where the personas are furthest apart by ``metric``.

        Higher is more divergent for every metric but ``davies_bouldin`` (lower). NaN values
        rank last. The embedding output (layer 0) is left out unless ``include_embeddings``:
        it only reflects the identity of the last token.
        """
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        _check_positive_int("k", k)
        rows = [r for r in self.layers if include_embeddings or r["layer"] != 0]
        sign = 1.0 if METRICS[metric] else -1.0

        def key(row):
            value = row[metric]
            return (math.isnan(value), -sign * value, row["layer"])

        return [r["layer"] for r in sorted(rows, key=key)[:k]]

    def to_markdown(self, k: int = 3) -> str:
        """A Markdown table of every metric per layer, then the most divergent layers per metric."""
        header = ["layer", "silhouette", "calinski_harabasz", "davies_bouldin", "centroid_distance", "cv_accuracy",
                  "explained_variance_ratio"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.layers:
            cells = [str(row["layer"])] + [f"{row[m]:.4g}" for m in METRICS]
            cells.append(", ".join(f"{v:.3f}" for v in row["explained_variance_ratio"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"Personas: {', '.join(map(str, self.personas))}; classifier folds: {self.cv_folds}.")
        for metric in METRICS:
            lines.append(f"Most divergent layers by {metric}: {', '.join(map(str, self.most_divergent(k, metric)))}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | os.PathLike) -> str:
        """Write the result as JSON atomically (temp file, then os.replace); returns the path."""
        text = json.dumps(self.to_dict(), indent=2)
        return atomic_write_text(path, text)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "LocalizationResult":
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))

    def plot(self, path: str | os.PathLike) -> str:
        """One PNG with a subplot per metric across layers (and the PCA explained variance)."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError as exc:
            raise RuntimeError("plotting needs matplotlib: pip install persona-kernels[plot]") from exc
        layers = [r["layer"] for r in self.layers]
        panels = list(METRICS) + ["explained_variance_ratio"]
        fig = Figure(figsize=(12, 7), layout="constrained")
        for ax, metric in zip(fig.subplots(2, 3).flat, panels):
            if metric == "explained_variance_ratio":
                for c in range(len(self.layers[0][metric])):
                    ax.plot(layers, [r[metric][c] for r in self.layers], marker="o", label=f"PC{c + 1}")
                ax.legend(fontsize="small")
            else:
                ax.plot(layers, [r[metric] for r in self.layers], marker="o")
                better = "higher" if METRICS[metric] else "lower"
                metric = f"{metric} ({better} = more divergent)"
            ax.set_title(metric, fontsize="medium")
            ax.set_xlabel("layer (0 = embeddings)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        fig.suptitle("Persona separation by layer: " + ", ".join(map(str, self.personas)))
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


# --------------------------------------------------------------------------- driver

def layer_metrics(X: torch.Tensor, y: torch.Tensor, config: LocalizeConfig, folds: int) -> dict:
    """Every metric of one layer's states ``X`` [N, D] with labels ``y`` (no 'layer' key)."""
    X = X.to(torch.float64)
    k = min(config.pca_components, *X.shape)
    projected, ratio = pca(X, k)
    space = projected if config.metric_space == "pca" else X
    return {
        "silhouette": silhouette(space, y),
        "calinski_harabasz": calinski_harabasz(space, y),
        "davies_bouldin": davies_bouldin(space, y),
        "centroid_distance": centroid_distance(space, y),
        "cv_accuracy": cv_linear_accuracy(X, y, folds, config.seed, config.cv_l2, config.cv_steps),
        "explained_variance_ratio": ratio.tolist(),
    }


def localize(model, tokenizer, statements_by_persona: Mapping[str, Sequence[str]],
             config: Optional[LocalizeConfig] = None) -> LocalizationResult:
    """Where in the model do the personas separate? Metrics per layer of last-token states.

    ``statements_by_persona``: {persona: [statement, ...]} with at least 2 personas and at
    least 2 non-empty statements each. See LocalizeConfig for the options and
    LocalizationResult for the output (``to_markdown()``, ``plot()``, ``most_divergent()``).
    """
    cfg = config or LocalizeConfig()
    H, labels, personas = last_token_states(model, tokenizer, statements_by_persona, cfg)
    folds = effective_folds(labels, cfg.cv_folds)
    layers = [{"layer": i, **layer_metrics(H[i], labels, cfg, folds)} for i in range(H.shape[0])]
    return LocalizationResult(
        personas=personas, layers=layers, cv_folds=folds,
        statements_per_persona={p: len(statements_by_persona[p]) for p in personas}, config=asdict(cfg),
    )
