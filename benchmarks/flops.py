"""FLOP and byte counts for the benchmarks, and the peak rates MFU is quoted against.

Convention (used for every FLOP figure the benchmarks report):

* FLOPs are the multiply-adds of matrix products, counted as 2 FLOPs each. Included: every
  ``Linear``, the patch embedding (a matmul over C·p·p features per token), the output head, and
  attention's two batched products, Q·Kᵀ and P·V (2·T²·Dh multiply-adds per head). Not counted:
  normalisations, softmax, activations, residual adds, embeddings lookups and other elementwise
  work (their figure of merit is bytes moved, not FLOPs), and in training steps the stage-1
  InfoNCE logits (2·B·M·D per term, under 0.01% of a step at the paper's sizes).
* A training pass through a network whose weights train costs 3× its forward (the backward does
  an input-gradient and a weight-gradient product per forward product); a pass that only needs
  input gradients (the frozen perceptual network of the consistency loss) costs 2×; a ``no_grad``
  pass 1×. Recomputation inside a backward (attention recomputing P) is not counted: these are
  model FLOPs, the quantity MFU divides by the peak.
* Bytes moved are the minimum an op must touch: every input read once and every output written
  once, at the dtypes of the benchmark case (intermediates and saved statistics not counted).

This module needs no torch: configs are read by attribute (``epg.models`` config dataclasses).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against
# torch.cuda.get_device_name() in order; the first substring found wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)

NUM_EXTRA_TOKENS = 2  # [cls (+ class), time] before the patch tokens (epg.models.networks)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None for a device not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# --- networks -------------------------------------------------------------------------------------


def _mlp_hidden(dim: int, mlp_ratio: float) -> int:
    return int(dim * mlp_ratio)  # as epg.models.layers.Mlp


def _block_macs(tokens: int, dim: int, mlp_ratio: float) -> dict[str, int]:
    """Per-sample multiply-adds of one pre-norm transformer block (attention + MLP)."""
    hidden = _mlp_hidden(dim, mlp_ratio)
    return {
        "qkv": tokens * dim * 3 * dim,
        "attention": 2 * tokens * tokens * dim,  # Q·Kᵀ and P·V, summed over heads (H·Dh = dim)
        "proj": tokens * dim * dim,
        "mlp": 2 * tokens * dim * hidden,
    }


def forward_macs(config) -> dict[str, int]:
    """Per-image multiply-adds of one forward pass, by part, for an EPG or RCM config.

    EPG (generative): patch embedding, encoder blocks, encoder→decoder linear (when the widths
    differ), decoder blocks (long-skip linear on [x, skip] for the first ``depth`` of them, adaLN
    modulation once per sample, attention, MLP) and the output head on the patch tokens.
    RCM (stage 1): patch embedding, encoder blocks and the projection head on the cls feature.
    """
    n = (config.img_size // config.patch_size) ** 2
    tokens = n + NUM_EXTRA_TOKENS
    d = config.embed_dim
    patch_features = config.in_channels * config.patch_size**2
    parts: dict[str, int] = {"patch_embed": n * patch_features * d}
    for name, value in _block_macs(tokens, d, config.mlp_ratio).items():
        parts[f"encoder.{name}"] = config.depth * value
    kind = getattr(config, "kind", None)
    if kind == "epg":
        dd = config.decoder_embed_dim
        if dd != d:
            parts["encoder_to_decoder"] = tokens * d * dd
        skips = min(config.depth, config.decoder_depth)
        parts["decoder.skip_linear"] = skips * tokens * (dd + d) * dd
        parts["decoder.adaLN"] = config.decoder_depth * d * 6 * dd
        for name, value in _block_macs(tokens, dd, config.mlp_ratio).items():
            parts[f"decoder.{name}"] = config.decoder_depth * value
        parts["output_head"] = n * dd * patch_features
    elif kind == "rcm":
        hidden = [config.proj_hidden_dim] * (config.proj_layers - 1)
        widths = [d, *hidden, config.proj_output_dim]
        parts["projection_head"] = sum(a * b for a, b in zip(widths, widths[1:]))
    else:
        raise TypeError(f"expected an EPGConfig or RCMConfig, got {type(config).__name__}")
    return parts


def forward_flops(config) -> int:
    """Per-image FLOPs of one forward pass (2 per multiply-add)."""
    return 2 * sum(forward_macs(config).values())


@dataclass(frozen=True)
class StepPasses:
    """Network passes of one training step, per image: (forward FLOPs, multiplier) pairs."""

    terms: tuple[tuple[str, int, int], ...]  # (what, forward FLOPs, multiplier 1/2/3)

    @property
    def flops(self) -> int:
        return sum(f * m for _, f, m in self.terms)


def train_step_passes(mode: str, config, perceptual_config=None) -> StepPasses:
    """The passes of one training step of ``mode`` (epg.objectives), per image.

    pretrain (RCM): online network with gradient on view 1, view 2 and x_n (3 × 3F), online
        without gradient on x_{n+1} (F), EMA target on both views (2F): 12F.
    diffusion (EPG): one pass with gradient: 3F.
    consistency (EPG + frozen RCM perceptual network): online pass with gradient (3F_epg), target
        pass without (F_epg); perceptual features of D_θ with input gradients only (2F_rcm) and of
        x0 without gradient (F_rcm). Without a perceptual network the last two are absent.
    """
    f = forward_flops(config)
    if mode == "pretrain":
        return StepPasses((("online, trained (v1, v2, x_n)", f, 9), ("online no_grad", f, 1),
                           ("target no_grad (v1, v2)", f, 2)))  # fmt: skip
    if mode == "diffusion":
        return StepPasses((("network, trained", f, 3),))
    if mode == "consistency":
        terms = [("online, trained", f, 3), ("target no_grad", f, 1)]
        if perceptual_config is not None:
            fp = forward_flops(perceptual_config)
            terms += [("perceptual, input grad", fp, 2), ("perceptual no_grad", fp, 1)]
        return StepPasses(tuple(terms))
    raise ValueError(f"mode must be pretrain, diffusion or consistency, got {mode!r}")


def train_step_flops(mode: str, config, perceptual_config=None) -> int:
    """Model FLOPs of one training step per image (see :func:`train_step_passes`)."""
    return train_step_passes(mode, config, perceptual_config).flops


# --- ops ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    bytes: int
    flops: int  # matmul FLOPs (2 per multiply-add); 0 for elementwise-only ops


def op_counts(op: str, mode: str, dims: Mapping[str, int], sizes: Mapping[str, int]) -> Counts:
    """Bytes moved and FLOPs of one call of ``epg.ops.<op>`` (``mode`` "fwd" or "bwd").

    ``dims``: the case's sizes (B, T, D, H, Dh, N, C, img, p, dim as the op needs).
    ``sizes``: bytes per element of the case's tensors: ``act`` (activations, network outputs
    and their gradients; patch_embed's image, weight and bias, which the op layer casts as
    autocast casts conv2d's), ``param`` (LayerNorm affine parameters), ``weight`` (output_head's
    weight and bias), ``mod`` (per-sample shift/scale/gate), ``f32`` (float32 values: per
    sample, and patch_embed's positional table and tokens), ``data`` (data images and noise,
    float32 in a training step).
    Backward counts are for the inputs benchmarks/bench_ops.py differentiates: every floating
    input except patch_embed's image and the losses' target and weight.
    """
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be fwd or bwd, got {mode!r}")
    fwd = mode == "fwd"
    a, p = sizes.get("act", 2), sizes.get("param", 4)
    g = dims
    if op == "layer_norm":
        rows, d = g["B"] * g["T"], g["D"]
        if fwd:  # read x, w, b; write y
            return Counts(2 * rows * d * a + 2 * d * p, 0)
        return Counts(3 * rows * d * a + 4 * d * p, 0)  # read dy, x, w(+b); write dx, dw, db
    if op == "ln_modulate":
        rows, d, m = g["B"] * g["T"], g["D"], sizes.get("mod", a)
        if fwd:  # read x, w, b, shift, scale; write y
            return Counts(2 * rows * d * a + 2 * d * p + 2 * g["B"] * d * m, 0)
        # read dy, x, w, b, shift, scale; write dx, dw, db, dshift, dscale
        return Counts(3 * rows * d * a + 4 * d * p + 4 * g["B"] * d * m, 0)
    if op == "gated_residual":
        rows, d, m = g["B"] * g["T"], g["D"], sizes.get("mod", a)
        if fwd:  # read x, y, gate; write out
            return Counts(3 * rows * d * a + g["B"] * d * m, 0)
        # read dy, y, gate; write dy·gate, dgate (dx is dy itself)
        return Counts(3 * rows * d * a + 2 * g["B"] * d * m, 0)
    if op == "attention":
        b, t, h, dh = g["B"], g["T"], g["H"], g["Dh"]
        width = h * dh
        matmul = 2 * b * h * t * t * dh  # one of Q·Kᵀ, P·V (multiply-adds × 2)
        if fwd:  # read qkv, write out
            return Counts(4 * b * t * width * a, 2 * matmul)
        return Counts(7 * b * t * width * a, 4 * matmul)  # read qkv, dout; write dqkv
    if op == "patch_embed":  # image, weight and bias in act; pos_embed and so tokens in f32
        b, c, side, pp, d = g["B"], g["C"], g["img"], g["p"], g["D"]
        n, k, f = (side // pp) ** 2, c * pp * pp, sizes.get("f32", 4)
        matmul = 2 * b * n * k * d
        if fwd:  # read img, weight, bias, pos; write tokens
            return Counts((b * c * side * side + k * d + d) * a + (n * d + b * n * d) * f, matmul)
        # read dtokens, img; write dweight, dbias, dpos
        return Counts((b * c * side * side + k * d + d) * a + (b * n * d + n * d) * f, matmul)
    if op == "output_head":
        b, n, d = g["B"], g["N"], g["D"]
        k, w = g["C"] * g["p"] ** 2, sizes.get("weight", a)
        matmul = 2 * b * n * d * k
        if fwd:  # read x, norm w/b, weight, bias; write image
            return Counts(b * n * d * a + 2 * d * p + (k * d + k) * w + b * n * k * a, matmul)
        # read dimage, x, norm w/b, weight; write dx, dnorm w/b, dweight, dbias
        traffic = b * n * k * a + 2 * b * n * d * a + 4 * d * p + (2 * k * d + k) * w
        return Counts(traffic, 2 * matmul)
    if op == "timestep_embedding":
        b, dim, f = g["B"], g["dim"], sizes.get("f32", 4)
        if fwd:  # read t, write (B, dim) float32
            return Counts(b * f + b * dim * 4, 0)
        return Counts(b * dim * 4 + 2 * b * f, 0)  # read dout, t; write dt
    if op == "edm_scalings":
        b, f = g["B"], sizes.get("f32", 4)
        if fwd:  # read sigma; write c_in, c_skip, c_out, t_cond
            return Counts(5 * b * f, 0)
        return Counts(6 * b * f, 0)  # read four gradients and sigma; write dsigma
    if op == "info_nce":
        b, m, d = g["B"], g["M"], g["D"]
        matmul = 2 * b * m * d  # the logits q·kᵀ; the backward's p·k for dq costs the same
        if fwd:  # read q, k; write the (B,) float32 losses
            return Counts((b + m) * d * a + 4 * b, matmul)
        return Counts((2 * b + m) * d * a + 4 * b, matmul)  # read dloss, q, k; write dq
    # Image-sized ops: n elements per tensor, B per-sample values.
    b, f, x = g.get("B", 0), sizes.get("f32", 4), sizes.get("data", 4)
    n = b * g.get("C", 0) * g.get("img", 0) ** 2
    if op == "noise_precondition":
        if fwd:  # read x0, eps, sigma; write x_in and the four scalings
            return Counts(3 * n * x + 5 * b * f, 0)
        # read dx_in, x0, eps, four scaling grads, sigma; write dx0, deps, dsigma
        return Counts(5 * n * x + 6 * b * f, 0)
    if op == "weighted_mse_loss":  # pred in act, target data
        if fwd:  # read pred, target, weight; write loss, mse
            return Counts(n * (a + x) + 3 * b * f, 0)
        # read dloss, pred, target, weight; write dpred
        return Counts(n * (2 * a + x) + 2 * b * f, 0)
    if op == "pseudo_huber_loss":  # pred and target data (float32 EDM outputs)
        if fwd:  # read pred, target, weight; write loss, squared sum
            return Counts(2 * n * x + 3 * b * f, 0)
        return Counts(3 * n * x + 3 * b * f, 0)  # + the forward's squared sum; write dpred
    if op == "normalize_images":  # read uint8 NHWC and the flips; write float32 NCHW
        return Counts(n + b + n * x, 0)
    if op == "to_uint8":
        return Counts(n * x + n, 0)
    if op in ("patchify_hwc", "unpatchify_hwc"):  # a permuted copy, forward and backward alike
        return Counts(2 * n * a, 0)
    raise ValueError(f"unknown op {op!r}")
