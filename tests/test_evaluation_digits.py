"""The digits judge, the Fréchet distance, and the digits quality report."""

import json

import numpy as np
import pytest
import torch

from epg.data import load_digits_tensors
from epg.evaluation import DigitsJudge, digits_report, frechet_distance
from epg.seeding import torch_seed


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors("train"), load_digits_tensors("test")


@pytest.fixture(scope="module")
def judge(digits):
    (x_tr, y_tr), _ = digits
    return DigitsJudge(image_size=16, channels=1).fit(x_tr, y_tr, seed=0)


def test_judge_accuracy_on_held_out_digits(judge, digits):
    _, (x_te, y_te) = digits
    assert judge.accuracy(x_te, y_te) >= 0.95
    pred = judge.predict(x_te)
    assert pred.shape == y_te.shape and pred.dtype == torch.int64
    feats = judge.features(x_te)
    assert feats.shape == (len(y_te), judge.feature_dim) and feats.dtype == np.float64


def test_judge_is_deterministic_and_keeps_global_state(judge, digits):
    (x_tr, y_tr), (x_te, _) = digits
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    again = DigitsJudge().fit(x_tr[:300], y_tr[:300], epochs=2, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert torch.get_num_threads() == threads
    twice = DigitsJudge().fit(x_tr[:300], y_tr[:300], epochs=2, seed=0)
    assert np.array_equal(again.features(x_te), twice.features(x_te))


def test_judge_checks_its_input(judge):
    with pytest.raises(ValueError):
        judge.predict(torch.zeros(2, 3, 16, 16))
    with pytest.raises(RuntimeError):
        DigitsJudge().predict(torch.zeros(2, 1, 16, 16))


def test_judge_refuses_uint8_pixels_and_labels_of_another_shape(judge, digits):
    _, (x_te, y_te) = digits
    # uint8 pixels (e.g. PNGs read back) are not in [−1, 1]; judged as they are, they would give
    # a meaningless accuracy and distance.
    pixels = ((x_te[:20] + 1) * 127.5).round().to(torch.uint8)
    with pytest.raises(ValueError, match=r"float images in \[-1, 1\], got torch.uint8"):
        judge.predict(pixels)
    with pytest.raises(ValueError, match="float images"):
        digits_report(pixels, y_te[:20], judge, x_te)
    # (N, 1) labels would be compared with (N,) predictions as an (N, N) table.
    column = y_te[:20, None]
    message = r"sample_labels must be \(20,\), one per image, got \(20, 1\)"
    with pytest.raises(ValueError, match=message):
        digits_report(x_te[:20], column, judge, x_te)
    with pytest.raises(ValueError, match=r"labels must be \(20,\)"):
        judge.accuracy(x_te[:20], column)
    with pytest.raises(ValueError, match=r"labels must be \(20,\)"):
        digits_report(x_te[:30], y_te[:30], judge, (x_te[:20], column))
    unfitted = DigitsJudge()
    with pytest.raises(ValueError, match=r"labels must be \(20,\)"):
        unfitted.fit(x_te[:20], column, epochs=1)
    with pytest.raises(ValueError, match="float images"):
        unfitted.fit(pixels, y_te[:20], epochs=1)
    with pytest.raises(RuntimeError, match="not fitted"):  # a failed fit leaves no network
        unfitted.predict(x_te[:20])


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    few = rng.normal(size=(20, 64))  # N < F: singular covariances, regularised
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-4)


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 6)) @ np.diag([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    # Same sample, shifted: equal covariances, so d² = ‖μ_a − μ_b‖² exactly.
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-6)
    # Independent samples of the two Gaussians: analytic value up to sampling noise.
    b = rng.normal(size=(4000, 6)) @ np.diag([1.0, 2.0, 0.5, 1.0, 3.0, 1.0]) + shift
    assert frechet_distance(a, b) == pytest.approx(shift @ shift, abs=0.15 * (shift @ shift))


def test_frechet_distance_of_scaled_gaussians_in_one_dimension():
    # 1-D: d² = (μ_a − μ_b)² + (σ_a − σ_b)².
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2000, 1))
    z = (z - z.mean()) / z.std(ddof=1)
    assert frechet_distance(z, 3 * z + 1) == pytest.approx(1 + 4, rel=1e-6)


def test_digits_report_on_real_digits(judge, digits):
    (x_tr, _), (x_te, y_te) = digits
    # "Samples": half of the real test digits; real_test: the other half; reference: train.
    half = len(y_te) // 2
    report = digits_report(x_te[:half], y_te[:half], judge, (x_te[half:], y_te[half:]), x_tr)
    json.dumps(report)
    assert report["accuracy"] >= 0.95
    assert report["num_samples"] == half and report["num_reference"] == half
    assert report["num_real"] == len(y_te) - half
    assert report["real_test_accuracy"] >= 0.9
    assert len(report["class_accuracy"]) == 10
    ref = report["reference_frechet_distance"]
    assert 0 < ref and 0 < report["frechet_distance"] < 2 * ref
    # Real digits as samples against themselves: perfect.
    same = digits_report(x_te, y_te, judge, x_te)
    assert same["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert same["reference_frechet_distance"] is None and same["real_test_accuracy"] is None
    # Noise is far away, and its accuracy is near chance.
    noise = torch.rand(half, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = digits_report(noise, y_te[:half], judge, (x_te[half:], y_te[half:]), x_tr)
    assert bad["frechet_distance"] > 10 * ref and bad["accuracy"] < 0.3


def test_digits_report_values_are_their_definitions(judge, digits):
    # No sample asks for class 0 (its accuracy is None), class 1 gets some 0s as well.
    _, (x_te, y_te) = digits
    (x_tr, _), _ = digits
    labels = y_te[:100].clone()
    labels[labels == 0] = 1
    labels[labels == 9] = 8
    report = digits_report(x_te[:100], labels, judge, (x_te[100:], y_te[100:]), x_tr, seed=3)
    predicted = judge.predict(x_te[:100])
    for c in range(10):
        asked = labels == c
        expected = float((predicted[asked] == c).double().mean()) if asked.any() else None
        assert report["class_accuracy"][c] == expected, c
    # the reference distance: as many random training images as samples against the real test split
    picked = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(torch_seed(3)))[:100]
    reference = frechet_distance(judge.features(x_tr[picked]), judge.features(x_te[100:]))
    assert report["reference_frechet_distance"] == pytest.approx(reference, rel=1e-12)
    assert report["real_test_accuracy"] == judge.accuracy(x_te[100:], y_te[100:])


def test_judge_features_come_after_its_relu(judge, digits):
    features = judge.features(digits[1][0][:50])
    assert (features >= 0).all() and (features == 0).any()


def test_training_shifts_fill_with_black():
    from epg.evaluation.digits import _random_shift

    out = _random_shift(torch.ones(64, 1, 8, 8), 1, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {-1.0, 1.0}
