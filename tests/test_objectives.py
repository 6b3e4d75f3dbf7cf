"""The training objectives (epg-method.md §5–7) against direct formulas on tiny inputs."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp
from helpers import assert_close, fork_ranks

from epg.models import build
from epg.objectives import (
    ConsistencyObjective,
    DiffusionObjective,
    PretrainObjective,
    curriculum_grid_size,
    ect_r,
    info_nce,
    interpolated_tau,
    tau_max_schedule,
)
from epg.schedules import karras_sigmas

IMG = 32  # the tiny configs' image side: shift H/64 = 0.5
SHIFT = IMG / 64
SHAPE = (3, IMG, IMG)
SD = 0.5  # sigma_data


def randomise(net, std=0.05):
    """Perturb every parameter: a fresh adaLN-Zero network outputs exactly zero."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * std)
    return net


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def naive_info_nce(q, k, tau):
    """ℓ_i = log Σ_j exp(q̂_i·k̂_j/τ) − q̂_i·k̂_i/τ, one element at a time in float64.

    k may hold more rows than q (the gathered keys); query i's positive is k[i]."""
    q, k = q.double(), k.double()
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    out = torch.empty(q.shape[0], dtype=torch.float64)
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j]) / float(tau) for j in range(k.shape[0])]
        m = max(logits)
        out[i] = m + math.log(sum(math.exp(v - m) for v in logits)) - logits[i]
    return out


def c_in(sigma):
    return 1.0 / torch.sqrt(sigma**2 + SD**2)


def t_cond(sigma):
    return 250.0 * torch.log(sigma)


# --- InfoNCE ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.2, torch.tensor(0.1)])
@pytest.mark.parametrize("extra_keys", [0, 5])
def test_info_nce_matches_double_loop(tau, extra_keys):
    # extra keys: further negatives after the positives (a micro-batch against its whole batch)
    q, k = torch.randn(7, 5), torch.randn(7 + extra_keys, 5)
    assert_close(info_nce(q, k, tau), naive_info_nce(q, k, tau).float(), what="info_nce")
    with pytest.raises(ValueError, match=r"q must be \(B, D\) and k \(M >= B, D\), got \(7, 5\), \(6, 5\)"):
        info_nce(q, k[:6], tau)


def test_info_nce_keys_get_no_gradient():
    q = torch.randn(6, 4, requires_grad=True)
    k = torch.randn(6, 4, requires_grad=True)
    info_nce(q, k, 0.1).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_info_nce_float32_under_autocast():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = info_nce(q.bfloat16(), k.bfloat16(), 0.1)
    assert out.dtype == torch.float32


