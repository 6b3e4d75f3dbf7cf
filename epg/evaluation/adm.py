"""ADM-compatible sample-quality metrics: FID, sFID, Inception Score, precision and recall.

The definitions follow the ADM evaluator (``guided-diffusion/evaluations/evaluator.py``), which
the EPG paper's numbers come from (epg-method.md §9):

* FID: Fréchet distance between Gaussians (mean, unbiased covariance) fitted to the 2048-d
  ``pool_3`` features of samples and reference; sFID: the same on the 2023-d spatial features
  ``mixed_6/conv[..., :7]``.
* Inception Score: softmax of ``pool_3 @ W`` (no bias) over 1008 classes, split into
  consecutive chunks of 5000 samples (the last may be shorter); per chunk exp(mean KL(p(y|x) ‖
  p(y))); the mean over chunks.
* Precision / recall (Kynkäänniemi et al., k = 3): squared Euclidean distances between pool
  features; each point's radius is the distance to its k-th nearest neighbour in its own set,
  the point itself counted as the 0-th; precision = fraction of samples within (≤) the radius
  of some reference point, recall = fraction of reference points within the radius of some
  sample. By default distances are computed as ADM's ``DistanceBlock`` computes them, in half
  precision per 10000×10000 block, falling back to float32 for a block that overflows.
* Reference batches: an ADM reference ``.npz`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``) whose
  precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` are used for FID/sFID as ADM uses them,
  and whose ``arr_0`` images give the reference features for precision/recall; or images only;
  or a statistics file written by :func:`save_reference_statistics` (the four statistics plus
  ``pool_features``, so no reference image is run through Inception again).

The numbers match the ADM evaluator only up to the TF→PyTorch port's small differences: the
port's FIDs agree with TF to ~1e-2 when the official port weights
(``pt_inception-2015-12-05-6726825d.pth``) are used. That agreement could not be checked here
(no weights file was reachable); the tests check each metric against closed forms and a naive
implementation, and the network's layout against the port's.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import queue
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.linalg.lapack
import torch
from tqdm.auto import tqdm

from .inception import (
    POOL_DIM,
    SPATIAL_DIM,
    InceptionV3,
    full_fp32,
    load_inception,
    resolve_weights,
)

INCEPTION_SCORE_SPLIT = 5000  # ADM's split_size
PR_NEIGHBOURHOOD = 3  # ADM's nhood_sizes=(3,)
PR_BLOCK = 10000  # ADM's row/col batch size; also the granularity of the float16 fallback
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
POOL_FEATURES_KEY = "pool_features"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """F with sigma = F Fᵀ, (d, rank), by rank-revealing pivoted Cholesky (LAPACK ``dpstrf``).

    Stops at LAPACK's default tolerance d·eps·max(diag): the neglected Schur complement is at
    rounding level, so a rank-deficient covariance (fewer samples than features) yields its
    exact low-rank factor instead of a square root polluted by noise eigenvalues.
    """
    if not np.any(np.diag(sigma) > 0):
        return np.zeros((len(sigma), 0))
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma, tol=-1.0, lower=1)
    if info < 0:
        raise ValueError(f"dpstrf rejected argument {-info}")
    factor = np.empty((len(sigma), rank))
    factor[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: rows back in original order
    return factor


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ₁ Σ₂)^½) for symmetric positive semi-definite Σ₁, Σ₂ (d, d), float64.

    With Σ₁ = L₁L₁ᵀ and Σ₂ = L₂L₂ᵀ, Σ₁Σ₂ has the nonzero eigenvalues of MMᵀ, M = L₁ᵀL₂, so the
    trace is the sum of M's singular values. Exact for singular covariances (no ε·I added, no
    ``scipy.linalg.sqrtm`` of an ill-conditioned product), and cheap when either is low-rank.
    Singular values rather than eigenvalues of MMᵀ: squaring would lose the ones below
    ~1e-8·max, which, over thousands of dimensions, add up.
    """
    m = _psd_factor(sigma1).T @ _psd_factor(sigma2)  # (r1, r2)
    if m.size == 0:
        return 0.0
    return float(np.linalg.svd(m, compute_uv=False).sum())


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between N(μ₁, Σ₁) and N(μ₂, Σ₂).

    ADM's ``FIDStatistics.frechet_distance`` with :func:`trace_sqrt_product` in place of
    ``scipy.linalg.sqrtm``: the two agree where sqrtm is accurate; this one stays exact for
    near-singular covariances. A rounding-level negative result is clamped to 0.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"statistics must be mu (d,), sigma (d, d) with equal d, got mu {mu1.shape}, "
            f"sigma {s1.shape} and mu {mu2.shape}, sigma {s2.shape}"
        )
    for name, arr in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} has non-finite entries")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product((s1 + s1.T) / 2, (s2 + s2.T) / 2)
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean), 0.0)


