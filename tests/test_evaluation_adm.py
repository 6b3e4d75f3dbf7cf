"""ADM-compatible metrics: Fréchet distance, Inception Score, precision/recall, the FID
Inception-V3's layout and weights handling, and evaluate() end to end on CPU.

The official port weights are not available here, so the network runs with random weights;
what it checks is the layout, the feature taps, the input pipeline and the plumbing.
"""

import io
import json
import re
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from epg.evaluation import (
    FIDStatistics,
    InceptionV3,
    evaluate,
    format_table,
    frechet_distance_from_stats,
    inception_score,
    load_inception,
    manifold_radii,
    precision_recall,
    save_reference_statistics,
    trace_sqrt_product,
)
from epg.evaluation.adm import _sq_distances, compute_activations
from epg.evaluation.inception import load_state_dict_checked, preprocess, tf_resize_bilinear

# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def test_frechet_distance_of_gaussians_with_diagonal_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 4.0, size=32), rng.uniform(0.1, 4.0, size=32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    # Commuting covariances: tr((Σ₁Σ₂)^½) = Σ √(a_i b_i), so d² = ‖Δμ‖² + Σ (√a_i − √b_i)².
    exact = (mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(exact, rel=1e-12)
    # Rotating both Gaussians by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    rotate = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    rotated = frechet_distance_from_stats(q @ mu1, rotate[0], q @ mu2, rotate[1])
    assert rotated == pytest.approx(exact, rel=1e-10)


def test_fid_statistics_from_features_are_mean_and_unbiased_covariance():
    feats = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    stats = FIDStatistics.from_features(feats)
    f64 = feats.astype(np.float64)
    centred = f64 - f64.mean(axis=0)
    assert stats.mu.dtype == np.float64 and np.allclose(stats.mu, f64.mean(axis=0), atol=1e-12)
    assert np.allclose(stats.sigma, centred.T @ centred / 39, atol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        FIDStatistics.from_features(feats[:1])


def test_frechet_distance_of_identical_features_is_zero():
    rng = np.random.default_rng(2)
    many = rng.normal(size=(1000, 64)) @ rng.normal(size=(64, 64))
    few = rng.normal(size=(6, 2048)).astype(np.float32)  # rank-5 covariances in 2048 dims
    for feats in (many, few):
        stats = FIDStatistics.from_features(feats)
        scale = np.trace(stats.sigma)
        assert stats.frechet_distance(stats) == pytest.approx(0.0, abs=1e-10 * scale)


def test_trace_sqrt_product_is_exact_for_rank_deficient_covariances():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(64, 10)), rng.normal(size=(64, 7))
    sigma1, sigma2 = a @ a.T, b @ b.T  # ranks 10 and 7 in 64 dims, not commuting
    # Σ₁Σ₂ = AAᵀBBᵀ has the nonzero eigenvalues of (AᵀB)(AᵀB)ᵀ: the trace of its square root
    # is the nuclear norm of the small matrix AᵀB, computed independently here.
    exact = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(exact, rel=1e-12)
    assert trace_sqrt_product(sigma2, sigma1) == pytest.approx(exact, rel=1e-12)
    # Near-singular: full rank, smallest eigenvalues ε. Exact: Σ + εI = [A, √ε I][A, √ε I]ᵀ.
    for eps in (1e-12, 1e-9, 1e-6):
        root = np.sqrt(eps) * np.eye(64)
        product = np.hstack([a, root]).T @ np.hstack([b, root])
        exact_eps = np.linalg.svd(product, compute_uv=False).sum()
        near = trace_sqrt_product(sigma1 + eps * np.eye(64), sigma2 + eps * np.eye(64))
        assert np.isfinite(near) and near == pytest.approx(exact_eps, rel=1e-9), eps
    mu = rng.normal(size=64)
    d2 = frechet_distance_from_stats(mu, sigma1, 0 * mu, sigma2)
    assert d2 == pytest.approx(mu @ mu + np.trace(sigma1) + np.trace(sigma2) - 2 * exact, rel=1e-12)
    # Where scipy.linalg.sqrtm (ADM's way) is well conditioned, both agree.
    c = rng.normal(size=(40, 40))
    well1, well2 = c @ c.T / 40 + 0.5 * np.eye(40), np.diag(rng.uniform(0.5, 2.0, size=40))
    assert trace_sqrt_product(well1, well2) == pytest.approx(
        np.trace(scipy.linalg.sqrtm(well1 @ well2)).real, rel=1e-10
    )


def test_frechet_distance_is_never_negative_at_rounding_level():
    # Identical rank-deficient statistics: the exact distance is 0, and rounding can take the
    # trace formula a little below it.
    rng = np.random.default_rng(2)
    for _ in range(50):
        cov = np.cov(rng.normal(size=(6, 40)), rowvar=False)
        mu = rng.normal(size=40)
        assert frechet_distance_from_stats(mu, cov, mu, cov) >= 0.0


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="equal d"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance_from_stats(np.zeros(2), np.diag([1.0, np.nan]), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def test_inception_score_of_uniform_and_of_confident_balanced_predictions():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
    labels = np.arange(200) % 10
    # Confident, balanced over 10 classes: KL = log 10 for every sample, IS = 10.
    assert inception_score(100.0 * np.eye(10)[labels]) == pytest.approx(10.0, rel=1e-12)
    # Probabilities that underflow to exactly 0 count as 0·log 0 = 0, not NaN.
    assert inception_score(1e4 * np.eye(10)[labels]) == pytest.approx(10.0, rel=1e-12)
    # All confident in one class: IS = 1.
    assert inception_score(100.0 * np.eye(10)[np.zeros(50, int)]) == pytest.approx(1.0, abs=1e-9)
    # ... and with underflow, classes no sample predicts have marginal 0: 0·log(0/0) counts as 0.
    assert inception_score(1e4 * np.eye(10)[np.zeros(50, int)]) == pytest.approx(1.0, abs=1e-12)


def _naive_inception_score(logits, split=5000):
    """exp(mean_i KL(p_i ‖ m)) per split of ``split`` rows, averaged, one term at a time."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(p), split):
        part = p[start : start + split]
        m = part.mean(0)
        kl = [sum(pi * np.log(pi / mi) for pi, mi in zip(row, m) if pi > 0) for row in part]
        scores.append(np.exp(np.mean(kl)))
    return np.mean(scores)


def test_inception_score_matches_the_formula_on_soft_predictions():
    # Soft, unequal predictions: saturated ones give every sample the same KL and a normalised
    # softmax, where a mean of exp(KL) or unnormalised logits would go unseen.
    z = np.random.default_rng(0).normal(size=(60, 7)) * 2.0
    assert inception_score(z) == pytest.approx(_naive_inception_score(z), rel=1e-12)
    assert inception_score(z, split_size=25) == pytest.approx(_naive_inception_score(z, 25), rel=1e-12)


def test_inception_score_averages_adm_splits_of_5000():
    # Splits [0, 5000), [5000, 10000), [10000, 12000): two balanced over 10 classes (IS 10),
    # the short last one all in one class (IS 1): mean (10 + 10 + 1) / 3 = 7.
    labels = np.concatenate([np.arange(10000) % 10, np.full(2000, 3)])
    assert inception_score(100.0 * np.eye(10)[labels]) == pytest.approx(7.0, rel=1e-9)


# --------------------------------------------------------------------------------------------
# Precision and recall
# --------------------------------------------------------------------------------------------


def _square(x, y):
    return np.array([[x, y], [x + 1, y], [x, y + 1], [x + 1, y + 1]], np.float32)


def test_precision_recall_on_constructed_points():
    # Reference: two unit squares apart; each corner's neighbours are at squared distances
    # 1, 1, 2, so every radius (3rd neighbour) is 2. Coordinates stay below 10 so that every
    # squared norm, dot product and distance is exact in half precision (ADM's default).
    ref = np.concatenate([_square(0, 0), _square(8, 0)])
    # Samples: the first square exactly, one point at squared distance exactly 2 from a
    # reference corner (inside: ADM compares with <=), one at 3.25 (outside), and a far square.
    samples = np.concatenate(
        [_square(0, 0), np.array([[-1, -1], [-1, -1.5]], np.float32), _square(0, 8)]
    )
    for distance_dtype in ("float16", "float32"):
        radii = manifold_radii(ref, distance_dtype=distance_dtype, device="cpu")
        assert np.array_equal(radii, np.full(8, 2.0, np.float32))
        for block_size in (10000, 3):  # 3: blocks split both sets and every neighbour search
            precision, recall = precision_recall(
                ref, samples, block_size=block_size, distance_dtype=distance_dtype, device="cpu"
            )
            assert precision == pytest.approx(5 / 10)  # square + (−1, −1)
            assert recall == pytest.approx(4 / 8)  # the far reference square is missed
    # Swapping the roles swaps the answers.
    swapped = precision_recall(samples, ref, device="cpu")
    assert swapped == (pytest.approx(4 / 8), pytest.approx(5 / 10))


def test_manifold_radius_counts_the_point_itself_and_its_duplicates():
    # ADM takes the k-th smallest entry of each full distance row, self (0) included: with a
    # duplicate, the duplicate is the first neighbour.
    pts = np.array([[0.0], [0.0], [1.0], [3.0], [7.0]], np.float32)
    # Sorted rows: 0 → [0, 0, 1, 9, 49], 1 → [0, 1, 1, 4, 36], 3 → [0, 4, 9, 9, 16],
    # 7 → [0, 16, 36, 49, 49]; the radius is entry 3.
    assert manifold_radii(pts, device="cpu").tolist() == [9.0, 9.0, 4.0, 9.0, 49.0]


def _naive_precision_recall(ref, samples, k=3):
    def sq(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
    r_smp = np.sort(sq(samples, samples), axis=1)[:, k]
    d = sq(ref, samples)
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_smp[None, :]).any(1).mean()


def test_precision_recall_matches_a_naive_float64_implementation():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(60, 8))
    samples = rng.normal(size=(45, 8)) * 1.3 + 0.4
    expected = _naive_precision_recall(ref, samples)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the sets overlap only partly
    for block_size in (10000, 16):
        got = precision_recall(
            ref, samples, block_size=block_size, distance_dtype="float32", device="cpu"
        )
        assert got == pytest.approx(expected, abs=1e-12)


def test_half_precision_distances_and_their_float32_fallback():
    rng = np.random.default_rng(5)
    u, v = torch.from_numpy(rng.normal(size=(9, 16))), torch.from_numpy(rng.normal(size=(7, 16)))
    exact = torch.cdist(u, v) ** 2
    half = _sq_distances(u.float(), v.float(), "float16")
    assert half.dtype == torch.float32
    # Each of the three terms is rounded to half (relative 2^-11) before they cancel.
    bound = 3 * 2.0**-11 * (u.square().sum(1)[:, None] + 2 * (u @ v.T).abs() + v.square().sum(1))
    assert ((half.double() - exact).abs() <= bound).all()
    assert not torch.equal(half, _sq_distances(u.float(), v.float(), "float32"))
    # Norms² beyond 65504 overflow in half: the block is recomputed in float32, as ADM does.
    big_u, big_v = 300 * u.float(), 300 * v.float()
    fallback = _sq_distances(big_u, big_v, "float16")
    assert torch.isfinite(fallback).all()
    assert torch.equal(fallback, _sq_distances(big_u, big_v, "float32"))
    with pytest.raises(ValueError, match="distance_dtype"):
        _sq_distances(u.float(), v.float(), "bfloat16")


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

# Names and shapes of pt_inception-2015-12-05-6726825d.pth (the pytorch-fid FID Inception).
PORT_LAYOUT = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.bias": (32,),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6d.branch1x1.bn.running_var": (192,),
    "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_half_precision_distances_round_as_adm_does():
    # ADM's DistanceBlock: squares rounded to half, their sums and the dot products accumulated
    # in float32 and rounded to half, the combination in half.
    rng = np.random.default_rng(5)
    u = torch.from_numpy(rng.normal(size=(9, 16))).float()
    v = torch.from_numpy(rng.normal(size=(7, 16))).float()
    u16, v16 = u.half(), v.half()
    nu, nv = u16.square().float().sum(1).half(), v16.square().float().sum(1).half()
    dot = (u16.float() @ v16.float().T).half()
    expected = (nu[:, None] - 2 * dot + nv[None, :]).clamp_min(0).float()
    assert torch.equal(_sq_distances(u, v, "float16"), expected)
    duplicates = torch.full((3, 64), 0.1) + torch.arange(64) * 1e-3
    assert (_sq_distances(duplicates, duplicates, "float32") >= 0).all()


def test_state_dict_layout_matches_the_port():
    model = InceptionV3()
    state = model.state_dict()
    for key, shape in PORT_LAYOUT.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 94 and all(m.bias is None for m in convs)
    assert all(m.eps == 1e-3 for m in bns)
    # torchvision's inception_v3 has 27,161,264 parameters with its auxiliary head (conv0
    # 768·128 + 2·128, conv1 128·768·25 + 2·768, fc 768·1000 + 1000) and a 1000-way fc; the
    # port drops the head and widens fc to 1008 classes.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    expected = 27_161_264 - aux + 8 * (2048 + 1)
    assert sum(p.numel() for p in model.parameters()) == expected == 23_850_960


def test_pooling_follows_the_tf_graph():
    model = InceptionV3()
    x = torch.rand(1, 4, 5, 5)
    # SAME average pooling divides corner windows by 4 real pixels, not by 9.
    from epg.evaluation.inception import _avg_pool_same

    assert torch.allclose(_avg_pool_same(x)[0, :, 0, 0], x[0, :, :2, :2].mean(dim=(1, 2)))
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"


def _tf_legacy_resize_naive(img, out):
    # TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False, one pixel at a time.
    h, w = img.shape
    res = np.empty((out, out))
    for i in range(out):
        y = i * h / out
        y0, y1 = int(np.floor(y)), min(int(np.floor(y)) + 1, h - 1)
        for j in range(out):
            x = j * w / out
            x0, x1 = int(np.floor(x)), min(int(np.floor(x)) + 1, w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * (x - x0)
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * (x - x0)
            res[i, j] = top + (bottom - top) * (y - y0)
    return res


def test_resize_is_tf1_resize_bilinear_and_inputs_are_scaled_like_the_graph():
    rng = np.random.default_rng(6)
    for h, out in ((5, 7), (9, 4), (6, 6)):
        img = rng.uniform(0, 255, size=(h, h))
        got = tf_resize_bilinear(torch.from_numpy(img)[None, None], size=out)[0, 0]
        assert np.allclose(got.numpy(), _tf_legacy_resize_naive(img, out), atol=1e-9)
    u8 = torch.from_numpy(rng.integers(0, 256, size=(2, 12, 12, 3), dtype=np.uint8))
    x = preprocess(u8)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    # (v − 128) / 128: 0 → −1, 255 → 127/128, at the unresized top-left pixel.
    assert torch.equal(x[:, :, 0, 0], (u8[:, 0, 0, :].float() - 128) / 128)
    # epg's float convention in [−1, 1], channels first, gives the same input.
    as_float = u8.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(preprocess(as_float), x, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        preprocess(u8.permute(0, 3, 1, 2))


def _random_inception(seed=0):
    # He-initialised convolutions keep activations O(1) through the 94 layers, so random
    # features are neither vanishing nor identical across images.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionV3()
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def test_block_wiring_follows_the_tf_graph():
    # Random weights cannot tell a max pool from an average pool or one branch order from
    # another by the outputs alone: the blocks' inputs and concatenation slices can.
    model, seen = _random_inception(), {}

    def keep(name):
        return lambda module, inputs, output: seen.__setitem__(name, (inputs[0], output))

    for name in ("Mixed_7c", "Conv2d_3b_1x1", "Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5b", "Mixed_6e"):
        getattr(model, name).register_forward_hook(keep(name))
    for name in ("branch_pool", "branch3x3_2a", "branch3x3_2b"):
        getattr(model.Mixed_7c, name).register_forward_hook(keep("7c." + name))
    for name in ("branch7x7_3", "branch7x7dbl_5"):
        getattr(model.Mixed_6e, name).register_forward_hook(keep("6e." + name))
    with torch.no_grad():
        model(np.random.default_rng(0).integers(0, 256, (1, 40, 40, 3), dtype=np.uint8))
    x7c, out7c = seen["Mixed_7c"]
    assert torch.allclose(seen["7c.branch_pool"][0], F.max_pool2d(x7c, 3, 1, 1))  # a max pool here
    # concatenation order: 1x1 (320) | 3x3_2a (384) | 3x3_2b (384) | ...
    assert torch.equal(out7c[:, 320:704], seen["7c.branch3x3_2a"][1])
    assert torch.equal(out7c[:, 704:1088], seen["7c.branch3x3_2b"][1])
    out6e = seen["Mixed_6e"][1]  # 1x1 (192) | 7x7 | 7x7dbl | pool
    assert torch.equal(out6e[:, 192:384], seen["6e.branch7x7_3"][1])
    assert torch.equal(out6e[:, 384:576], seen["6e.branch7x7dbl_5"][1])
    # the stem's two 3x3/2 max pools
    assert torch.equal(seen["Conv2d_3b_1x1"][0], F.max_pool2d(seen["Conv2d_2b_3x3"][1], 3, 2))
    assert torch.equal(seen["Mixed_5b"][0], F.max_pool2d(seen["Conv2d_4a_3x3"][1], 3, 2))


def test_outputs_are_adm_feature_taps():
    model = _random_inception()
    captured = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("b", o))
    model.Mixed_7c.register_forward_hook(lambda m, i, o: captured.setdefault("7c", o))
    images = np.random.default_rng(7).integers(0, 256, size=(2, 24, 24, 3), dtype=np.uint8)
    with torch.no_grad():
        out = model(images)
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 2023)
    assert out.logits.shape == (2, 1008)
    # mixed_6/conv[..., :7] in TF's H, W, C order.
    b = captured["b"]
    assert b.shape == (2, 192, 17, 17)
    assert torch.equal(out.spatial, b[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.allclose(out.pool, captured["7c"].mean(dim=(2, 3)))
    # ADM's softmax input: pool_3 times the logits weight, without the (nonzero) bias.
    assert model.fc.bias.abs().max() > 1e-3
    assert torch.allclose(out.logits, out.pool @ model.fc.weight.T, atol=1e-6)
    assert out.pool.std() > 0.05 and not torch.allclose(out.pool[0], out.pool[1])


@pytest.mark.cuda
def test_gpu_features_and_manifolds_match_the_cpu():
    # TF32 convolutions (cuDNN's default) would move features by ~1e-3 relative; full fp32
    # stays within ~1e-5. The precision flags are restored afterwards.
    model = _random_inception()
    images = np.random.default_rng(8).integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    def flags():
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision

    # The test session runs in IEEE float32 (conftest); this test starts from TF32, cuDNN's
    # default, to see the network switch it off and back.
    session = flags()
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with torch.no_grad():
            cpu = model(images)
            gpu = model.cuda()(images)
        assert flags() == ("tf32", "tf32")
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = session
    for name, c, g in zip(cpu._fields, cpu, gpu):
        assert g.is_cuda
        err = (g.cpu() - c).abs().max() / c.abs().max()
        assert err < 2e-4, (name, float(err))
    feats = np.random.default_rng(9).normal(size=(300, 32)).astype(np.float32)
    for distance_dtype in ("float16", "float32"):
        on_cpu = precision_recall(feats[:150], feats[150:] * 1.2, distance_dtype=distance_dtype,
                                  device="cpu", block_size=64)
        on_gpu = precision_recall(feats[:150], feats[150:] * 1.2, distance_dtype=distance_dtype,
                                  device="cuda", block_size=64)
        assert on_gpu == pytest.approx(on_cpu, abs=2 / 150)  # at most a borderline point each


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-random.pth"
    torch.save(_random_inception().state_dict(), path)
    return path


def test_missing_weights_are_reported_with_both_ways_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.delenv("EPG_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        load_inception()
    assert "EPG_INCEPTION_WEIGHTS" in str(err.value) and "weights argument" in str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in str(err.value)
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_inception(missing)
    monkeypatch.setenv("EPG_INCEPTION_WEIGHTS", str(tmp_path / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError, match=r"elsewhere\.pth \(from \$EPG_INCEPTION_WEIGHTS\)"):
        load_inception()
    with pytest.raises(FileNotFoundError, match=r"holds no pt_inception-2015-12-05-\*\.pth"):
        load_inception(tmp_path)  # a folder without the file


def test_weights_from_env_or_folder_load_strictly(weights_file, monkeypatch):
    monkeypatch.setenv("EPG_INCEPTION_WEIGHTS", str(weights_file))
    from_env = load_inception(device="cpu")
    from_dir = load_inception(weights_file.parent, device="cpu")
    expected = torch.load(weights_file, weights_only=True)
    for model in (from_env, from_dir):
        assert not model.training
        assert torch.equal(model.state_dict()["Mixed_6d.branch1x1.conv.weight"],
                           expected["Mixed_6d.branch1x1.conv.weight"])


def test_wrong_weights_are_named(tmp_path):
    state = InceptionV3().state_dict()
    state.pop("fc.bias")
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    with pytest.raises(ValueError) as err:
        load_state_dict_checked(InceptionV3(), state, "test weights")
    msg = str(err.value)
    assert "missing keys: fc.bias" in msg and "unexpected keys: AuxLogits.fc.weight" in msg
    assert "Mixed_5b.branch1x1.conv.weight (64, 192, 3, 3) (expected (64, 192, 1, 1))" in msg
    # Files: a state dict of the wrong model, and bytes that are no PyTorch file at all.
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="unexpected keys: conv.weight"):
        load_inception(wrong)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not a PyTorch weights file"):
        load_inception(corrupt)
    # BatchNorm counters are optional (older files lack them).
    state = {k: v for k, v in InceptionV3().state_dict().items() if "num_batches_tracked" not in k}
    load_state_dict_checked(InceptionV3(), state, "test weights")


# --------------------------------------------------------------------------------------------
# Batches and evaluate()
# --------------------------------------------------------------------------------------------


def _images(seed, n=4, size=32):
    # Smooth random images (low-frequency patterns), so Inception sees more than noise.
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(n, 4, 4, 3))
    return np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2).astype(np.uint8)


def test_bad_batches_are_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("EPG_INCEPTION_WEIGHTS", raising=False)
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=_images(0))
    # name: (exception, message as samples, message as reference)
    cases = {
        "missing.npz": (FileNotFoundError, "no such image batch", "no such reference"),
        "garbage.npz": (ValueError, "not a valid .npz", "not a valid .npz"),
        "nokey.npz": (
            ValueError,
            r"no 'arr_0' array \(it holds \['images'\]\)",
            r"neither images \(arr_0\) nor statistics .* it holds \['images'\]",
        ),
        "float.npz": (ValueError, *[r"uint8 images \(N, H, W, 3\).*float32 \(4, 32, 32, 3\)"] * 2),
        "nchw.npz": (ValueError, *[r"got uint8 \(4, 3, 32, 32\)"] * 2),
    }
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    np.savez(tmp_path / "nokey.npz", images=_images(0))
    np.savez(tmp_path / "float.npz", arr_0=_images(0).astype(np.float32))
    np.savez(tmp_path / "nchw.npz", arr_0=_images(0).transpose(0, 3, 1, 2))
    for name, (exc, as_samples, as_reference) in cases.items():
        with pytest.raises(exc, match=as_samples):
            evaluate(tmp_path / name, good)
        with pytest.raises(exc, match=as_reference):
            evaluate(good, tmp_path / name)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=r"lacks \['mu_s', 'sigma_s'\]"):
        evaluate(good, partial)
    folder = tmp_path / "pngs"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        evaluate(folder, good)
    Image.fromarray(_images(0)[0]).save(folder / "0.png")
    Image.fromarray(_images(0, size=16)[0]).save(folder / "1.png")
    with pytest.raises(ValueError, match=r"1\.png is 16×16, but .*0\.png is 32×32"):
        evaluate(folder, good)
    np.savez(tmp_path / "three.npz", arr_0=_images(0, n=3))
    with pytest.raises(ValueError, match="at least 4"):
        evaluate(tmp_path / "three.npz", good)


def test_inputs_that_cannot_be_evaluated_are_refused_before_the_network_runs(
    tmp_path, monkeypatch
):
    # No weights anywhere: each error must come from checking the inputs, before Inception is
    # loaded and every sample has gone through it.
    monkeypatch.delenv("EPG_INCEPTION_WEIGHTS", raising=False)
    good, three = tmp_path / "good.npz", tmp_path / "three.npz"
    np.savez(good, arr_0=_images(0))
    np.savez(three, arr_0=_images(0, n=3))
    with pytest.raises(ValueError, match=r"three\.npz\[arr_0\] holds 3 images; need at least 4"):
        evaluate(good, three)
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023), pool_features=np.zeros((3, 2048), np.float32))  # fmt: skip
    with pytest.raises(ValueError, match=r"\[pool_features\] holds 3 images; need at least 4"):
        evaluate(good, stats)
    for batch_size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            evaluate(good, good, batch_size=batch_size)
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            save_reference_statistics(good, tmp_path / "out.npz", batch_size=batch_size)
    # A folder of reference images exists: say what a reference must be instead.
    folder = tmp_path / "ref_pngs"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"ref_pngs is a folder; the reference must be an \.npz"):
        evaluate(good, folder)


def test_truncated_images_are_refused(tmp_path, weights_file):
    # A valid header for 4 images followed by half an image: refused when the file is opened
    # (the member is shorter than its header promises), before any image is read.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (4, 32, 32, 3)}
    )
    path = tmp_path / "truncated.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", header.getvalue() + bytes(32 * 32 * 3 // 2))
    with pytest.raises(ValueError, match="truncated"):
        evaluate(path, path, weights=weights_file, device="cpu", progress=False)


def test_evaluate_end_to_end_on_cpu(tmp_path, weights_file, monkeypatch):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, arr_0=_images(1))
    np.savez(b, arr_0=_images(2))
    # Reference statistics from a folder of PNGs holding the images of a.npz.
    folder = tmp_path / "a_png"
    folder.mkdir()
    for i, img in enumerate(_images(1)):
        Image.fromarray(img).save(folder / f"{i}.png")
    stats_path = tmp_path / "a_stats.npz"
    kwargs = dict(batch_size=3, device="cpu", progress=False)  # 3: a partial last batch
    saved = save_reference_statistics(folder, stats_path, weights=weights_file, **kwargs)
    assert saved == {"path": str(stats_path), "num_images": 4}
    with np.load(stats_path) as npz:
        assert {k: npz[k].shape for k in npz.files} == {
            "mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023),
            "pool_features": (4, 2048),
        }

    computed = evaluate(b, a, weights=weights_file, **kwargs)
    json.dumps(computed)
    assert computed["reference_statistics"] == "computed"
    assert computed["num_samples"] == computed["num_reference"] == 4
    assert computed["inception_weights"] == str(weights_file)
    assert computed["fid"] > 0 and computed["sfid"] > 0 and computed["inception_score"] >= 1
    assert 0 <= computed["precision"] <= 1 and 0 <= computed["recall"] <= 1

    # The same reference through its saved statistics (from PNGs of the same pixels; weights
    # from the environment) gives the same numbers: stored mu/sigma and pool features replace
    # the reference images.
    monkeypatch.setenv("EPG_INCEPTION_WEIGHTS", str(weights_file))
    precomputed = evaluate(b, stats_path, **kwargs)
    assert precomputed["reference_statistics"] == "precomputed"
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert precomputed[key] == pytest.approx(computed[key], rel=1e-6, abs=1e-9), key

    table = format_table(computed)
    for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
        assert name in table
    assert f"{computed['fid']:.4f}" in table and "samples: 4" in table


def test_evaluate_reports_the_metrics_of_its_activations(tmp_path, weights_file):
    # Samples = half the reference + three flat images: precision 4/7, recall 1, so swapped
    # arguments show, as does a sample count taken for the reference's. Computed independently of
    # evaluate()'s own plumbing, from the activations.
    reference = _images(2, n=8)
    samples = np.concatenate([reference[:4], np.zeros((2, 32, 32, 3), np.uint8),
                              np.full((1, 32, 32, 3), 255, np.uint8)])  # fmt: skip
    np.savez(tmp_path / "s.npz", arr_0=samples)
    np.savez(tmp_path / "r.npz", arr_0=reference)
    got = evaluate(tmp_path / "s.npz", tmp_path / "r.npz", weights=weights_file, device="cpu",
                   progress=False, batch_size=3)  # fmt: skip
    model = load_inception(weights_file, "cpu")
    a = compute_activations(samples, model, progress=False)
    b = compute_activations(reference, model, progress=False)
    precision, recall = precision_recall(b.pool, a.pool, device="cpu")
    assert precision != recall and (got["precision"], got["recall"]) == (precision, recall)
    assert (got["num_samples"], got["num_reference"]) == (7, 8)
    fid = FIDStatistics.from_features(a.pool).frechet_distance(FIDStatistics.from_features(b.pool))
    sfid = FIDStatistics.from_features(a.spatial).frechet_distance(FIDStatistics.from_features(b.spatial))
    assert got["fid"] == pytest.approx(fid, rel=1e-5) and got["sfid"] == pytest.approx(sfid, rel=1e-5)
    assert got["inception_score"] == pytest.approx(inception_score(a.logits), rel=1e-6)
    same = evaluate(tmp_path / "s.npz", tmp_path / "s.npz", weights=weights_file, device="cpu", progress=False)
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["sfid"] == pytest.approx(0, abs=1e-6)


def test_format_table_without_precision_and_recall():
    # A reference with statistics only (no images, no pool features) has no precision/recall.
    results = {
        "inception_score": 215.4321, "fid": 1.23456, "sfid": 4.5, "precision": None,
        "recall": None, "num_samples": 50000, "num_reference": None,
        "reference_statistics": "precomputed",
    }
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["Inception", "Score", "215.432"]
    assert lines[1].split() == ["FID", "1.2346"] and lines[3].split() == ["Precision", "n/a"]
    assert lines[-1] == "samples: 50000, reference points: n/a (reference statistics precomputed)"