def _distributed_worker(rank, world, init_file, q, k, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        B = q.shape[0] // world
        rows = slice(rank * B, (rank + 1) * B)
        results[rank] = info_nce(q[rows], k[rows], 0.2)
    finally:
        dist.destroy_process_group()


def test_info_nce_gathers_keys_over_ranks(tmp_path):
    """Two gloo ranks: each rank's loss uses all 2·B keys, its own block holding the positives."""
    world, B = 2, 3
    q, k = torch.randn(world * B, 4), torch.randn(world * B, 4)
    results = mp.Manager().dict()
    fork_ranks(_distributed_worker, world, world, str(tmp_path / "pg"), q, k, results)
    for rank in range(world):
        rows = slice(rank * B, (rank + 1) * B)
        # local block first, then the other ranks in rank order
        others = [k[r * B : (r + 1) * B] for r in range(world) if r != rank]
        keys = torch.cat([k[rows], *others])
        expected = naive_info_nce(q[rows], keys, 0.2)  # positive of query i = key i
        assert_close(results[rank], expected.float(), what=f"rank {rank}")


# --- stage 1: schedules ------------------------------------------------------------------------


def test_curriculum_grid_size_official_schedule():
    # K' = ceil(600000 / log2(65)) = 99,629; N doubles after every K' steps.
    kp = 99_629
    expected = {
        0: 21, 1: 41, kp: 41, kp + 1: 81, 2 * kp: 81, 2 * kp + 1: 161, 3 * kp + 1: 321,
        4 * kp + 1: 641, 5 * kp: 641, 5 * kp + 1: 1281, 600_000: 1281, 10**9: 1281,
    }  # fmt: skip
    assert {k: curriculum_grid_size(k) for k in expected} == expected


def test_curriculum_grid_size_small_run():
    # s0=2, s1=8, K=30: K' = ceil(30 / log2(5)) = 13
    got = [curriculum_grid_size(k, s0=2, s1=8, total_steps=30) for k in (0, 1, 13, 14, 26, 27, 30)]
    assert got == [3, 5, 5, 9, 9, 9, 9]


def test_tau_schedules():
    K = 600_000
    assert tau_max_schedule(0, K) == pytest.approx(0.2)
    assert tau_max_schedule(K // 3, K) == pytest.approx(0.2 - 0.1 * math.cos(math.pi / 4))
    assert tau_max_schedule(400_000, K) == pytest.approx(0.1)
    # k ≤ K/1.5 (spec §5.4): at k = K/1.5 the cosine ends at τ_start − τ_end, which only the
    # defaults make equal to τ_end
    assert tau_max_schedule(400_000, K, 0.3, 0.1) == pytest.approx(0.2)
    assert tau_max_schedule(400_001, K) == pytest.approx(0.1)
    assert tau_max_schedule(K, K) == pytest.approx(0.1)
    assert interpolated_tau(80.0, 0.2, 0.1) == pytest.approx(0.2)
    assert interpolated_tau(0.002, 0.2, 0.1) == pytest.approx(0.1)
    assert interpolated_tau(40.001, 0.2, 0.1) == pytest.approx(0.15)


# --- stage 1: objective ------------------------------------------------------------------------


def make_pretrain(**kwargs):
    online = randomise(build("rcm-tiny")).train()
    target = randomise(build("rcm-tiny")).eval()
    return PretrainObjective(online, target, img_size=IMG, **kwargs), online, target


def pretrain_batch(B=4):
    return {"image": torch.randn(B, *SHAPE) * 0.5, "view1": torch.randn(B, *SHAPE) * 0.5,
            "view2": torch.randn(B, *SHAPE) * 0.5}  # fmt: skip


def test_pretrain_draws():
    obj, _, _ = make_pretrain()
    a = obj.draw(5, 8, SHAPE, gen(1), "cpu")
    b = obj.draw(5, 8, SHAPE, gen(1), "cpu")
    assert a.keys() == {"n", "sigma_n", "sigma_n1", "tau_rc", "eps"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["eps"].shape == (8, *SHAPE) and a["eps"][4:8].shape == (4, *SHAPE)
    for key in ("n", "sigma_n", "sigma_n1", "tau_rc"):
        assert a[key].dim() == 0, key
    assert a["n"].dtype == torch.int64 and a["sigma_n"].dtype == torch.float32
    assert float(a["tau_rc"]) == pytest.approx(0.1)
    assert not torch.equal(a["eps"], obj.draw(5, 8, SHAPE, gen(2), "cpu")["eps"])

    g = gen(3)
    for step, n_points in ((0, 21), (50, 41)):
        grid = karras_sigmas(n_points) * SHIFT
        seen = set()
        for _ in range(200):
            d = obj.draw(step, 2, SHAPE, g, "cpu")
            n = int(d["n"])
            seen.add(n)
            assert float(d["sigma_n"]) == pytest.approx(float(grid[n]), rel=1e-6)
            assert float(d["sigma_n1"]) == pytest.approx(float(grid[n + 1]), rel=1e-6)
        assert min(seen) == 0 and max(seen) == n_points - 2


def test_pretrain_interpolated_tau():
    obj, _, _ = make_pretrain(tau_schedule="interpolated", total_steps=300)
    d = obj.draw(0, 2, SHAPE, gen(0), "cpu")
    sigma_n = float(karras_sigmas(21)[int(d["n"])])
    expected = interpolated_tau(sigma_n, 0.2, 0.1)
    assert float(d["tau_rc"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("rc_key", ["online", "target"])
def test_pretrain_loss_matches_formula(rc_key):
    obj, online, target = make_pretrain(rc_key=rc_key)
    batch = pretrain_batch()
    draws = obj.draw(1000, 4, SHAPE, gen(0), "cpu")
    loss, terms = obj.loss(batch, draws)

    eps, smin = draws["eps"], torch.tensor(0.002 * SHIFT)
    B = 4

    def net_in(x, sigma):
        return c_in(sigma) * (x + sigma * eps), t_cond(sigma).expand(B)

    with torch.no_grad():
        z1, _ = online(*net_in(batch["view1"], smin))
        z2, _ = online(*net_in(batch["view2"], smin))
        z1t, _ = target(*net_in(batch["view1"], smin))
        z2t, _ = target(*net_in(batch["view2"], smin))
        _, hn = online(*net_in(batch["image"], draws["sigma_n"]))
        _, hn1 = (online if rc_key == "online" else target)(*net_in(batch["image"], draws["sigma_n1"]))
    con = naive_info_nce(z1, z2t, 0.2) + naive_info_nce(z2, z1t, 0.2)
    rc = naive_info_nce(hn, hn1, 0.1)
    assert_close(terms["contrastive"], con.mean().float(), atol=1e-5, rtol=1e-5, what="L_con")
    assert_close(terms["consistency"], rc.mean().float(), atol=1e-5, rtol=1e-5, what="L_rc")
    assert_close(loss, (con + rc).mean().float(), atol=1e-5, rtol=1e-5, what="loss")


def test_pretrain_gradients_reach_online_only():
    obj, online, target = make_pretrain()
    loss, terms = obj.loss(pretrain_batch(), obj.draw(7, 4, SHAPE, gen(0), "cpu"))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    loss.backward()
    assert online.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert online.projection_head[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())


# --- stage 2a: diffusion -----------------------------------------------------------------------


def make_diffusion(num_classes=10, **kwargs):
    net = randomise(build("epg-tiny", num_classes=num_classes)).train()
    return DiffusionObjective(net, img_size=IMG, num_classes=num_classes, **kwargs), net


def test_diffusion_draws_snap_to_the_grid():
    obj, _ = make_diffusion()
    B = 64
    d = obj.draw(0, B, SHAPE, gen(4), "cpu")
    assert d.keys() == {"sigma", "weight", "eps", "drop"}
    assert d["sigma"].shape == d["weight"].shape == d["drop"].shape == (B,)
    assert d["eps"].shape == (B, *SHAPE) and d["drop"].dtype == torch.bool
    for key, value in obj.draw(0, B, SHAPE, gen(4), "cpu").items():
        assert torch.equal(value, d[key]), key

    # redo the draw by hand, in the documented order: ln σ, ε, dropout uniforms
    g = gen(4)
    log_sigma = torch.randn(B, generator=g).double() * 1.6 - 1.2
    eps = torch.randn(B, *SHAPE, generator=g)
    drop = torch.rand(B, generator=g) < 0.1
    assert torch.equal(d["eps"], eps) and torch.equal(d["drop"], drop)
    def karras(i):  # the released get_sigmas(i): defined past the last index too
        lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
        return (hi + i / 1279 * (lo - hi)) ** 7

    grid = [karras(i) for i in range(1280)]
    assert grid == pytest.approx(karras_sigmas(1280).tolist(), rel=1e-12)
    for b in range(B):
        s = math.exp(float(log_sigma[b]))
        i = min(range(1280), key=lambda j: abs(grid[j] - s))
        assert float(d["sigma"][b]) == pytest.approx(grid[i] * SHIFT, rel=1e-6)
        assert float(d["weight"][b]) == pytest.approx(1 / (karras(i) - karras(i + 1)), rel=1e-6)
    # The smallest σ is σ_min itself; its weight uses the formula one index past the grid.
    sigma, w = obj.grid_weights()
    assert float(sigma[-1]) == pytest.approx(0.002, rel=1e-12)
    assert float(w[-1]) == pytest.approx(1 / (0.002 - karras(1280)), rel=1e-9)
    assert float(w[-1]) == pytest.approx(25993, rel=1e-3)


def test_diffusion_uniform_weighting_draws_the_same_sigmas_with_unit_weights():
    delta, _ = make_diffusion()
    uniform = DiffusionObjective(delta.net, img_size=IMG, num_classes=10, weighting="uniform")
    d, u = delta.draw(0, 32, SHAPE, gen(9), "cpu"), uniform.draw(0, 32, SHAPE, gen(9), "cpu")
    assert torch.equal(d["sigma"], u["sigma"]) and torch.equal(d["eps"], u["eps"])
    assert torch.equal(u["weight"], torch.ones(32))
    with pytest.raises(ValueError, match="weighting must be"):
        DiffusionObjective(delta.net, img_size=IMG, num_classes=10, weighting="snr")


def test_diffusion_weights_follow_power_law():
    obj, _ = make_diffusion()
    sigma, w = obj.grid_weights()
    assert sigma.shape == w.shape == (1280,)
    const = 1280 / (7 * (80 ** (1 / 7) - 0.002 ** (1 / 7)))
    assert const == pytest.approx(125.37, abs=0.01)
    assert_close(w, const * sigma ** (-6 / 7), atol=0.0, rtol=0.01, what="w ≈ 125.3·σ^(-6/7)")


def test_diffusion_label_dropout_rate():
    obj, _ = make_diffusion()
    n = 20_000
    drops = int(obj.draw(0, n, (1, 1, 1), gen(5), "cpu")["drop"].sum())
    assert abs(drops - 0.1 * n) < 5 * math.sqrt(n * 0.1 * 0.9)


def test_diffusion_loss_matches_formula():
    obj, net = make_diffusion()
    net.eval()
    B = 4
    x0 = torch.randn(B, *SHAPE) * 0.5
    label = torch.tensor([1, 2, 3, 4])
    draws = obj.draw(0, B, SHAPE, gen(6), "cpu")
    draws["drop"] = torch.tensor([True, False, False, True])
    loss, terms = obj.loss({"image": x0, "label": label}, draws)
    s, w = draws["sigma"], draws["weight"]
    with torch.no_grad():
        x0_hat = net(c_in(s).view(B, 1, 1, 1) * (x0 + s.view(B, 1, 1, 1) * draws["eps"]),
                     t_cond(s), torch.tensor([10, 2, 3, 10]))  # fmt: skip
    expected = (w.view(B, 1, 1, 1) * (x0_hat - x0) ** 2).mean()
    assert_close(loss, expected, atol=1e-6, rtol=1e-5, what="diffusion loss")
    assert torch.equal(terms["diffusion"], loss)


def test_diffusion_unconditional_and_sliced_draws():
    obj, net = make_diffusion(num_classes=0)
    draws = obj.draw(0, 8, SHAPE, gen(7), "cpu")
    local = {k: v[4:8] for k, v in draws.items()}
    loss, _ = obj.loss({"image": torch.randn(4, *SHAPE) * 0.5}, local)
    loss.backward()
    assert torch.isfinite(loss)
    assert net.out.weight.grad.abs().sum() > 0
    assert net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_diffusion_compiled_loss_matches_eager():
    # one encoder and one decoder block keep the aot_eager trace (forward + joint backward) short
    net = randomise(build("epg-tiny", depth=1, decoder_depth=1)).train()
    obj = DiffusionObjective(net, img_size=IMG, num_classes=10)
    B = 4
    batch = {"image": torch.randn(B, *SHAPE) * 0.5, "label": torch.tensor([0, 1, 2, 3])}
    torch._dynamo.reset()  # an earlier test's graph of the same method would count as a recompile
    compiled = torch.compile(obj.loss, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(2):  # a second step with new draws must not recompile
            draws = obj.draw(step, B, SHAPE, gen(10 + step), "cpu")
            got, got_terms = compiled(batch, draws)
            expected, _ = obj.loss(batch, draws)
            assert_close(got, expected, atol=1e-6, rtol=1e-5, what=f"compiled step {step}")
            assert_close(got_terms["diffusion"], expected, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


# --- stage 2b: consistency ---------------------------------------------------------------------


def test_ect_r_values():
    t = torch.tensor([80.0, 20.0, 1.0, 0.5, 0.002], dtype=torch.float64)
    r1 = ect_r(t, 0)
    assert float(r1[0] / t[0]) == pytest.approx(0.5, abs=1e-6)  # stage 1, large t
    assert float(r1[1] / t[1]) == pytest.approx(0.5, abs=1e-6)
    assert r1[2:].tolist() == [0.002, 0.002, 0.002]  # t ≲ 1: pure denoising
    assert float(ect_r(t, 99_999)[0]) == float(r1[0])  # still stage 1
    assert float(ect_r(t, 100_000)[0] / 80) == pytest.approx(0.75, abs=1e-6)  # stage 2
    r7 = ect_r(t, 600_000)  # stage 7
    ratio = (r7 / t)[:3]
    assert ((ratio > 0.96) & (ratio < 0.995)).all()
    assert float(ratio[2]) == pytest.approx(1 - (1 + 8 / (1 + math.e)) / 128, rel=1e-9)
    assert float(r7[4]) == 0.002


def make_consistency(drop=0.0, aux=True, num_classes=10, **kwargs):
    net = randomise(build("epg-tiny", drop=drop, num_classes=num_classes)).train()
    perceptual = None
    if aux:
        perceptual = randomise(build("rcm-tiny")).eval().requires_grad_(False)
    obj = ConsistencyObjective(net, perceptual, img_size=IMG, num_classes=num_classes, **kwargs)
    return obj, net, perceptual


def test_consistency_draws():
    obj, _, _ = make_consistency()
    B = 512
    d = obj.draw(250_000, B, SHAPE, gen(8), "cpu")
    assert d.keys() == {"t", "r", "weight", "eps", "drop"}  # "denoise" only with first_stage=0
    for key, value in obj.draw(250_000, B, SHAPE, gen(8), "cpu").items():
        assert torch.equal(value, d[key]), key
    assert d["t"].shape == d["r"].shape == d["weight"].shape == (B,) and not d["drop"].any()
    t, r = d["t"].double(), d["r"].double()
    smin = 0.002 * SHIFT
    assert (t >= smin * (1 - 1e-6)).all() and (r <= t).all() and (r >= smin * (1 - 1e-6)).all()
    g = gen(8)
    t_raw = (torch.randn(B, generator=g).double() * 1.6 - 0.4).exp().clamp(min=0.002)
    assert_close(d["t"], (t_raw * SHIFT).float(), what="t")
    assert_close(d["r"], (ect_r(t_raw, 250_000) * SHIFT).float(), what="r")
    gap = t_raw * SHIFT - ect_r(t_raw, 250_000) * SHIFT
    expected_w = torch.where(gap > 0, 1 / gap, torch.zeros_like(gap)).float()
    assert_close(d["weight"], expected_w, atol=1e-3, rtol=1e-5, what="weight")
    assert (d["weight"][t == r] == 0).all()
    # where t is clamped to σ_min, r = t and the weight is 0
    low = ConsistencyObjective(None, None, img_size=IMG, num_classes=0, P_mean=-12.0, P_std=0.1)
    d = low.draw(0, 4, SHAPE, gen(8), "cpu")
    assert torch.equal(d["t"], d["r"]) and not d["weight"].any()
    assert_close(d["t"], torch.full((4,), smin, dtype=torch.float32), what="t = σ̃_min")


def differentiable_info_nce(q, k, tau):
    """naive_info_nce as one differentiable expression: logsumexp_j(q̂·k̂_j/τ) − q̂·k̂_i/τ."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
    return torch.logsumexp(logits, dim=1) - logits.diagonal()


def test_consistency_loss_and_gradients_match_formula():
    # With aux_weight 0.5 and two labels dropped to the null class (10), so that neither can
    # go unseen; the gradients check the stop-gradient on the target D(x_r, r) (dropping it
    # leaves the loss as it is) and on the pseudo-Huber normaliser.
    obj, net, perceptual = make_consistency(aux_weight=0.5)
    B = 4
    x0 = torch.randn(B, *SHAPE) * 0.5
    label = torch.tensor([1, 2, 3, 4])
    draws = obj.draw(300_000, B, SHAPE, gen(9), "cpu")
    draws["drop"] = torch.tensor([True, False, False, True])
    loss, terms = obj.loss({"image": x0, "label": label}, draws)
    grads = torch.autograd.grad(loss, list(net.parameters()))

    smin = 0.002 * SHIFT
    seen = torch.tensor([10, 2, 3, 10])

    def D(x, s):
        v = s.view(B, 1, 1, 1)
        skip = SD**2 / ((v - smin) ** 2 + SD**2)
        out = (v - smin) * SD / torch.sqrt(v**2 + SD**2)
        return skip * x + out * net(c_in(v) * x, t_cond(s), seen)

    eps, t, r = draws["eps"], draws["t"], draws["r"]
    d_t = D(x0 + t.view(B, 1, 1, 1) * eps, t)
    with torch.no_grad():
        d_r = D(x0 + r.view(B, 1, 1, 1) * eps, r)
    delta2 = ((d_t - d_r) ** 2).sum(dim=(1, 2, 3))
    cons = draws["weight"] * delta2 / torch.sqrt(delta2.detach() + 0.06**2)
    sm = torch.full((B,), smin)
    q, _ = perceptual(c_in(sm).view(B, 1, 1, 1) * d_t, t_cond(sm))
    with torch.no_grad():
        k, _ = perceptual(c_in(sm).view(B, 1, 1, 1) * x0, t_cond(sm))
    aux = differentiable_info_nce(q, k, 0.1)
    expected = (cons + 0.5 * aux).mean()
    expected_grads = torch.autograd.grad(expected, list(net.parameters()))

    assert_close(aux.detach(), naive_info_nce(q.detach(), k, 0.1).float(), atol=1e-5, rtol=1e-5, what="aux formula")
    assert_close(terms["consistency"], cons.detach().mean(), atol=1e-5, rtol=1e-4, what="consistency")
    assert_close(terms["aux"], aux.detach().mean(), atol=1e-5, rtol=1e-5, what="aux")
    assert_close(loss, expected.detach(), atol=1e-5, rtol=1e-4, what="loss")
    scale = max(g.abs().max() for g in expected_grads)
    for (name, _), got, want in zip(net.named_parameters(), grads, expected_grads):
        assert_close(got, want, atol=1e-4 * scale, rtol=1e-3, what=f"grad {name}")


def test_consistency_aux_weight_0_does_not_run_the_perceptual_network():
    obj, net, perceptual = make_consistency(aux_weight=0.0)
    plain, _, _ = make_consistency(aux=False)
    plain.net = net
    calls = []
    perceptual.register_forward_hook(lambda *_: calls.append(1))
    B = 4
    x0 = torch.randn(B, *SHAPE) * 0.5
    batch = {"image": x0, "label": torch.tensor([1, 2, 3, 4])}
    draws = obj.draw(300_000, B, SHAPE, gen(9), "cpu")
    loss, terms = obj.loss(batch, draws)
    assert not calls and float(terms["aux"]) == 0.0
    assert torch.equal(loss, plain.loss(batch, draws)[0])
    obj.aux_weight = 1.0  # the hook does see the network when the term is on
    obj.loss(batch, draws)
    assert len(calls) == 2


def test_consistency_stage_0_is_the_codes_denoising_warm_up():
    # first_stage=0 (the code's delta = 0): the first stage_length steps regress D_θ(x_t, t) on
    # x0 with the weight 1/(σ_i − σ_{i+1}) of the 2560-point grid point nearest to t, no L_aux;
    # the ECT stages 1, 2, … follow.
    obj, net, perceptual = make_consistency(first_stage=0, stage_length=10)
    assert [obj.stage(s) for s in (0, 9, 10, 25)] == [0, 0, 1, 2]
    B = 4
    draws = obj.draw(9, B, SHAPE, gen(3), "cpu")
    assert draws["denoise"].all() and not obj.draw(10, B, SHAPE, gen(3), "cpu")["denoise"].any()
    t_raw = draws["t"].double() / SHIFT
    grid = karras_sigmas(2560)
    i = (t_raw[:, None] - grid[None, :-1]).abs().argmin(dim=1)
    assert_close(draws["weight"], (1 / (grid[i] - grid[i + 1])).float(), rtol=1e-4, what="weight")
    assert ect_r(t_raw, 9, 10, first_stage=0).tolist() == [0.002] * B

    x0 = torch.randn(B, *SHAPE) * 0.5
    label = torch.tensor([1, 2, 3, 4])
    loss, terms = obj.loss({"image": x0, "label": label}, draws)
    t = draws["t"]
    smin = 0.002 * SHIFT
    v = t.view(B, 1, 1, 1)
    with torch.no_grad():
        x_t = x0 + v * draws["eps"]
        d_t = SD**2 / ((v - smin) ** 2 + SD**2) * x_t + (v - smin) * SD / torch.sqrt(v**2 + SD**2) * net(
            c_in(v) * x_t, t_cond(t), label
        )
        delta2 = ((d_t - x0) ** 2).sum(dim=(1, 2, 3))
        expected = draws["weight"] * delta2 / torch.sqrt(delta2 + 0.06**2)
    assert float(terms["aux"].detach()) == 0.0
    assert_close(terms["consistency"], expected.mean(), atol=1e-5, rtol=1e-4, what="stage-0 loss")
    with pytest.raises(ValueError, match="first_stage must be 0"):
        make_consistency(first_stage=2)


def test_consistency_target_pass_reuses_dropout_masks():
    obj, net, _ = make_consistency(drop=0.5, aux=False)
    B = 4
    x0 = torch.randn(B, *SHAPE) * 0.5
    batch = {"image": x0, "label": torch.tensor([1, 2, 3, 4])}
    draws = obj.draw(0, B, SHAPE, gen(11), "cpu")
    draws["r"] = draws["t"].clone()
    draws["weight"] = torch.ones(B)  # so that the term is zero only if D_online == D_target
    # control: two plain passes draw different dropout masks, so they differ
    sigma, eps = draws["t"], draws["eps"]
    with torch.no_grad():
        assert not torch.equal(obj.denoise(x0, eps, sigma, batch["label"]),
                               obj.denoise(x0, eps, sigma, batch["label"]))  # fmt: skip
    loss, terms = obj.loss(batch, draws)
    assert terms["consistency"].item() == 0.0 and terms["aux"].item() == 0.0
    assert loss.item() == 0.0
    obj.match_dropout = False  # without the RNG rewind the masks differ
    assert obj.loss(batch, draws)[1]["consistency"].item() > 0


def test_consistency_gradients_reach_net_not_perceptual():
    obj, net, perceptual = make_consistency(drop=0.5)
    B = 4
    batch = {"image": torch.randn(B, *SHAPE) * 0.5, "label": torch.tensor([1, 2, 3, 4])}
    draws = obj.draw(0, 8, SHAPE, gen(12), "cpu")
    draws = {k: v[4:8] for k, v in draws.items()}  # a rank's slice of the global draw
    loss, terms = obj.loss(batch, draws)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    loss.backward()
    assert net.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.parameters())

    # the auxiliary term alone still trains the network through D_θ
    net.zero_grad(set_to_none=True)
    draws["weight"] = torch.zeros(B)
    loss, terms = obj.loss(batch, draws)
    assert terms["consistency"].item() == 0.0 and terms["aux"].item() > 0
    loss.backward()
    assert net.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "objective, option, value",
    [(PretrainObjective, "tau_rc", -0.1), (PretrainObjective, "tau_con", 0.0), (PretrainObjective, "s0", 0),
     (PretrainObjective, "s1", 10), (PretrainObjective, "sigma_min", 100.0), (PretrainObjective, "sigma_data", -0.5),
     (PretrainObjective, "rc_key", "ema"),
     (DiffusionObjective, "P_std", -1.6), (DiffusionObjective, "label_dropout", 1.5),
     (DiffusionObjective, "sigma_data", float("nan")), (ConsistencyObjective, "c", -0.06),
     (ConsistencyObjective, "tau_aux", 0.0), (ConsistencyObjective, "label_dropout", -0.1),
     (ConsistencyObjective, "aux_weight", -1.0), (ConsistencyObjective, "q", 0.0), (ConsistencyObjective, "q", 1.0),
     (DiffusionObjective, "P_mean", float("nan")), (ConsistencyObjective, "P_mean", float("inf"))],
)  # fmt: skip
def test_out_of_range_objective_options_are_refused_at_construction(objective, option, value):
    # A negative temperature used to train (the contrastive loss turned around); s0 = 0 failed
    # only at the first step.
    if objective is PretrainObjective:
        args = (None, None)
    else:
        args = (None,) + ((None,) if objective is ConsistencyObjective else ())
    name = {"s1": "s0 <= s1", "sigma_min": "sigma_min < sigma_max"}.get(option, option)
    with pytest.raises(ValueError, match=name):
        objective(*args, img_size=IMG, **({} if objective is PretrainObjective else {"num_classes": 10}),
                  **{option: value})  # fmt: skip