@dataclass(frozen=True)
class FIDStatistics:
    """Mean (d,) and unbiased covariance (d, d) of a feature set, float64 (ADM's class name)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features: np.ndarray) -> FIDStatistics:
        """Statistics of (N, d) features, N ≥ 2 (``np.cov`` with ddof 1, as ADM)."""
        feats = np.asarray(features)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"features must be (N, d) with N >= 2, got {feats.shape}")
        sigma = np.atleast_2d(np.cov(feats, rowvar=False, dtype=np.float64))
        return cls(feats.mean(axis=0, dtype=np.float64), sigma)

    def frechet_distance(self, other: FIDStatistics) -> float:
        return frechet_distance_from_stats(self.mu, self.sigma, other.mu, other.sigma)


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------


def inception_score(logits: np.ndarray, split_size: int = INCEPTION_SCORE_SPLIT) -> float:
    """ADM's Inception Score of (N, C) class logits.

    Splits are consecutive chunks of ``split_size`` (the last may be shorter); each scores
    exp(mean_x KL(p(y|x) ‖ mean_x p(y|x))); the result is the mean over chunks. Computed in
    float64 from log-softmax, with 0·log 0 = 0 (ADM's float32 ``part * log(part)`` gives NaN
    where a probability underflows to 0).
    """
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"logits must be (N, C) with N >= 1, got {z.shape}")
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start : start + split_size], log_p[start : start + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):  # classes no sample predicts
            log_marginal = np.log(part.mean(axis=0, keepdims=True))
            kl = np.where(part > 0, part * (log_part - log_marginal), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Precision and recall (ADM's ManifoldEstimator)
# ----------------------------------------------------------------------------------------------


def _sq_distances(u: torch.Tensor, v: torch.Tensor, distance_dtype: str) -> torch.Tensor:
    """(R, C) float32 squared distances ‖u_i − v_j‖² = ‖u_i‖² − 2 u_i·v_j + ‖v_j‖², clamped ≥ 0.

    "float16" emulates ADM's DistanceBlock: inputs cast to half, squares rounded to half, sums
    and dot products accumulated in float32 and rounded to half, then the combination in half
    arithmetic; a block with any non-finite entry is recomputed in float32, as ADM does.
    """
    if distance_dtype == "float16":
        u16, v16 = u.half(), v.half()
        norm_u = u16.square().float().sum(1).half()
        norm_v = v16.square().float().sum(1).half()
        dot = (u16.float() @ v16.float().T).half()
        d = (norm_u[:, None] - 2 * dot + norm_v[None, :]).clamp_min(0)
        if bool(torch.isfinite(d).all()):
            return d.float()
    elif distance_dtype != "float32":
        raise ValueError(f"distance_dtype must be 'float16' or 'float32', got {distance_dtype!r}")
    norm_u, norm_v = u.square().sum(1), v.square().sum(1)
    return (norm_u[:, None] - 2 * (u @ v.T) + norm_v[None, :]).clamp_min(0)


def _as_features(features, device, what: str, min_rows: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(features, np.float32)).to(device)
    if x.dim() != 2 or len(x) < min_rows:
        raise ValueError(f"{what} must be (N, d) with N >= {min_rows}, got {tuple(x.shape)}")
    return x


def _device(device) -> torch.device:
    """None or "auto": CUDA when available, else the CPU; else cpu, cuda or cuda:N.

    The resolution ``epg sample`` uses (:func:`epg.distributed.resolve_device`, without joining a
    process group), so an unknown name or a GPU that is not there is a ValueError saying what is
    available, not a CUDA traceback.
    """
    from ..distributed import resolve_device

    return resolve_device(device)


def _radii(x: torch.Tensor, k: int, block: int, distance_dtype: str) -> torch.Tensor:
    radii = torch.empty(len(x), device=x.device)
    for r0 in range(0, len(x), block):
        best = None  # (R, ≤ k+1) smallest distances of these rows so far, the row itself included
        for c0 in range(0, len(x), block):
            d = _sq_distances(x[r0 : r0 + block], x[c0 : c0 + block], distance_dtype)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + block] = best[:, k]
    return radii


def manifold_radii(
    features: np.ndarray,
    k: int = PR_NEIGHBOURHOOD,
    *,
    block_size: int = PR_BLOCK,
    distance_dtype: str = "float16",
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(N,) float32 squared distance of each point to its k-th nearest neighbour in the set.

    The point itself is the 0-th neighbour (ADM takes the k-th smallest entry of the full
    distance row), so duplicates count as neighbours. Memory: one block_size² block at a time.
    """
    dev = _device(device)
    with full_fp32(dev):
        x = _as_features(features, dev, "features", k + 1)
        return _radii(x, k, block_size, distance_dtype).cpu().numpy()


