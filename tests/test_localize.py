"""Layer localization: metric functions against hand arithmetic and NumPy loops, hidden-state
extraction against unpadded single runs, and the end-to-end report on a tiny model."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from persona_kernels.localize import (
    LocalizationResult,
    LocalizeConfig,
    calinski_harabasz,
    centroid_distance,
    cv_linear_accuracy,
    davies_bouldin,
    last_token_states,
    localize,
    pca,
    silhouette,
    stratified_folds,
)
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

STATEMENTS = {
    "pirate": ["Arr, I sail the seven seas.", "Give me the gold!", "Walk the plank, landlubber.", "Yo ho ho."],
    "chef": ["I cook fresh pasta every day.", "Salt brings out the flavour.", "Knead it gently", "Taste it!",
             "Sharp knives are safe knives."],
}
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_causal_lm(arch, seed=0) for arch in ("llama", "gpt2")}


@pytest.fixture
def tok():
    return char_tokenizer()


# --------------------------------------------------------------------------- NumPy loop oracles

def _np_dist(a, b):
    return float(np.sqrt(((a - b) ** 2).sum()))


def _np_centroids(X, y):
    return {c: X[y == c].mean(0) for c in np.unique(y)}


def np_silhouette(X, y):
    scores = []
    for i in range(len(X)):
        own = [j for j in range(len(X)) if y[j] == y[i] and j != i]
        if not own:
            scores.append(0.0)
            continue
        a = sum(_np_dist(X[i], X[j]) for j in own) / len(own)
        b = min(np.mean([_np_dist(X[i], X[j]) for j in range(len(X)) if y[j] == c]) for c in set(y) if c != y[i])
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def np_calinski_harabasz(X, y):
    cents, mean, k = _np_centroids(X, y), X.mean(0), len(set(y))
    between = sum((y == c).sum() * ((cents[c] - mean) ** 2).sum() for c in cents)
    within = sum(((X[i] - cents[y[i]]) ** 2).sum() for i in range(len(X)))
    return (between / (k - 1)) / (within / (len(X) - k))


def np_davies_bouldin(X, y):
    cents = _np_centroids(X, y)
    spread = {c: np.mean([_np_dist(x, cents[c]) for x in X[y == c]]) for c in cents}
    return float(np.mean([max((spread[i] + spread[j]) / _np_dist(cents[i], cents[j]) for j in cents if j != i)
                          for i in cents]))


def np_centroid_distance(X, y):
    cents = list(_np_centroids(X, y).values())
    return float(np.mean([_np_dist(cents[i], cents[j]) for i in range(len(cents)) for j in range(i + 1, len(cents))]))


def _clusters(spread, seed=0, sizes=(7, 10, 5), dim=5):
    """Gaussian blobs around centres 4 apart; ``spread`` sets how much they overlap."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 4
    X = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(y))
    return X[perm], y[perm]


# --------------------------------------------------------------------------- metrics

def test_metrics_by_hand_two_clusters():
    # A=(0,0), B=(0,1) in class 0; C=(3,0), D=(3,1) in class 1
    X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    # every point alike: a = 1 (its partner), b = (3 + sqrt(10)) / 2, s = 1 - a / b
    assert silhouette(X, y) == pytest.approx(1 - 2 / (3 + math.sqrt(10)), abs=1e-12)
    # centroids (0,.5), (3,.5), mean (1.5,.5): B = 2*1.5^2 + 2*1.5^2 = 9, W = 4*0.5^2 = 1
    # CH = (9 / (2-1)) / (1 / (4-2)) = 18
    assert calinski_harabasz(X, y) == pytest.approx(18.0, abs=1e-12)
    # spreads s0 = s1 = 0.5, centroid gap 3: DB = (0.5 + 0.5) / 3
    assert davies_bouldin(X, y) == pytest.approx(1 / 3, abs=1e-12)
    assert centroid_distance(X, y) == pytest.approx(3.0, abs=1e-12)
    # labels need not be 0..K-1
    assert silhouette(X, torch.tensor([7, 7, -2, -2])) == pytest.approx(silhouette(X, y), abs=1e-15)


