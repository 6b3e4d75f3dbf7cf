"""Inception-V3 as the ADM evaluator runs it, in the parameter layout of the PyTorch FID port.

The ADM evaluator (``guided-diffusion/evaluations/evaluator.py``) feeds images to TensorFlow's
2015 ImageNet graph (``classify_image_graph_def.pb``). The widely used PyTorch port of that
graph, the pytorch-fid "FID Inception", ships its weights as
``pt_inception-2015-12-05-6726825d.pth``; :class:`InceptionV3` has exactly that file's state-dict
names and shapes (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...,
``fc.weight`` (1008, 2048)), so the file loads strictly. The code is written here from the
architecture, not taken from either project.

Where the TF graph and torchvision's Inception differ, this follows the graph:

* every average pool ignores its zero padding (``count_include_pad=False``, TF's SAME pooling)
  and Mixed_7c's pool branch takes a max, not an average;
* BatchNorm eps is 1e-3;
* images are resized to 299×299 with TF1's ``ResizeBilinear`` (``align_corners=False`` and no
  half-pixel centres: source coordinate = destination · in/out), the graph's own first op, and
  then scaled by ``(x − 128) / 128``, the graph's ``Sub``/``Mul``. pytorch-fid instead resizes
  with ``F.interpolate`` (half-pixel centres) and scales by ``x/127.5 − 1``, one of the reasons
  its FIDs differ from TF's in the second decimal.

Outputs (:class:`InceptionOutput`) carry the ADM evaluator's meanings: ``pool`` is ``pool_3:0``
(2048, FID and precision/recall), ``spatial`` is ``mixed_6/conv:0[..., :7]`` (the 1×1 branch of
the fourth 17×17 block, Mixed_6d, after BN+ReLU, its first 7 of 192 channels, flattened in TF's
H, W, C order: 17·17·7 = 2023, sFID), ``logits`` is ``pool_3 @ softmax/logits`` weights without
the bias, exactly the logits ADM's Inception Score takes a softmax of.

Agreement with the ADM evaluator holds only up to the TF→PyTorch port's small differences (the
port's FIDs agree with TF to ~1e-2 when the official port weights are used); that agreement with
the official weights has not been checked here (no weights file was reachable). The weights are
never downloaded: pass the file's path, or set ``EPG_INCEPTION_WEIGHTS``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_ENV = "EPG_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_PATTERN = "pt_inception-2015-12-05-*.pth"
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the 2015 graph's softmax: 1000 ImageNet classes plus 8 unused
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023


class InceptionOutput(NamedTuple):
    """Per-image features, float32 on the network's device."""

    pool: Tensor  # (N, 2048) pool_3
    spatial: Tensor  # (N, 2023) mixed_6/conv[..., :7], flattened H, W, C
    logits: Tensor  # (N, 1008) pool_3 @ W, no bias (ADM's Inception Score input)