def precision_recall(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    k: int = PR_NEIGHBOURHOOD,
    *,
    block_size: int = PR_BLOCK,
    distance_dtype: str = "float16",
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """ADM's (precision, recall) of samples against a reference, both (N, d) features.

    precision: fraction of samples at squared distance ≤ radius of at least one reference
    point; recall: fraction of reference points at squared distance ≤ radius of at least one
    sample (radii from :func:`manifold_radii` within each set). Blocked, so 50k × 50k runs in
    block_size² memory.
    """
    dev = _device(device)
    with full_fp32(dev):
        ref = _as_features(ref_features, dev, "ref_features", k + 1)
        smp = _as_features(sample_features, dev, "sample_features", k + 1)
        if ref.shape[1] != smp.shape[1]:
            raise ValueError(f"feature sizes differ: {ref.shape[1]} and {smp.shape[1]}")
        ref_radii = _radii(ref, k, block_size, distance_dtype)
        smp_radii = _radii(smp, k, block_size, distance_dtype)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=dev)
        smp_in = torch.zeros(len(smp), dtype=torch.bool, device=dev)
        for r0 in range(0, len(ref), block_size):
            r1 = r0 + block_size
            for s0 in range(0, len(smp), block_size):
                s1 = s0 + block_size
                # Rows reference, columns samples, as ADM orders them (half rounding is not
                # symmetric in the two operands).
                d = _sq_distances(ref[r0:r1], smp[s0:s1], distance_dtype)
                ref_in[r0:r1] |= (d <= smp_radii[None, s0:s1]).any(dim=1)
                smp_in[s0:s1] |= (d <= ref_radii[r0:r1, None]).any(dim=0)
        return float(smp_in.double().mean()), float(ref_in.double().mean())


# ----------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------