def test_metrics_by_hand_three_clusters():
    # class centroids (0,0), (3,0), (0,4): pairwise gaps 3, 4, 5 -> mean 4
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    X = torch.cat([offsets + torch.tensor(c) for c in ([0.0, 0.0], [3.0, 0.0], [0.0, 4.0])])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert centroid_distance(X, y) == pytest.approx(4.0, abs=1e-12)
    # every spread is 1: the closest neighbour pair (gap 3) dominates classes 0 and 1 -> 2/3,
    # class 2's closest is class 0 (gap 4) -> 2/4; DB = (2/3 + 2/3 + 1/2) / 3
    assert davies_bouldin(X, y) == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3, abs=1e-12)


@pytest.mark.parametrize("spread", [0.3, 3.0], ids=["separated", "overlapping"])
def test_metrics_match_numpy_loops(spread):
    X, y = _clusters(spread)
    Xt, yt = torch.from_numpy(X).float(), torch.from_numpy(y)
    X32 = Xt.double().numpy()  # the oracle sees the same float32-rounded values
    assert silhouette(Xt, yt) == pytest.approx(np_silhouette(X32, y), rel=1e-9, abs=1e-12)
    assert calinski_harabasz(Xt, yt) == pytest.approx(np_calinski_harabasz(X32, y), rel=1e-9)
    assert davies_bouldin(Xt, yt) == pytest.approx(np_davies_bouldin(X32, y), rel=1e-9)
    assert centroid_distance(Xt, yt) == pytest.approx(np_centroid_distance(X32, y), rel=1e-9)
    if spread < 1:
        assert silhouette(Xt, yt) > 0.7 and davies_bouldin(Xt, yt) < 0.5


def test_silhouette_singleton_class_counts_zero():
    X, y = _clusters(1.0, sizes=(1, 6, 4))
    assert silhouette(torch.from_numpy(X), torch.from_numpy(y)) == pytest.approx(np_silhouette(X, y), rel=1e-9)


def test_degenerate_conventions():
    X = torch.ones(4, 3)  # every point the same: centroids coincide
    y = torch.tensor([0, 0, 1, 1])
    assert silhouette(X, y) == 0.0
    assert calinski_harabasz(X, y) == 0.0
    assert davies_bouldin(X, y) == math.inf
    assert centroid_distance(X, y) == 0.0
    # each class a single repeated point: no within-class dispersion
    assert calinski_harabasz(torch.tensor([[0.0], [0.0], [1.0], [1.0]]), y) == math.inf


def test_pca_known_variance():
    # orthonormal, centred columns scaled by (3, 1, .5), rotated into 6-D: variances exactly 9 : 1 : .25
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(50, 3, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(Z - Z.mean(0))
    R, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))
    X = (Q * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)) @ R.T + 5.0
    projected, ratio = pca(X, 2)
    assert projected.shape == (50, 2) and projected.dtype == torch.float64
    torch.testing.assert_close(ratio, torch.tensor([9.0, 1.0], dtype=torch.float64) / 10.25)
    # the projection is the latent coordinates up to sign
    torch.testing.assert_close(projected.abs(), (Q[:, :2] * torch.tensor([3.0, 1.0], dtype=torch.float64)).abs())
    assert torch.allclose(projected.var(0, unbiased=False) * 50, torch.tensor([9.0, 1.0], dtype=torch.float64))
    _, full = pca(X, 6)
    assert float(full.sum()) == pytest.approx(1.0) and float(full[3:].abs().max()) < 1e-12
    with pytest.raises(ValueError):
        pca(X, 7)


def test_pca_zero_variance():
    _, ratio = pca(torch.ones(5, 3), 2)
    assert ratio.tolist() == [0.0, 0.0]


