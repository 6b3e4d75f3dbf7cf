"""The CPU kernels of ``epg._C`` give the same bits on any number of threads.

With OpenMP (``_C.WITH_OPENMP``), ``at::parallel_for`` hands each thread a range that may start in
the middle of a sample (noise_precondition, the loss backward: per-sample σ or gradient factor),
of a sample's chunks (the loss forward) or of an image (the layout ops). The shapes below are
chosen so that 2 and 3 threads cut there; one thread is the serial path the other tests check
against the references. Skipped as a whole when the extension is not built.
"""

import os

import pytest
import torch
from helpers import assert_close
from test_extension_ops import randn, sigmas, uint8_images

_C = pytest.importorskip("epg._C")
E = torch.ops.epg_C

SD, SMIN, C_HUBER = 0.5, 0.008, 0.06
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# 71463 elements in 7 samples of 10209: above 2 grains (32768), so 3 threads get a range each,
# starting at 23821 and 47642 (inside samples 2 and 4).
SPLIT_SHAPE = (7, 3, 41, 83)
FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

pytestmark = pytest.mark.skipif(
    not getattr(_C, "WITH_OPENMP", 0),
    reason="epg._C was built without OpenMP: its CPU kernels run on one thread",
)


@pytest.fixture
def on_threads():
    """on_threads(fn) -> [fn() on 1 thread, on 2, on 3]; torch's thread count restored after."""
    before = torch.get_num_threads()

    def run(fn):
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = fn()
            results.append(out if isinstance(out, tuple) else (out,))
        return results

    yield run
    torch.set_num_threads(before)


def assert_same_bits(results, what):
    serial = results[0]
    for n, outs in enumerate(results[1:], start=2):
        for i, (a, b) in enumerate(zip(serial, outs)):
            assert a.dtype == b.dtype, f"{what}: output {i} is {b.dtype} on {n} threads"
            assert_close(b, a, atol=0, rtol=0, what=f"{what}: output {i} on {n} threads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["x0", "edm"])
def test_edm_scalings(on_threads, dtype, mode):
    sigma = sigmas(70001, dtype)
    results = on_threads(lambda: E.edm_scalings(sigma, SD, SMIN, mode))
    assert_same_bits(results, f"edm_scalings {dtype} {mode}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_noise_precondition(on_threads, dtype):
    x0, eps = randn(SPLIT_SHAPE, dtype, 1), randn(SPLIT_SHAPE, dtype, 2)
    sigma = sigmas(SPLIT_SHAPE[0], torch.float64 if dtype == torch.float64 else torch.float32)
    results = on_threads(lambda: E.noise_precondition(x0, eps, sigma, SD, SMIN, "edm"))
    assert_same_bits(results, f"noise_precondition {dtype}")
    # Every sample has its own σ, so a range using a neighbour's σ cannot give these bits.
    assert len(set(sigma.tolist())) == SPLIT_SHAPE[0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("loss", ["weighted_mse", "pseudo_huber"])
def test_loss_backward(on_threads, dtype, loss):
    pred, target = randn(SPLIT_SHAPE, dtype, 3), randn(SPLIT_SHAPE, dtype, 4)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(SPLIT_SHAPE[0], dtype=ct) + 0.5
    grad = torch.rand(SPLIT_SHAPE[0], dtype=ct) + 0.5
    if loss == "weighted_mse":
        results = on_threads(lambda: E.weighted_mse_loss_backward(grad, pred, target, weight))
    else:
        sqsum = E.pseudo_huber_loss(pred, target, weight, C_HUBER)[1]
        results = on_threads(
            lambda: E.pseudo_huber_loss_backward(grad, pred, target, weight, sqsum, C_HUBER)
        )
    assert_same_bits(results, f"{loss} backward {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["weighted_mse", "pseudo_huber"])
def test_loss_forward(on_threads, dtype, loss):
    """5 samples of 2 chunks (16384 + 3627): 10 tasks, grain 2, so 3 threads take 4, 4 and 2."""
    shape = (5, 20011)
    pred, target = randn(shape, dtype, 5), randn(shape, dtype, 6)
    weight = torch.rand(5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if loss == "weighted_mse":
        results = on_threads(lambda: E.weighted_mse_loss(pred, target, weight))
    else:
        results = on_threads(lambda: E.pseudo_huber_loss(pred, target, weight, C_HUBER))
    assert_same_bits(results, f"{loss} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_image_conversion(on_threads, dtype):
    """185 rows of 903 values, grain 36 rows: 2 threads cut at image 2 row 19, 3 threads at image
    1 row 25 and image 3 row 13."""
    images = uint8_images((5, 37, 301, 3), seed=7)
    flip = torch.tensor([True, False, True, True, False])
    results = on_threads(lambda: E.normalize_images(images, flip, MEAN, STD, dtype))
    assert_same_bits(results, f"normalize_images {dtype}")
    normalized = results[0][0]
    assert_same_bits(on_threads(lambda: E.to_uint8(normalized, MEAN, STD)), f"to_uint8 {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_patch_layout(on_threads, dtype):
    """320 rows of 624 values, grain 52 rows: 3 threads cut inside patch rows (image 1 row 43,
    image 3 row 22), 2 threads between two (image 2 row 32)."""
    shape = (5, 3, 64, 208)
    img = uint8_images(shape, seed=8).to(dtype)
    results = on_threads(lambda: E.patchify_hwc(img, 16))
    assert_same_bits(results, f"patchify_hwc {dtype}")
    tokens = results[0][0]
    assert_same_bits(on_threads(lambda: E.unpatchify_hwc(tokens, 16, 64)), f"unpatchify {dtype}")


def test_one_openmp_runtime_is_loaded(on_threads):
    """The extension must use torch's OpenMP runtime (one thread pool, one torch.set_num_threads),
    not load a second one beside it. Copies inside another wheel's <name>.libs folder (scikit-learn
    ships libgomp-<hash>.so) serve only that wheel and are not counted; torch's are, wherever
    they are and whatever their name."""
    maps = "/proc/self/maps"
    x = randn(SPLIT_SHAPE, torch.float32)
    on_threads(lambda: E.noise_precondition(x, x, sigmas(SPLIT_SHAPE[0]), SD, SMIN, "edm"))
    try:
        with open(maps) as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        pytest.skip(f"{maps} is not readable here")

    def other_wheel(path):
        folder = os.path.basename(os.path.dirname(path))
        return folder.endswith(".libs") and folder != "torch.libs"

    runtimes = [p for p in paths if os.path.basename(p).startswith(("libgomp", "libomp", "libiomp"))
                and not other_wheel(p)]  # fmt: skip
    assert len(runtimes) == 1, f"OpenMP runtimes loaded: {sorted(runtimes)}"