def _read_exactly(f, size: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            raise ValueError(f"{what} is truncated: expected {size} more bytes, got {got}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _check_batch_size(batch_size) -> None:
    integral = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if not integral or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_count(what: str, n: int) -> None:
    # Each point's radius is its k-th neighbour among the others of its set.
    if n < PR_NEIGHBOURHOOD + 1:
        raise ValueError(f"{what} holds {n} images; need at least {PR_NEIGHBOURHOOD + 1}")


def _check_images_shape(shape, dtype, what: str) -> None:
    # (N, H, W, 1) is what `epg sample` saves for a 1-channel network; it is repeated to RGB,
    # as a folder of gray images is.
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] < 1:
        raise ValueError(
            f"{what} must hold uint8 images (N, H, W, 3) in [0, 255] (ADM's arr_0 layout), or "
            f"(N, H, W, 1) gray ones, got {np.dtype(dtype).name} {tuple(shape)}"
        )


def _as_rgb(batch: np.ndarray) -> np.ndarray:
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


class _NpzImages:
    """The uint8 (N, H, W, 3 or 1) ``arr_0`` of an .npz, streamed in RGB batches (never loaded
    whole)."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        self.name = f"{self.path}[{key}]"
        if not self.path.is_file():
            raise FileNotFoundError(f"no such .npz file: {self.path}")
        with self._member() as (f, member_size):
            self.shape = self._header(f)
            # The zip directory records the member's size: a short member is found here,
            # before any image has gone through the network, not when the stream runs dry.
            expected = f.tell() + int(np.prod(self.shape))  # uint8: a byte per value
            if member_size < expected:
                raise ValueError(
                    f"{self.name} is truncated: its .npy header promises uint8 {self.shape}, "
                    f"{expected} bytes with the header, but the member holds {member_size}"
                )

    @contextlib.contextmanager
    def _member(self):
        """The open .npy member and its uncompressed size."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = zf.namelist()
                if f"{self.key}.npy" not in names:
                    arrays = sorted(n.removesuffix(".npy") for n in names)
                    raise ValueError(f"{self.path} has no '{self.key}' array (it holds {arrays})")
                with zf.open(f"{self.key}.npy") as f:
                    yield f, zf.getinfo(f"{self.key}.npy").file_size
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise ValueError(
                f"{self.path} is not a valid .npz file (corrupt or not a zip): {exc}"
            ) from exc

    def _header(self, f) -> tuple[int, ...]:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as exc:
            raise ValueError(f"{self.name} is not a readable .npy array: {exc}") from exc
        _check_images_shape(shape, dtype, self.name)
        if fortran:
            raise ValueError(f"{self.name} is stored in Fortran order; save it C-contiguous")
        return tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape[1:]))
        with self._member() as (f, _):
            self._header(f)
            for start in range(0, len(self), batch_size):
                b = min(batch_size, len(self) - start)
                data = _read_exactly(f, b * row, self.name)
                yield _as_rgb(np.frombuffer(data, np.uint8).reshape(b, *self.shape[1:]))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    # epg prepare's conversion: Pillow's convert("RGB") would clip 16-bit gray to white.
    from ..data.folder import to_rgb

    try:
        with Image.open(path) as im:
            return np.asarray(to_rgb(im))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


_TAIL_BYTES = 4096  # where a whole file's end marker must be (bytes after it are tolerated)


def _image_size(path: Path) -> tuple[int, int]:
    """(W, H) from the header, after a look at the file's end: a file cut short (an interrupted
    write or copy) fails here, before any image has gone through the network, not when its
    batch is decoded."""
    from PIL import Image, UnidentifiedImageError

    from ..data.folder import JPEG_END, PNG_END

    try:
        with Image.open(path) as im:
            size, marker = im.size, {"PNG": PNG_END, "JPEG": JPEG_END}.get(im.format)
        if marker is not None:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
                complete = marker in f.read()
            if not complete:
                raise ValueError(f"cannot read image {path}: it is truncated (no {im.format} end marker in "
                                 "its last bytes), as an interrupted write or copy leaves a file")  # fmt: skip
        return size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