def test_classifier_separable_and_noise():
    X, y = _clusters(0.3, sizes=(20, 20, 20), dim=8)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    assert cv_linear_accuracy(X, y, folds=5, seed=0) == 1.0
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(60, 8, generator=g)
    shuffled = y[torch.randperm(60, generator=g)]
    accuracy = cv_linear_accuracy(noise, shuffled, folds=5, seed=0)
    assert 0.0 <= accuracy <= 0.65  # chance is 1/3
    assert cv_linear_accuracy(noise, shuffled, folds=5, seed=0) == accuracy  # deterministic


def test_classifier_reduces_folds_to_smallest_class():
    X = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1]])
    y = torch.tensor([0, 0, 0, 1, 1])
    with pytest.warns(UserWarning, match="2 folds"):
        assert cv_linear_accuracy(X, y, folds=5) == 1.0
    with pytest.raises(ValueError, match="at least 2 samples"):
        cv_linear_accuracy(X, torch.tensor([0, 0, 0, 0, 1]), folds=2)


def test_stratified_folds_balanced():
    y = torch.tensor([0] * 7 + [1] * 5 + [2] * 4)
    fold = stratified_folds(y, 4, seed=3)
    for f in range(4):
        assert set(y[fold == f].tolist()) == {0, 1, 2}  # every class in every test fold
    sizes = torch.bincount(fold)
    assert int(sizes.max() - sizes.min()) <= 1
    assert torch.equal(fold, stratified_folds(y, 4, seed=3))


# --------------------------------------------------------------------------- hidden states