# ----------------------------------------------------------------------------------------------
# Preprocessing: the TF graph's ResizeBilinear → Sub 128 → Mul 1/128
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _tf_legacy_bilinear_matrix(in_size: int, out_size: int) -> Tensor:
    """(out_size, in_size) float64 matrix of TF1 ResizeBilinear along one axis.

    Row o interpolates between floor(s) and min(floor(s) + 1, in − 1) at s = o · in/out: the
    old TF rule (no half-pixel offset), under which the last rows repeat the edge pixel.
    """
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def tf_resize_bilinear(x: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """Resize (N, C, H, W) float images to (N, C, size, size) as TF1's ResizeBilinear does.

    Separable, so done as two small matrix products (exact for any H, W; identity when H = W =
    size).
    """
    h, w = x.shape[-2:]
    mh = _tf_legacy_bilinear_matrix(h, size).to(x.device, x.dtype)
    mw = _tf_legacy_bilinear_matrix(w, size).to(x.device, x.dtype)
    return mh @ x @ mw.T  # (N, C, size, W) then (N, C, size, size)


def preprocess(images: Tensor | np.ndarray) -> Tensor:
    """Images → the network's (N, 3, 299, 299) float32 input in [−1, 1).

    Args:
        images: uint8 (N, H, W, 3) in [0, 255] (the ADM ``arr_0`` layout), or floating
            (N, 3, H, W) in [−1, 1] (epg's sample convention), mapped to [0, 255] by
            ``(x + 1) · 127.5`` without rounding. The ADM evaluator sees PNG-quantised uint8
            images; pass uint8 to reproduce it.
    """
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float()
    elif x.is_floating_point():
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = (x.float() + 1.0) * 127.5
    else:
        raise ValueError(f"images must be uint8 (N, H, W, 3) or float (N, 3, H, W), got {x.dtype}")
    return (tf_resize_bilinear(x) - 128.0) / 128.0


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3) → ReLU; state-dict names ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: Tensor) -> Tensor:
    # TF's SAME average pool divides by the number of real pixels in each window.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Mixed35(nn.Module):
    """35×35 block (Mixed_5b/c/d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 64, 1)
        self.branch5x5_1 = ConvBNReLU(cin, 48, 1)
        self.branch5x5_2 = ConvBNReLU(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, padding=1)
        self.branch_pool = ConvBNReLU(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_same(x)),
            ],
            dim=1,
        )  # (N, 224 + pool_features, 35, 35)


class Reduce35to17(nn.Module):
    """Grid reduction Mixed_6a: 3×3/2 | 1×1→3×3→3×3/2 | max-pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBNReLU(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBNReLU(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            dim=1,
        )  # (N, 768, 17, 17)


class Mixed17(nn.Module):
    """17×17 block (Mixed_6b–e) with factorised 7×7 convolutions of width ``c7``."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 192, 1)
        self.branch7x7_1 = ConvBNReLU(cin, c7, 1)
        self.branch7x7_2 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBNReLU(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBNReLU(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBNReLU(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBNReLU(cin, 192, 1)

    def branches(self, x: Tensor) -> list[Tensor]:
        """The four branch outputs, each (N, 192, 17, 17); the first is TF's ``mixed_k/conv``."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            b7dbl = conv(b7dbl)
        b7dbl = self.branch7x7dbl_5(b7dbl)
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_same(x))]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), dim=1)  # (N, 768, 17, 17)


class Reduce17to8(nn.Module):
    """Grid reduction Mixed_7a: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(cin, 192, 1)
        self.branch3x3_2 = ConvBNReLU(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(cin, 192, 1)
        self.branch7x7x3_2 = ConvBNReLU(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBNReLU(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBNReLU(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                self.branch7x7x3_4(b7),
                F.max_pool2d(x, 3, stride=2),
            ],
            dim=1,
        )  # (N, 1280, 8, 8)


class Mixed8(nn.Module):
    """8×8 block (Mixed_7b/c) with split 1×3 / 3×1 outputs; ``pool`` is the TF graph's choice
    for the pool branch: "avg" in Mixed_7b, "max" in Mixed_7c."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBNReLU(cin, 320, 1)
        self.branch3x3_1 = ConvBNReLU(cin, 384, 1)
        self.branch3x3_2a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBNReLU(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBNReLU(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBNReLU(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = _avg_pool_same(x)
        else:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)  # −inf padding = TF SAME max pool
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(b3dbl),
                self.branch3x3dbl_3b(b3dbl),
                self.branch_pool(pooled),
            ],
            dim=1,
        )  # (N, 2048, 8, 8)


