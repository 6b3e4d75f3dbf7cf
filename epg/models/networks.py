"""The EPG networks: the stage-1 encoder ``RCMViT`` and the generative ``EPGViT`` (spec §4.2, §4.3).

Both take ``x_in`` = c_in·x_σ (the c_in-scaled noisy image, (B, C, H, W)) and
``t_cond`` = 250·ln σ (shifted σ, (B,)). Their parameter names and shapes are those of the official
state dicts, so official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import _backend, ops
from .configs import EPGConfig, RCMConfig, _ViTShape
from .layers import DecoderBlock, EncoderBlock, LayerNorm, PatchEmbed, init_vit_weights

NUM_EXTRA_TOKENS = 2  # [cls (+ class embedding), time] before the patch tokens


def _recomputed(block: nn.Module, *args: Tensor | None) -> Tensor:
    """``block(*args)`` keeping only its inputs for the backward, which runs it again.

    The recomputation must take the op paths the forward took (the direct reference path and
    the custom ops save different tensors, which the checkpoint refuses), so eagerly it runs
    under the forward's :func:`epg.ops.use_backend` forces; compiled code fixed its ops when
    traced (and dynamo takes no ``context_fn`` there).
    """
    if torch.compiler.is_compiling():
        return checkpoint(block, *args, use_reentrant=False)
    forced = _backend.forced_state()
    return checkpoint(
        block, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _backend.forced_as(forced)),
    )  # fmt: skip


class _ViTEncoder(nn.Module):
    """Token sequence [cls, time, patches] + learned positional embedding, pre-norm blocks, norm."""

    def __init__(self, config: _ViTShape):
        super().__init__()
        config.validate()
        self.config = config
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + NUM_EXTRA_TOKENS, D))
        self.blocks = nn.ModuleList(
            EncoderBlock(D, config.num_heads, config.mlp_ratio, config.qkv_bias)
            for _ in range(config.depth)
        )
        self.norm = LayerNorm(D)
        # Training option, not architecture (so not in the config or the state dict): recompute
        # each transformer block's activations in the backward instead of keeping them.
        self.activation_checkpointing = False

    def _run_block(self, block: nn.Module, *args: Tensor | None) -> Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return _recomputed(block, *args)
        return block(*args)

    def _check_inputs(self, x_in: Tensor, t_cond: Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.img_size, c.img_size)
        if x_in.dim() != 4 or tuple(x_in.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects images (B, {c.in_channels}, {c.img_size}, "
                f"{c.img_size}) (in_channels={c.in_channels}, img_size={c.img_size}), "
                f"got {tuple(x_in.shape)}"
            )
        if not x_in.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor, got {x_in.dtype}")
        weights = self.pos_embed.dtype
        if x_in.dtype != weights and not torch.is_autocast_enabled(x_in.device.type):
            raise ValueError(f"images are {x_in.dtype} and the network's weights {weights}: pass "
                             f"{weights} images, or run under torch.autocast")  # fmt: skip
        if t_cond.shape != (x_in.shape[0],):
            raise ValueError(
                f"t_cond must be ({x_in.shape[0]},) (one 250·ln σ per image), got {tuple(t_cond.shape)}"
            )

    def _init_tokens(self) -> None:
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _embed(self, x_in: Tensor, time: Tensor, cond_token: Tensor) -> Tensor:
        """(B, N+2, D) tokens: [cond_token (B, D), time (B, D), patches] + pos_embed."""
        pos = self.pos_embed[0]
        patches = self.patch_embed(x_in, pos[NUM_EXTRA_TOKENS:])  # (B, N, D), pos added
        extra = torch.stack([cond_token.to(patches.dtype), time.to(patches.dtype)], dim=1)
        return torch.cat([extra + pos[:NUM_EXTRA_TOKENS], patches], dim=1)


class RCMViT(_ViTEncoder):
    """Stage-1 encoder with its BatchNorm projection head.

    forward(x_in, t_cond) → (z, h): h = norm(cls token) (B, D), z = projection_head(h) (B, out).
    """

    def __init__(self, config: RCMConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        width = config.embed_dim
        for _ in range(config.proj_layers - 1):
            layers += [
                nn.Linear(width, config.proj_hidden_dim, bias=False),
                nn.BatchNorm1d(config.proj_hidden_dim),
                nn.ReLU(inplace=True),
            ]
            width = config.proj_hidden_dim
        layers.append(nn.Linear(width, config.proj_output_dim, bias=False))
        self.projection_head = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_vit_weights(self, separate_qkv_bound=True)
        self._init_tokens()

    def encode(self, x_in: Tensor, t_cond: Tensor) -> Tensor:
        """The normalised cls feature h (B, D) before the projection head."""
        self._check_inputs(x_in, t_cond)
        B = x_in.shape[0]
        time = ops.timestep_embedding(t_cond, self.config.embed_dim)
        x = self._embed(x_in, time, self.cls_token[0].expand(B, -1))
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x[:, 0])

    def forward(self, x_in: Tensor, t_cond: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encode(x_in, t_cond)
        return self.projection_head(h), h


class EPGViT(_ViTEncoder):
    """Generative EPG network: encoder, then adaLN-Zero decoder fed reverse-order long skips.

    forward(x_in, t_cond, y) → (B, C, H, W): the x0 estimate (diffusion) or F of
    c_skip·x + c_out·F (consistency). ``y`` holds class labels in [0, num_classes]; label
    ``num_classes`` (or ``y=None``) is the null class used for classifier-free guidance.
    """

    def __init__(self, config: EPGConfig):
        super().__init__(config)
        D, Dd = config.embed_dim, config.decoder_embed_dim
        self.encoder_to_decoder = nn.Linear(D, Dd) if Dd != D else None
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(
                Dd, config.decoder_num_heads, cond_dim=D, mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias, skip_dim=D if j < config.depth else None,
                drop=config.drop,
            )
            for j in range(config.decoder_depth)
        )  # fmt: skip
        self.out_norm = LayerNorm(Dd)
        self.out = nn.Linear(Dd, config.patch_size**2 * config.in_channels)
        self.class_embed = (
            nn.Embedding(config.num_classes + 1, D) if config.num_classes > 0 else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fine-tuning init: xavier Linear, adaLN-Zero (modulation and output head zero)."""
        init_vit_weights(self, separate_qkv_bound=False)
        self._init_tokens()
        for block in self.decoder_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def _check_labels(self, y: Tensor | None, batch: int) -> None:
        if self.class_embed is None:
            if y is not None:
                raise ValueError("this network is unconditional (num_classes=0); pass y=None")
            return
        if y is None:
            return
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a ({batch},) int64 tensor of class labels, got a {type(y).__name__}")
        if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"y must be ({batch},) int64 or int32 class labels, got {tuple(y.shape)} {y.dtype}"
            )
        # A data-dependent check: skipped while torch.compile traces (it would break the graph)
        # and while a CUDA graph is captured (reading y back to the host is illegal there).
        capturing = y.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing and y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi > self.null_class:
                raise ValueError(
                    f"class labels must be in [0, {self.null_class}] ({self.null_class} = null "
                    f"class), got values in [{lo}, {hi}]"
                )

    def forward(self, x_in: Tensor, t_cond: Tensor, y: Tensor | None = None) -> Tensor:
        self._check_inputs(x_in, t_cond)
        B = x_in.shape[0]
        self._check_labels(y, B)
        time = ops.timestep_embedding(t_cond, self.config.embed_dim)  # (B, D)
        cls = self.cls_token[0].expand(B, -1)
        cond = time
        if self.class_embed is not None:
            if y is None:
                y = torch.full((B,), self.null_class, dtype=torch.long, device=x_in.device)
            class_emb = self.class_embed(y)  # (B, D)
            cls = cls + class_emb
            cond = time + class_emb
        # The sinusoid is float32 (float64 for a float64 t_cond): bring the adaLN conditioning to
        # the network's dtype, as _embed does for the tokens, or a bf16/fp16 network (or a float64
        # t_cond) fails in adaLN_modulation. Under autocast x_in is float32: nothing changes.
        cond = cond.to(x_in.dtype)  # (B, D)
        x = self._embed(x_in, time, cls)  # (B, N+2, D)
        skips = []
        for block in self.blocks:
            x = self._run_block(block, x)
            skips.append(x)
        x = self.norm(x)
        if self.encoder_to_decoder is not None:
            x = self.encoder_to_decoder(x)  # (B, N+2, Dd)
        for block in self.decoder_blocks:
            x = self._run_block(block, x, cond, skips.pop() if skips else None)
        c = self.config
        return ops.output_head(
            x[:, NUM_EXTRA_TOKENS:], self.out_norm.weight, self.out_norm.bias,
            self.out.weight, self.out.bias, c.patch_size, self.out_norm.eps,
        )  # fmt: skip