def _alone(model, tok, text):
    """Every layer's last-token state of ``text`` run alone, without padding."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.stack([h[0, -1] for h in hs])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_token_states_any_padding(models, tok, arch, side):
    model = models[arch]
    tok.padding_side = side
    H, labels, personas = last_token_states(model, tok, STATEMENTS, LocalizeConfig(batch_size=3))
    texts = [s for p in STATEMENTS for s in STATEMENTS[p]]
    assert H.shape == (model.config.num_hidden_layers + 1, len(texts), 64) and H.dtype == torch.float32
    assert personas == ["pirate", "chef"] and labels.tolist() == [0] * 4 + [1] * 5
    for i, text in enumerate(texts):
        torch.testing.assert_close(H[:, i], _alone(model, tok, text), atol=1e-5, rtol=1e-4)
    assert tok.padding_side == side
    H.mul_(1.0)  # an ordinary tensor, not an inference-mode one


def test_last_token_states_borrows_pad_and_restores_mode(models, tok):
    model = models["llama"]
    reference, _, _ = last_token_states(model, tok, STATEMENTS)
    tok.pad_token = None
    model.train()
    try:
        H, _, _ = last_token_states(model, tok, STATEMENTS)
        assert model.training and tok.pad_token is None
    finally:
        model.eval()
    torch.testing.assert_close(H, reference)  # eval mode inside: no dropout; EOS padding is masked


def test_chat_template_used(models, tok):
    model = models["llama"]
    assert getattr(tok, "chat_template", None) is None
    raw, _, _ = last_token_states(model, tok, STATEMENTS)
    tok.chat_template = TEMPLATE
    templated, _, _ = last_token_states(model, tok, STATEMENTS)
    wrapped = {p: [f"<system>{s}</system>" for s in v] for p, v in STATEMENTS.items()}
    by_hand, _, _ = last_token_states(model, tok, wrapped, LocalizeConfig(use_chat_template=False))
    torch.testing.assert_close(templated, by_hand)
    assert not torch.allclose(templated, raw)
    opted_out, _, _ = last_token_states(model, tok, STATEMENTS, LocalizeConfig(use_chat_template=False))
    torch.testing.assert_close(opted_out, raw)


# --------------------------------------------------------------------------- end to end

def test_localize_end_to_end(models, tok, tmp_path):
    result = localize(models["llama"], tok, STATEMENTS, LocalizeConfig(cv_folds=5, cv_steps=30))
    assert result.personas == ["pirate", "chef"] and result.cv_folds == 4  # pirate has 4 statements
    assert [r["layer"] for r in result.layers] == [0, 1, 2]
    for row in result.layers:
        assert -1 <= row["silhouette"] <= 1 and 0 <= row["cv_accuracy"] <= 1
        assert row["calinski_harabasz"] >= 0 and row["davies_bouldin"] > 0 and row["centroid_distance"] > 0
        assert len(row["explained_variance_ratio"]) == 2 and sum(row["explained_variance_ratio"]) <= 1 + 1e-9
    assert sorted(result.most_divergent(k=3)) == [1, 2]  # embeddings left out by default
    assert len(result.most_divergent(k=3, metric="davies_bouldin", include_embeddings=True)) == 3
    table = result.to_markdown()
    assert table.startswith("| layer | silhouette |") and table.count("\n| ") == 3  # one row per layer
    assert "Most divergent layers by silhouette:" in table
    path = result.save_json(tmp_path / "sub" / "loc.json")
    assert json.load(open(path))["personas"] == ["pirate", "chef"]
    assert LocalizationResult.load_json(path) == result
    assert [p for p in os.listdir(tmp_path / "sub")] == ["loc.json"]  # no temp file left behind


def test_localize_pca_metric_space(models, tok):
    cfg = LocalizeConfig(metric_space="pca", pca_components=2, cv_steps=30)
    result = localize(models["gpt2"], tok, STATEMENTS, cfg)
    H, labels, _ = last_token_states(models["gpt2"], tok, STATEMENTS, cfg)
    projected, _ = pca(H[1], 2)
    assert result.layers[1]["silhouette"] == pytest.approx(silhouette(projected, labels))
    assert result.config["metric_space"] == "pca"


def _result(values, metric="silhouette"):
    rows = [{"layer": i, "silhouette": 0.0, "calinski_harabasz": 0.0, "davies_bouldin": 1.0,
             "centroid_distance": 0.0, "cv_accuracy": 0.5, "explained_variance_ratio": [0.5], metric: v}
            for i, v in enumerate(values)]
    return LocalizationResult(personas=["a", "b"], layers=rows, cv_folds=2)


def test_most_divergent_direction():
    assert _result([9.0, 0.1, 0.5, float("nan"), 0.3]).most_divergent(k=3) == [2, 4, 1]
    assert _result([0.0, 2.0, 0.5, 1.0], "davies_bouldin").most_divergent(k=2, metric="davies_bouldin") == [2, 3]
    assert _result([0.0, 2.0, 0.5]).most_divergent(k=1, include_embeddings=True) == [1]
    with pytest.raises(ValueError, match="metric"):
        _result([0.0, 1.0]).most_divergent(metric="accuracy")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = _result([0.0, 0.3, 0.2]).plot(tmp_path / "loc.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(RuntimeError, match=r"pip install persona-kernels\[plot\]"):
        _result([0.0, 0.3]).plot(tmp_path / "loc.png")


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("statements, match", [
    ({"solo": ["a b", "c d"]}, "at least 2 personas"),
    ({"a": ["x y", "z"], "b": ["only one"]}, "at least 2 statements"),
    ({"a": ["x y", ""], "b": ["u", "v"]}, "empty"),
    ({"a": ["x y", "   "], "b": ["u", "v"]}, "empty"),
    ({"a": "not a list", "b": ["u", "v"]}, "list of strings"),
    ({"a": ["x", 3], "b": ["u", "v"]}, "not a string"),
    (["x", "y"], "mapping"),
])
def test_bad_statements(models, tok, statements, match):
    with pytest.raises(ValueError, match=match):
        localize(models["llama"], tok, statements)


@pytest.mark.parametrize("kwargs", [
    dict(batch_size=0), dict(max_length=-1), dict(pca_components=0), dict(cv_folds=1), dict(cv_folds=2.0),
    dict(metric_space="umap"), dict(cv_l2=-1.0), dict(cv_steps=0), dict(seed=None),
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        LocalizeConfig(**kwargs)


def test_metric_input_validation():
    X = torch.randn(4, 2)
    with pytest.raises(ValueError, match="classes"):
        silhouette(X, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected"):
        calinski_harabasz(X, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="NaN"):
        davies_bouldin(torch.full((4, 2), float("nan")), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="N - 1"):
        silhouette(X, torch.arange(4))