class _FolderImages:
    """Image files under a folder (recursively, sorted by path), all of one size, as RGB."""

    def __init__(self, folder: str | os.PathLike):
        self.name = str(folder)
        folder = Path(folder)
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.shape = (len(self.files), *_read_image(self.files[0]).shape)
        # Sizes come from the file headers (nothing decoded), so a stray size or a truncated
        # file fails here, before any image has gone through the network.
        for path in self.files:
            self._check_size(path, _image_size(path))

    def _check_size(self, path: Path, size: tuple[int, int]) -> None:
        if size != (self.shape[2], self.shape[1]):
            raise ValueError(
                f"{path} is {size[0]}×{size[1]}, but {self.files[0]} is "
                f"{self.shape[2]}×{self.shape[1]}: all images must have one size"
            )

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), batch_size):
            images = []
            for path in self.files[start : start + batch_size]:
                img = _read_image(path)
                self._check_size(path, (img.shape[1], img.shape[0]))
                images.append(img)
            yield np.stack(images)


class _ArrayImages:
    def __init__(self, images: np.ndarray):
        _check_images_shape(images.shape, images.dtype, "images")
        self.images, self.shape, self.name = images, images.shape, "array"

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.images), batch_size):
            yield _as_rgb(self.images[start : start + batch_size])