class InceptionV3(nn.Module):
    """The FID Inception-V3 (TF 2015 graph, PyTorch-port parameter names), eval-only.

    ``forward(images)`` takes raw images (see :func:`preprocess`) and returns
    :class:`InceptionOutput`. Build with random weights here; load the real ones with
    :func:`load_inception`.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBNReLU(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBNReLU(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBNReLU(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBNReLU(80, 192, 3)
        self.Mixed_5b = Mixed35(192, pool_features=32)
        self.Mixed_5c = Mixed35(256, pool_features=64)
        self.Mixed_5d = Mixed35(288, pool_features=64)
        self.Mixed_6a = Reduce35to17(288)
        self.Mixed_6b = Mixed17(768, c7=128)
        self.Mixed_6c = Mixed17(768, c7=160)
        self.Mixed_6d = Mixed17(768, c7=160)
        self.Mixed_6e = Mixed17(768, c7=192)
        self.Mixed_7a = Reduce17to8(768)
        self.Mixed_7b = Mixed8(1280, pool="avg")
        self.Mixed_7c = Mixed8(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.eval()

    def features(self, x: Tensor) -> InceptionOutput:
        """Features of preprocessed input x (N, 3, 299, 299) in [−1, 1]."""
        x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))  # (N, 32, 147, 147)
        x = F.max_pool2d(self.Conv2d_2b_3x3(x), 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        # TF's mixed_6/conv is NHWC; ADM keeps channels [:7] and flattens as H, W, C, so the
        # order must match for precomputed reference statistics (mu_s, sigma_s) to apply.
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 2023)
        x = self.Mixed_6e(torch.cat(branches, dim=1))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        # ADM's Inception Score multiplies by softmax/logits' weight only, without the bias.
        logits = pool @ self.fc.weight.T  # (N, 1008)
        return InceptionOutput(pool, spatial, logits)

    def forward(self, images: Tensor | np.ndarray) -> InceptionOutput:
        device = self.fc.weight.device
        with full_fp32(device):
            return self.features(preprocess(torch.as_tensor(images).to(device)))


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """Run CUDA convolutions and matmuls in IEEE float32 (no TF32), as TF ran the graph.

    cuDNN convolutions default to TF32 on Ampere and later, which moves Inception features by
    ~1e-3 relative. Only the newer per-backend flags are touched (mixing them with the legacy
    ``allow_tf32`` flags makes PyTorch raise), and they are restored on exit.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):  # PyTorch before the new flags
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        return
    matmul = torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def _how_to_provide() -> str:
    return (
        f"epg never downloads it: pass the path of {WEIGHTS_FILENAME} (the PyTorch port of the "
        f"TF FID Inception, {WEIGHTS_PATTERN}, as released by pytorch-fid) as the weights "
        f"argument, or set {WEIGHTS_ENV} to it"
    )


def resolve_weights(weights: str | os.PathLike | None = None) -> Path:
    """The weights file: ``weights`` if given, else ``$EPG_INCEPTION_WEIGHTS``.

    A directory is searched for one ``pt_inception-2015-12-05-*.pth``.
    """
    if weights is None:
        env = os.environ.get(WEIGHTS_ENV)
        if not env:
            raise FileNotFoundError(f"no Inception weights given; {_how_to_provide()}")
        path, source = Path(env).expanduser(), f"${WEIGHTS_ENV}"
    else:
        path, source = Path(weights).expanduser(), "the weights argument"
    if path.is_dir():
        found = sorted(path.glob(WEIGHTS_PATTERN))
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} files matching"
            raise FileNotFoundError(
                f"{path} (from {source}) holds {what} {WEIGHTS_PATTERN}; {_how_to_provide()}"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file {path} (from {source}) does not exist; expected "
            f"{WEIGHTS_FILENAME}; {_how_to_provide()}"
        )
    return path


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_state_dict_checked(model: InceptionV3, state: dict, origin: str) -> None:
    """Load ``state`` strictly, naming every missing, unexpected and mis-shaped key.

    BatchNorm ``num_batches_tracked`` counters are optional (eval-only; files from older
    PyTorch versions lack them).
    """
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{origin} is not a state dict of tensors (got {type(state).__name__})")
    own = model.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    mis_shaped = sorted(
        f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"wrong shapes: {_listing(mis_shaped)}")
    if problems:
        raise ValueError(
            f"{origin} does not fit the FID Inception-V3 ({WEIGHTS_FILENAME} layout): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)


def load_inception(
    weights: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> InceptionV3:
    """The FID Inception-V3 with weights from a local file, in eval mode on ``device``.

    Args:
        weights: path of ``pt_inception-2015-12-05-6726825d.pth`` (or a folder holding it);
            default ``$EPG_INCEPTION_WEIGHTS``. Read with ``torch.load(weights_only=True)``.
        device: default CUDA when available, else CPU.
    """
    path = resolve_weights(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler raises this both for objects it will not build (a pickle
        # that would run code) and for bytes that are no pickle at all.
        text = str(exc)
        detail = next(
            (ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln), text[:200]
        )
        if "Unsupported global" in text:
            raise ValueError(
                f"refusing to load {path}: it is not a plain tensor file, and unpickling it could "
                f"run code ({detail})"
            ) from exc
        raise ValueError(f"{path} is corrupt or not a PyTorch weights file: {detail}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is corrupt or not a PyTorch weights file: {exc}") from exc
    model = InceptionV3()
    load_state_dict_checked(model, state, str(path))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()
