"""The EPG networks: sizes, official state-dict layout, the forward function, init, compile, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import epg.ops as ops
from epg import _backend
from epg.models import CONFIGS, Denoiser, build, count_parameters, get_config, networks
from helpers import assert_close
from triton_support import interpreter_problem


@pytest.mark.parametrize(
    "name,millions",
    [("epg-l-16", 540.2), ("epg-xl-16", 583.0), ("epg-xxl-16", 788.9), ("epg-g-16", 1391.9),
     ("epg-l-32", 544.9)],
)  # fmt: skip
def test_parameter_counts_match_the_paper(name, millions):
    with torch.device("meta"):
        model = build(name)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=1e-3)


# epg-method.md §4.4: (encoder blocks, width, heads), (decoder blocks, width, heads), image, patch.
# Heads change no parameter count, so test_parameter_counts_match_the_paper does not see them;
# an official checkpoint loads into a network with the wrong head count and samples wrongly.
_SPEC_TABLE = {
    "epg-l-16": ((16, 1024, 16), (16, 1024, 16), 256, 16),
    "epg-xl-16": ((12, 768, 12), (12, 1584, 22), 256, 16),
    "epg-xxl-16": ((12, 768, 12), (12, 1920, 16), 256, 16),
    "epg-g-16": ((12, 768, 12), (12, 2688, 21), 256, 16),
    "epg-l-32": ((16, 1024, 16), (16, 1024, 16), 512, 32),
}


@pytest.mark.parametrize("name", sorted(_SPEC_TABLE))
def test_named_configs_have_the_papers_widths_and_head_counts(name):
    (depth, dim, heads), (ddepth, ddim, dheads), img, patch = _SPEC_TABLE[name]
    c = get_config(name)
    assert (c.depth, c.embed_dim, c.num_heads) == (depth, dim, heads)
    assert (c.decoder_depth, c.decoder_embed_dim, c.decoder_num_heads) == (ddepth, ddim, dheads)
    assert (c.img_size, c.patch_size, c.in_channels, c.num_classes) == (img, patch, 3, 1000)
    assert (c.mlp_ratio, c.qkv_bias, c.drop) == (4.0, False, 0.0)


def test_stage_one_configs_match_their_stage_two_encoders_and_the_official_projector():
    # proj_output_dim 768 as the official scripts/pretrain.sh runs it (epg-method.md §13).
    for rcm, epg in (("rcm-b-16", "epg-xl-16"), ("rcm-l-16", "epg-l-16")):
        r, e = get_config(rcm), get_config(epg)
        assert (r.depth, r.embed_dim, r.num_heads) == (e.depth, e.embed_dim, e.num_heads)
        assert (r.proj_hidden_dim, r.proj_output_dim, r.proj_layers) == (4096, 768, 3)


def _official_xl16_layout():
    """epg-method.md §4.5, written out independently of the model code."""
    D, Dd, p = 768, 1584, 16
    keys = {
        "cls_token": (1, 1, D), "pos_embed": (1, 258, D),
        "patch_embed.proj.weight": (D, 3, p, p), "patch_embed.proj.bias": (D,),
        "norm.weight": (D,), "norm.bias": (D,),
        "encoder_to_decoder.weight": (Dd, D), "encoder_to_decoder.bias": (Dd,),
        "out_norm.weight": (Dd,), "out_norm.bias": (Dd,),
        "out.weight": (p * p * 3, Dd), "out.bias": (p * p * 3,),
        "class_embed.weight": (1001, D),
    }  # fmt: skip
    for i in range(12):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
        })  # fmt: skip
        d = f"decoder_blocks.{i}."
        keys.update({
            d + "norm1.weight": (Dd,), d + "norm1.bias": (Dd,),
            d + "attn.qkv.weight": (3 * Dd, Dd),
            d + "attn.proj.weight": (Dd, Dd), d + "attn.proj.bias": (Dd,),
            d + "norm2.weight": (Dd,), d + "norm2.bias": (Dd,),
            d + "skip_linear.weight": (Dd, Dd + D), d + "skip_linear.bias": (Dd,),
            d + "skip_norm.weight": (Dd,), d + "skip_norm.bias": (Dd,),
            d + "adaLN_modulation.1.weight": (6 * Dd, D), d + "adaLN_modulation.1.bias": (6 * Dd,),
            d + "mlp.fc1.weight": (4 * Dd, Dd), d + "mlp.fc1.bias": (4 * Dd,),
            d + "mlp.fc2.weight": (Dd, 4 * Dd), d + "mlp.fc2.bias": (Dd,),
        })  # fmt: skip
    return keys


def test_epg_xl16_state_dict_is_the_official_layout():
    with torch.device("meta"):
        model = build("epg-xl-16")
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _official_xl16_layout()
    assert len(expected) == 349
    assert layout == expected


def test_epg_l_has_no_encoder_to_decoder_and_512_uses_patch_32():
    with torch.device("meta"):
        l16, l32 = build("epg-l-16"), build("epg-l-32")
    assert not any(k.startswith("encoder_to_decoder") for k in l16.state_dict())
    sd = l32.state_dict()
    assert tuple(sd["patch_embed.proj.weight"].shape) == (1024, 3, 32, 32)
    assert tuple(sd["pos_embed"].shape) == (1, 258, 1024)
    assert tuple(sd["out.weight"].shape) == (3072, 1024)


def test_the_512_px_stage1_encoder_fits_epg_l_32():
    # epg-l-32 finetunes from rcm-l-32: every encoder weight the fine-tuning copies has its shape,
    # and an official stage-1 .pth for epg-l-32 is read with that config.
    from epg.train import _matching_rcm_config

    with torch.device("meta"):
        rcm, epg = build("rcm-l-32").state_dict(), build("epg-l-32").state_dict()
    encoder = {k for k in epg if k.split(".")[0] in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")}
    # patch_embed, cls_token + pos_embed, final norm: 2 each; 11 per block (qkv has no bias)
    assert len(encoder) == 2 + 2 + 2 + 16 * 11
    assert {k: rcm[k].shape for k in encoder} == {k: epg[k].shape for k in encoder}
    assert _matching_rcm_config(get_config("epg-l-32")) == "rcm-l-32"
    assert _matching_rcm_config(get_config("epg-l-16")) == "rcm-l-16"


def test_rcm_state_dict_has_the_official_projector_keys():
    with torch.device("meta"):
        model = build("rcm-b-16")
    keys = set(model.state_dict())
    for i in (0, 3, 6):
        assert f"projection_head.{i}.weight" in keys
        assert f"projection_head.{i}.bias" not in keys  # Linear(bias=False), BatchNorm after
    for i in (1, 4):
        for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert f"projection_head.{i}.{s}" in keys
    assert not any(k.startswith(("class_embed", "decoder_blocks")) for k in keys)


def test_overrides_accept_every_architectural_field_and_reject_unknown_ones():
    cfg = get_config("epg-xl-16", img_size=128, patch_size=8, depth=3, embed_dim=96, num_heads=3,
                     decoder_depth=2, decoder_embed_dim=120, decoder_num_heads=5, num_classes=7,
                     in_channels=1)  # fmt: skip
    assert (cfg.img_size, cfg.in_channels, cfg.num_classes) == (128, 1, 7)
    with pytest.raises(ValueError, match="unknown field"):
        get_config("epg-xl-16", width=3)
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("epg-xs-16")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        get_config("epg-tiny", img_size=30)
    # qkv_bias and drop build no other shape of most layers: they must still reach every block.
    net = build("epg-tiny", qkv_bias=True, drop=0.25)
    keys = set(net.state_dict())
    assert {"blocks.1.attn.qkv.bias", "decoder_blocks.1.attn.qkv.bias"} <= keys
    assert all(block.attn.proj_drop.p == 0.25 for block in net.decoder_blocks)
    assert "blocks.0.attn.qkv.bias" in build("rcm-tiny", qkv_bias=True).state_dict()


@pytest.mark.parametrize("name, overrides, message", [
    ("epg-tiny", {"num_heads": 3}, "embed_dim 64 not divisible by num_heads 3"),
    ("epg-tiny", {"decoder_num_heads": 5}, "decoder_embed_dim 96 not divisible by decoder_num_heads 5"),
    ("epg-tiny", {"drop": 1.0}, r"drop in \[0, 1\)"),
    ("rcm-tiny", {"proj_layers": 0}, "proj_layers must be >= 1, got 0"),
])  # fmt: skip
def test_configs_that_cannot_build_are_refused_by_the_config(name, overrides, message):
    # The config itself refuses, so a bad config.json is reported when it is read, naming the
    # fields, not as an error from deep inside a layer (or, for proj_layers, not at all).
    with pytest.raises(ValueError, match=message):
        get_config(name, **overrides)


@pytest.mark.parametrize(
    "name,field",
    [("epg-tiny", "patch_size"), ("epg-tiny", "num_heads"), ("epg-tiny", "decoder_num_heads"),
     ("epg-tiny", "decoder_depth"), ("epg-tiny", "decoder_embed_dim"), ("epg-tiny", "mlp_ratio"),
     ("rcm-tiny", "proj_output_dim"), ("rcm-tiny", "proj_hidden_dim")],
)  # fmt: skip
def test_zero_sizes_are_refused_with_a_value_error_naming_the_field(name, field):
    with pytest.raises(ValueError, match=f"{field} must be positive, got 0"):
        get_config(name, **{field: 0})


# --- the forward function against an independent implementation of spec §4.3 ---------------------


def _spec_forward(sd, cfg, x, t_cond, y):
    """EPGViT's forward written from epg-method.md §4.1-4.3 with plain torch on a state dict."""
    D, p = cfg.embed_dim, cfg.patch_size

    def ln(v, pre):
        return F.layer_norm(v, (v.shape[-1],), sd[pre + ".weight"], sd[pre + ".bias"], 1e-5)

    def attn(v, pre, heads):
        B, T, W = v.shape
        qkv = (v @ sd[pre + ".qkv.weight"].T).reshape(B, T, 3, heads, W // heads)
        q, k, vv = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // heads), -1) @ vv
        return F.linear(a.transpose(1, 2).reshape(B, T, W), sd[pre + ".proj.weight"], sd[pre + ".proj.bias"])

    def mlp(v, pre):
        h = F.gelu(F.linear(v, sd[pre + ".fc1.weight"], sd[pre + ".fc1.bias"]))
        return F.linear(h, sd[pre + ".fc2.weight"], sd[pre + ".fc2.bias"])

    B = x.shape[0]
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    tok = tok.flatten(2).transpose(1, 2)
    half = D // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    time = torch.cat([torch.cos(t_cond[:, None] * freqs), torch.sin(t_cond[:, None] * freqs)], -1)
    cemb = sd["class_embed.weight"][y]
    h = torch.cat([(sd["cls_token"][0] + cemb[:, None])[:, :1], time[:, None], tok], 1) + sd["pos_embed"]
    skips = []
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        h = h + attn(ln(h, b + ".norm1"), b + ".attn", cfg.num_heads)
        h = h + mlp(ln(h, b + ".norm2"), b + ".mlp")
        skips.append(h)
    h = ln(h, "norm")
    h = F.linear(h, sd["encoder_to_decoder.weight"], sd["encoder_to_decoder.bias"])
    c = time + cemb
    for j in range(cfg.decoder_depth):
        b = f"decoder_blocks.{j}"
        h = F.linear(torch.cat([h, skips.pop()], -1), sd[b + ".skip_linear.weight"], sd[b + ".skip_linear.bias"])
        h = ln(h, b + ".skip_norm")
        mod = F.linear(F.silu(c), sd[b + ".adaLN_modulation.1.weight"], sd[b + ".adaLN_modulation.1.bias"])
        s1, sc1, g1, s2, sc2, g2 = (m[:, None] for m in mod.chunk(6, -1))
        h = h + g1 * attn(ln(h, b + ".norm1") * (1 + sc1) + s1, b + ".attn", cfg.decoder_num_heads)
        h = h + g2 * mlp(ln(h, b + ".norm2") * (1 + sc2) + s2, b + ".mlp")
    out = F.linear(ln(h[:, 2:], "out_norm"), sd["out.weight"], sd["out.bias"])
    g, C = cfg.img_size // p, cfg.in_channels
    out = out.reshape(B, g, g, p, p, C)  # b (m n) (p1 p2 c) → b c (m p1) (n p2)
    return torch.einsum("bmnpqc->bcmpnq", out).reshape(B, C, g * p, g * p)


def _randomised(model):
    """Fill every parameter with noise so adaLN-Zero and the zero head do not hide anything."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_forward_equals_the_spec_written_independently():
    model = _randomised(build("epg-tiny")).eval()
    cfg = model.config
    x = torch.randn(3, 3, 32, 32)
    t_cond = 250 * torch.log(torch.tensor([0.01, 1.0, 300.0]))
    y = torch.tensor([0, 4, 10])
    expected = _spec_forward(model.state_dict(), cfg, x, t_cond, y)
    assert_close(model(x, t_cond, y), expected, atol=1e-4, rtol=1e-4)


def test_fresh_network_is_adaln_zero():
    model = build("epg-tiny")
    x, t = torch.randn(2, 3, 32, 32), torch.randn(2)
    assert torch.count_nonzero(model(x, t, torch.tensor([1, 2]))) == 0
    for block in model.decoder_blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.cls_token.abs().max() < 1e-4
    assert model.class_embed.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_the_stage_one_encoder_bounds_its_fused_qkv_as_three_separate_projections():
    # The official stage-1 init: xavier bound of one D×D layer for the (3D, D) qkv weight; the
    # stage-2 network takes the fused layer's own (smaller) xavier bound.
    D = 64
    separate, fused = math.sqrt(6 / (D + D)), math.sqrt(6 / (3 * D + D))
    rcm, epg = build("rcm-tiny"), build("epg-tiny")
    for model, bound in ((rcm, separate), (epg, fused)):
        w = model.blocks[0].attn.qkv.weight
        assert bound * 0.98 < w.abs().max().item() <= bound


def test_unconditional_call_uses_the_null_class():
    model = _randomised(build("epg-tiny")).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.randn(2)
    assert torch.equal(model(x, t), model(x, t, torch.full((2,), 10)))


def test_rcm_forward_shapes_and_head():
    model = build("rcm-tiny").eval()
    z, h = model(torch.randn(4, 3, 32, 32), torch.randn(4))
    assert z.shape == (4, 32) and h.shape == (4, 64)


def test_rcm_feature_is_the_normalised_cls_token_and_z_its_projection():
    # The representation is the cls token's (position 0), not the time token's next to it.
    model = _randomised(build("rcm-tiny")).eval()
    tokens = []
    model.blocks[-1].register_forward_hook(lambda module, args, out: tokens.append(out))
    x, t = torch.randn(4, 3, 32, 32), torch.randn(4) * 100
    z, h = model(x, t)
    expected = F.layer_norm(tokens[0][:, 0], (64,), model.norm.weight, model.norm.bias, 1e-5)
    assert_close(h, expected, atol=1e-5, rtol=1e-5)
    assert_close(z, model.projection_head(h), atol=1e-6, rtol=1e-6)


# --- backends, backward, compile ------------------------------------------------------------------


def _loss_and_grads(model, *inputs):
    """(output, parameter gradients) of a fixed weighted sum of the output (an RCMViT's: its
    projection)."""
    out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    loss = (out * torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return out.detach(), grads


def _non_reference_cases():
    import os

    cases = []
    for name in ("triton", "cuda"):
        info = _backend.info(name)
        ops_here = sorted(op for op in ops.OPS if info.available and op in info.implementations)
        if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            ops_here = []
        for op in ops_here:
            cases.append(pytest.param(name, op, id=f"{name}-{op}"))
    return cases or [pytest.param(None, None, marks=pytest.mark.skip(reason="no other backend runs on CPU here"))]


@pytest.mark.parametrize("backend,op", _non_reference_cases())
def test_tiny_model_forward_and_backward_agree_across_backends(backend, op):
    # Through the EDM denoiser, so every op of the model (edm_scalings included) runs.
    if backend == "triton" and (reason := interpreter_problem()):
        pytest.skip(reason)
    model = Denoiser(_randomised(build("epg-tiny")), mode="edm")
    x, sigma, y = torch.randn(2, 3, 32, 32), torch.tensor([0.05, 7.0]), torch.tensor([3, 10])
    out_ref, grads_ref = _loss_and_grads(model, x, sigma, y)
    with ops.use_backend(backend, op):
        out, grads = _loss_and_grads(model, x, sigma, y)
    assert_close(out, out_ref, atol=1e-4, rtol=1e-4, what="output")
    for (name, _), g, e in zip(model.named_parameters(), grads, grads_ref):
        assert_close(g, e, atol=1e-3, rtol=1e-3, what=name)


def _grads_with_and_without_recomputation(model, *inputs):
    """(output, grads) of ``model(*inputs)`` without and with activation checkpointing, the same
    dropout masks in both (the global RNG reseeded before each)."""
    results = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        torch.manual_seed(5)
        results.append(_loss_and_grads(model, *inputs))
    return results


def test_activation_checkpointing_changes_no_number(monkeypatch):
    # The blocks run again in the backward (dropout 0.5: the checkpoint replays the masks).
    # Opt-in (a second forward per block): a fresh network does not recompute.
    assert not build("epg-tiny").activation_checkpointing and not build("rcm-tiny").activation_checkpointing
    x, t, y = torch.randn(3, 3, 32, 32), torch.randn(3) * 100, torch.tensor([3, 10, 1])
    epg = _randomised(build("epg-tiny", drop=0.5)).train()
    rcm = _randomised(build("rcm-tiny")).train()
    for model, inputs in ((epg, (x, t, y)), (rcm, (x, t))):
        (out, grads), (out_r, grads_r) = _grads_with_and_without_recomputation(model, *inputs)
        assert torch.equal(out_r, out)
        for (name, _), g, e in zip(model.named_parameters(), grads_r, grads):
            assert torch.equal(g, e), name
    # Not used without a gradient (sampling, target passes): there is no backward to recompute for.
    calls = []
    monkeypatch.setattr(networks, "_recomputed", lambda block, *args: calls.append(1) or block(*args))
    epg.activation_checkpointing = True
    with torch.no_grad():
        epg(x, t, y)
    assert calls == []
    epg(x, t, y)
    assert len(calls) == 4  # two encoder and two decoder blocks


def test_recomputation_takes_the_forwards_forced_backends():
    # Forced to the custom ops in the forward, with the backward run outside the force: the
    # recomputation must not take the direct reference path (the checkpoint refuses the
    # different tensors it saves).
    model = _randomised(build("epg-tiny")).train()
    model.activation_checkpointing = True
    x, t = torch.randn(2, 3, 32, 32), torch.randn(2) * 100
    with ops.use_backend("reference"):
        out = model(x, t)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    model.activation_checkpointing = False
    with ops.use_backend("reference"):
        expected = torch.autograd.grad(model(x, t).square().sum(), list(model.parameters()))
    for (name, _), g, e in zip(model.named_parameters(), grads, expected):
        assert torch.equal(g, e), name


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compiled_activation_checkpointing_replays_the_dropout_masks(device):
    # Compiled, the recomputation is the partitioner's: with dropout 0.5 it must take the
    # forward's masks (as the eager checkpoint does), so with and without checkpointing the
    # compiled network gives the same output and gradients from the same seed. Compiled without
    # checkpointing against eager: test_compiled_model_equals_eager_fullgraph.
    model = _randomised(build("epg-tiny", drop=0.5)).train().to(device)
    x, t, y = torch.randn(2, 3, 32, 32), torch.randn(2) * 100, torch.tensor([3, 10])
    x, t, y = x.to(device), t.to(device), y.to(device)
    results = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        torch._dynamo.reset()
        torch.manual_seed(7)
        results.append(_loss_and_grads(torch.compile(model, fullgraph=True), x, t, y))
    (out, grads), (out_r, grads_r) = results
    exact = dict(atol=0, rtol=0) if device == "cpu" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_r, out, **exact)
    for (name, _), g, e in zip(model.named_parameters(), grads_r, grads):
        torch.testing.assert_close(g, e, **exact, msg=name)


@pytest.mark.slow
def test_compiled_model_equals_eager_fullgraph():
    model = _randomised(build("epg-tiny"))
    x, t, y = torch.randn(2, 3, 32, 32), torch.randn(2) * 100, torch.tensor([3, 10])
    out_eager, grads_eager = _loss_and_grads(model, x, t, y)
    compiled = torch.compile(model, fullgraph=True)
    out_comp, grads_comp = _loss_and_grads(compiled, x, t, y)
    assert_close(out_comp, out_eager, atol=1e-4, rtol=1e-4, what="output")
    for (name, _), g, e in zip(model.named_parameters(), grads_comp, grads_eager):
        assert_close(g, e, atol=1e-4, rtol=1e-3, what=name)


@pytest.mark.parametrize("num_classes", [10, 0])
def test_bfloat16_network_runs_and_agrees_with_float32(num_classes):
    # The float32 sinusoid must not reach adaLN_modulation of a bf16 network unconverted.
    model = _randomised(build("epg-tiny", num_classes=num_classes)).eval()
    x, t = torch.randn(2, 3, 32, 32), 250 * torch.log(torch.tensor([0.05, 7.0]))
    y = torch.tensor([3, 10]) if num_classes else None
    expected = model(x, t, y)
    low = model.to(torch.bfloat16)
    out = low(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, atol=0.1 * expected.abs().max().item(), rtol=0.1)


def test_float64_time_input_works_on_a_float32_network():
    model = _randomised(build("epg-tiny")).eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([-300.0, 200.0]), torch.tensor([3, 10])
    assert_close(model(x, t.double(), y), model(x, t, y), atol=1e-5, rtol=1e-5)


# --- input validation -----------------------------------------------------------------------


def test_wrong_image_size_channels_and_labels_name_the_expected_values():
    model = build("epg-tiny")
    t = torch.zeros(2)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*got \(2, 3, 64, 64\)"):
        model(torch.randn(2, 3, 64, 64), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"in_channels=3"):
        model(torch.randn(2, 1, 32, 32), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\].*\[0, 11\]"):
        model(torch.randn(2, 3, 32, 32), t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        model(torch.randn(2, 3, 32, 32), t, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"int64 or int32 class labels, got \(2,\) torch.int16"):
        model(torch.randn(2, 3, 32, 32), t, torch.tensor([0, 1], dtype=torch.int16))
    model(torch.randn(2, 3, 32, 32), t, torch.tensor([0, 1], dtype=torch.int32))  # accepted
    with pytest.raises(ValueError, match=r"int64 or int32 class labels, got \(2, 1\) torch.int64"):
        model(torch.randn(2, 3, 32, 32), t, torch.tensor([[0], [1]]))  # would broadcast silently
    with pytest.raises(ValueError, match=r"t_cond must be \(2,\)"):
        model(torch.randn(2, 3, 32, 32), torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expects images"):
        build("rcm-tiny")(torch.randn(2, 3, 16, 16), t)


# --- the denoiser -------------------------------------------------------------------------------


def test_denoiser_edm_mode_is_identity_at_shifted_sigma_min():
    net = _randomised(build("epg-tiny")).eval()
    den = Denoiser(net, mode="edm")
    assert den.sigma_min_shifted == pytest.approx(0.002 * 32 / 64)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(den(x, den.sigma_min_shifted, torch.tensor([1, 2])), x)


def test_denoiser_x0_mode_returns_the_network_output_on_c_in_scaled_input():
    net = _randomised(build("epg-tiny")).eval()
    den = Denoiser(net, mode="x0")
    x, sigma, y = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 40.0]), torch.tensor([1, 2])
    c_in = 1 / torch.sqrt(sigma**2 + 0.25)
    expected = net(x * c_in.view(2, 1, 1, 1), 250 * torch.log(sigma), y)
    assert_close(den(x, sigma, y), expected, atol=1e-6, rtol=1e-6)


def test_denoiser_rejects_a_wrong_sigma_shape():
    den = Denoiser(build("epg-tiny"))
    with pytest.raises(ValueError, match=r"sigma must be a scalar or \(2,\)"):
        den(torch.randn(2, 3, 32, 32), torch.ones(3))


def test_all_named_configs_build_on_meta():
    for name in CONFIGS:
        with torch.device("meta"):
            assert count_parameters(build(name)) > 0


def test_networks_name_wrong_image_dtypes_labels_and_stage_one_encoders():
    net = build("epg-tiny", img_size=16, patch_size=4).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.zeros(2)
    with pytest.raises(ValueError, match=r"images are torch.float64 and the network's weights torch.float32"):
        net(x.double(), t)
    with pytest.raises(ValueError, match=r"y must be a \(2,\) int64 tensor of class labels, got a list"):
        net(x, t, [0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the usual way to run in bf16
        assert net(x.bfloat16(), t).shape == x.shape
        # Not every dtype: uint8 pixels (as an image file decodes) are refused under autocast too.
        with pytest.raises(ValueError, match=r"images must be a floating-point tensor, got torch.uint8"):
            net(x.to(torch.uint8), t)
    with pytest.raises(TypeError, match=r"stage-1 encoder \(RCMViT, from `epg pretrain`\)"):
        Denoiser(build("rcm-tiny"))