def _open_images(source):
    if isinstance(source, np.ndarray):
        return _ArrayImages(source)
    path = Path(source)
    if path.is_dir():
        return _FolderImages(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image batch: {path} (expected an .npz or a folder)")
    return _NpzImages(path)


def _prefetch(batches: Iterator[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
    """Read (and decompress / decode) the next batches on a thread while the network runs."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------------------------
# Activations and evaluation
# ----------------------------------------------------------------------------------------------


class Activations(NamedTuple):
    """Inception outputs of an image set, float32 numpy on the CPU."""

    pool: np.ndarray  # (N, 2048)
    spatial: np.ndarray  # (N, 2023)
    logits: np.ndarray  # (N, 1008), no bias (ADM's Inception Score input)


@torch.no_grad()
def compute_activations(
    images,
    model: InceptionV3,
    *,
    batch_size: int = 200,
    progress: bool = True,
    desc: str = "Inception",
) -> Activations:
    """Run ``images`` through ``model`` in batches on the model's device.

    Args:
        images: an .npz path (``arr_0``, uint8 (N, H, W, 3), or (N, H, W, 1) gray, repeated
            to RGB), a folder of image files, or a uint8 array of the same layout.
    """
    _check_batch_size(batch_size)
    source = images if hasattr(images, "batches") else _open_images(images)
    device = model.fc.weight.device
    out: list[list[np.ndarray]] = [[], [], []]
    with tqdm(total=len(source), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in _prefetch(source.batches(batch_size)):
            # A copy: batches streamed from an .npz are read-only views of the file's bytes.
            feats = model(torch.from_numpy(np.array(batch)).to(device))
            for acc, t in zip(out, feats):
                acc.append(t.float().cpu().numpy())
            bar.update(len(batch))
    return Activations(*(np.concatenate(acc) for acc in out))


class _Reference:
    """What an ADM-style reference .npz provides: statistics, images, pool features."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(
                f"{self.path} is a folder; the reference must be an .npz: an ADM reference batch, "
                "or the statistics that save_reference_statistics (epg evaluate FOLDER "
                "--save-ref OUT.npz) writes from a folder of images"
            )
        if not self.path.is_file():
            raise FileNotFoundError(f"no such reference .npz: {self.path}")
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path} is not a valid .npz file (corrupt or not a zip)")
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                keys = set(npz.files)
                present = [k for k in STAT_KEYS if k in keys]
                if present and len(present) < len(STAT_KEYS):
                    missing = [k for k in STAT_KEYS if k not in keys]
                    raise ValueError(f"{self.path} has {present} but lacks {missing}")
                self.stats = None
                if present:
                    self.stats = (
                        self._stat(npz, "mu", "sigma", POOL_DIM),
                        self._stat(npz, "mu_s", "sigma_s", SPATIAL_DIM),
                    )
                self.pool_features = None
                if POOL_FEATURES_KEY in keys:
                    feats = self._array(npz, POOL_FEATURES_KEY)
                    if feats.ndim != 2 or feats.shape[1] != POOL_DIM or feats.dtype.kind != "f":
                        raise ValueError(
                            f"{self.path}[{POOL_FEATURES_KEY}] must be float (N, {POOL_DIM}), "
                            f"got {feats.dtype.name} {feats.shape}"
                        )
                    self._check_finite(POOL_FEATURES_KEY, feats)
                    self.pool_features = feats.astype(np.float32)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise ValueError(f"{self.path} is not a valid .npz file: {exc}") from exc
        self.images = _NpzImages(self.path) if "arr_0" in keys else None
        if self.stats is None and self.images is None:
            raise ValueError(
                f"{self.path} holds neither images (arr_0) nor statistics "
                f"({', '.join(STAT_KEYS)}); it holds {sorted(keys)}"
            )

    def _array(self, npz, key: str) -> np.ndarray:
        # numpy's own error for a short member ("EOF: reading array data") names no file.
        try:
            return npz[key]
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
            raise ValueError(
                f"{self.path}[{key}] cannot be read (truncated or corrupt): {exc}"
            ) from exc

    def _check_finite(self, key: str, arr: np.ndarray) -> None:
        # Checked on loading, so a damaged reference is named before the samples' Inception
        # pass, not by the Fréchet distance afterwards.
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ValueError(
                f"{self.path}[{key}] has {bad} non-finite entries (NaN or inf); a reference's "
                "statistics and features must be finite"
            )

    def _stat(self, npz, mu_key: str, sigma_key: str, dim: int) -> FIDStatistics:
        mu, sigma = self._array(npz, mu_key), self._array(npz, sigma_key)
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise ValueError(
                f"{self.path}: {mu_key} {mu.shape} / {sigma_key} {sigma.shape} should be "
                f"({dim},) / ({dim}, {dim})"
            )
        for key, arr in ((mu_key, mu), (sigma_key, sigma)):
            if arr.dtype.kind != "f":
                raise ValueError(f"{self.path}[{key}] must be a float array, got {arr.dtype.name}")
            self._check_finite(key, arr)
        return FIDStatistics(mu.astype(np.float64), sigma.astype(np.float64))


def evaluate(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    batch_size: int = 200,
    device: str | torch.device | None = None,
    progress: bool = True,
    distance_dtype: str = "float16",
) -> dict:
    """ADM's evaluation of a sample batch against a reference batch; JSON-serialisable dict.

    Args:
        samples: .npz with ``arr_0`` uint8 (N, H, W, 3), or (N, H, W, 1) for a 1-channel
            network (``epg sample``'s / ADM's layout), or a folder of image files.
        reference: ADM reference .npz (precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` are
            used for FID/sFID; ``arr_0`` images, or ``pool_features`` from
            :func:`save_reference_statistics`, for precision/recall).
        weights: the Inception weights file (default ``$EPG_INCEPTION_WEIGHTS``; see
            :func:`epg.evaluation.inception.load_inception`).
        device: cpu, cuda, cuda:N or auto (the default: CUDA when available).
        distance_dtype: see :func:`precision_recall`.
    Returns:
        ``inception_score``, ``fid``, ``sfid``, ``precision``, ``recall`` (the last two None when
        the reference has statistics only), ``num_samples``, ``num_reference`` (reference points
        behind precision/recall, None without them), ``reference_statistics`` ("precomputed" or
        "computed"), ``inception_weights`` (the file used).

    Values match the ADM evaluator up to the TF→PyTorch Inception port's small differences
    (see the module docstring); with fewer than ~2048 samples FID is strongly biased upward.
    """
    _check_batch_size(batch_size)
    dev = _device(device)
    # Both inputs are opened and checked (headers, member sizes, reference statistics) before
    # Inception runs, so a damaged file is named before the samples' pass, not after.
    sample_source = _open_images(samples)
    ref = _Reference(reference)
    _check_count(sample_source.name, len(sample_source))
    # The reference points of precision/recall (and of FID without stored statistics) are
    # counted here too, not after every sample has gone through the network.
    if ref.pool_features is not None:
        _check_count(f"{ref.path}[{POOL_FEATURES_KEY}]", len(ref.pool_features))
    elif ref.images is not None:
        _check_count(ref.images.name, len(ref.images))
    weights_path = resolve_weights(weights)
    model = load_inception(weights_path, dev)
    acts = compute_activations(
        sample_source, model, batch_size=batch_size, progress=progress, desc="Inception (samples)"
    )
    ref_pool, ref_acts = ref.pool_features, None
    if ref.images is not None and (ref_pool is None or ref.stats is None):
        ref_acts = compute_activations(
            ref.images, model, batch_size=batch_size, progress=progress,
            desc="Inception (reference)",
        )
        ref_pool = ref_acts.pool
    if ref.stats is not None:
        ref_stats, ref_stats_spatial = ref.stats
    else:
        ref_stats = FIDStatistics.from_features(ref_acts.pool)
        ref_stats_spatial = FIDStatistics.from_features(ref_acts.spatial)
    results = {
        "inception_score": inception_score(acts.logits),
        "fid": FIDStatistics.from_features(acts.pool).frechet_distance(ref_stats),
        "sfid": FIDStatistics.from_features(acts.spatial).frechet_distance(ref_stats_spatial),
        "precision": None,
        "recall": None,
        "num_samples": len(acts.pool),
        "num_reference": None,
        "reference_statistics": "precomputed" if ref.stats is not None else "computed",
        "inception_weights": str(weights_path),
    }
    if ref_pool is not None:
        precision, recall = precision_recall(
            ref_pool, acts.pool, device=dev, distance_dtype=distance_dtype
        )
        results.update(precision=precision, recall=recall, num_reference=len(ref_pool))
    return results


def format_table(results: dict) -> str:
    """The metrics of :func:`evaluate` as an aligned text table (ADM's order)."""

    def fmt(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows = [
        ("Inception Score", fmt(results["inception_score"], 3)),
        ("FID", fmt(results["fid"], 4)),
        ("sFID", fmt(results["sfid"], 4)),
        ("Precision", fmt(results["precision"], 4)),
        ("Recall", fmt(results["recall"], 4)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value:>10}" for name, value in rows]
    ref = results["num_reference"]
    lines.append(
        f"samples: {results['num_samples']}, reference points: {'n/a' if ref is None else ref} "
        f"(reference statistics {results['reference_statistics']})"
    )
    return "\n".join(lines)


def save_reference_statistics(
    source,
    out_path: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    batch_size: int = 200,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Compute a reference batch's statistics once and save them for :func:`evaluate`.

    Args:
        source: .npz with ``arr_0`` uint8 (N, H, W, 3) or (N, H, W, 1), a folder of image
            files (one size), or a uint8 array.
        out_path: the .npz to write (atomically): ``mu``, ``sigma`` (2048), ``mu_s``,
            ``sigma_s`` (2023), float64, as in ADM reference batches, plus ``pool_features``
            (N, 2048) float32 for precision/recall. It holds no images, so the original ADM
            evaluator cannot use it for precision/recall; :func:`evaluate` can.
    Returns:
        ``path`` and ``num_images``.
    """
    from ..checkpoint import atomic_write

    _check_batch_size(batch_size)
    dev = _device(device)
    images = _open_images(source)
    _check_count(images.name, len(images))
    model = load_inception(weights, dev)
    acts = compute_activations(
        images, model, batch_size=batch_size, progress=progress, desc="Inception (reference)"
    )
    stats = FIDStatistics.from_features(acts.pool)
    spatial = FIDStatistics.from_features(acts.spatial)
    arrays = {
        "mu": stats.mu,
        "sigma": stats.sigma,
        "mu_s": spatial.mu,
        "sigma_s": spatial.sigma,
        POOL_FEATURES_KEY: acts.pool,
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to tmp
            np.savez(f, **arrays)

    atomic_write(out_path, write)
    return {"path": str(out_path), "num_images": len(acts.pool)}
