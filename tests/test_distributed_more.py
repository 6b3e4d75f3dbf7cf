"""The distributed and data-position code, tested without torchrun: rank facts, devices, the
process-group setup, GlobalBatchNorm1d on two forked gloo ranks, seeds, the loader's position,
and the Trainer's rank arithmetic (a Trainer told it is rank r of 2)."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from epg import distributed
from epg.data.loader import InMemoryLoader
from epg.distributed import DistInfo, GlobalBatchNorm1d, convert_batchnorm, resolve_device
from epg.seeding import torch_seed
from epg.train import Trainer, _fully_shard, _is_per_sample, _step_seed

from helpers import assert_close, fork_ranks, tiny_train_config

CPU = torch.device("cpu")


# --- rank facts, devices, setup ---------------------------------------------------------------


def test_dist_info_names_the_main_rank_and_a_multi_process_run():
    # is_main gates every file write (logs, checkpoints); distributed gates DDP and collectives.
    alone = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
    assert alone.is_main and not alone.distributed
    second = DistInfo(rank=1, world_size=2, local_rank=1, device=CPU)
    assert not second.is_main and second.distributed
    first = DistInfo(rank=0, world_size=2, local_rank=0, device=CPU)
    assert first.is_main and first.distributed


def test_resolve_device_names_cpu_and_refuses_the_rest():
    if not torch.cuda.is_available():
        assert resolve_device(None) == CPU and resolve_device("auto") == CPU
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu", local_rank=3) == CPU
    with pytest.raises(ValueError, match="epg runs on cpu or cuda"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_resolve_device_gives_each_rank_its_own_gpu_unless_one_is_named(monkeypatch):
    # torchrun's LOCAL_RANK picks the GPU of a bare "cuda"; an explicit index wins; an index past
    # the GPUs there are is an error, not a crash later.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device(None, local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="there are 2 GPU"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="there are 2 GPU"):
        resolve_device("cuda", local_rank=2)


def test_setup_reads_torchruns_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("cpu") == DistInfo(0, 1, 0, CPU)  # a plain python call
    # RANK (global) and LOCAL_RANK (on this node) differ on a second node
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup("cpu") == DistInfo(3, 1, 1, CPU)


def test_setup_joins_one_gloo_group_on_cpu(monkeypatch):
    # CPU ranks talk over gloo (NCCL is GPU only); a process already in a group does not join
    # again (a second init_process_group raises); end_process must know that gloo was joined.
    joined = []
    monkeypatch.setattr(distributed, "_joined_gloo", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **kw: joined.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.setup("cpu")
    assert info == DistInfo(1, 2, 1, CPU)
    assert joined == ["gloo"], joined
    assert distributed._joined_gloo is True
    distributed.setup("cpu")
    assert joined == ["gloo"], "joined the process group twice"


def test_a_single_process_joins_no_group(monkeypatch):
    joined = []
    monkeypatch.setattr(distributed, "_joined_gloo", False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **kw: joined.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.setup("cpu")
    assert joined == [] and distributed._joined_gloo is False
    distributed.end_process(7)  # no group joined: returns (the caller exits)


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone (cheap: no torchrun), destroyed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_teardown_leaves_the_group(one_process_group):
    # Two Trainers in one process (the CLI's stage 1 then stage 2) join afresh.
    assert dist.is_initialized()
    distributed.teardown()
    assert not dist.is_initialized()
    distributed.teardown()  # nothing to leave: no error


# --- two forked gloo ranks ----------------------------------------------------------------------


def _bn_worker(rank, world, init_file, rows, x, w_out, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = GlobalBatchNorm1d(x.shape[1], eps=1e-2, momentum=0.3)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, x.shape[1]))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, x.shape[1]))
        start = sum(rows[:rank])
        part = slice(start, start + rows[rank])
        outs, grads = [], []
        for step in range(2):
            xr = (x[part] * (step + 1)).clone().requires_grad_(True)
            y = bn(xr)
            (y * w_out[part]).sum().backward()
            outs.append(y.detach())
            grads.append(xr.grad)
        stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
        with torch.no_grad():
            bn.eval()
            evaluated = bn(x[part])
            bn.train()
            half = bn(x[part].bfloat16())
        t = torch.full((3,), float(rank + 1))
        summed = distributed.all_reduce_sum(t)
        results[rank] = dict(
            outs=outs, grads=grads, weight_grad=bn.weight.grad, bias_grad=bn.bias.grad,
            running_mean=stats[0], running_var=stats[1], tracked=stats[2], evaluated=evaluated, half_dtype=half.dtype,
            summed=summed, t_after=t,
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_on_two_ranks_is_batchnorm_on_the_global_batch(tmp_path):
    """Stage 1's projector BatchNorm under torchrun on CPUs: output, input gradients, parameter
    gradients (summed over ranks, as DDP does), running statistics and their use in eval mode
    are those of one BatchNorm1d over the ranks' rows together, with unequal shares too."""
    rows, D = (3, 5), 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(rows), D, generator=g) * 2 + 1
    w_out = torch.randn(sum(rows), D, generator=g)
    results = mp.Manager().dict()
    fork_ranks(_bn_worker, 2, 2, str(tmp_path / "pg"), rows, x, w_out, results)
    ref = nn.BatchNorm1d(D, eps=1e-2, momentum=0.3)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2.0, D))
        ref.bias.copy_(torch.linspace(-1.0, 1.0, D))
    r0, r1 = results[0], results[1]
    for step in range(2):
        xs = (x * (step + 1)).clone().requires_grad_(True)
        y = ref(xs)
        (y * w_out).sum().backward()
        assert_close(torch.cat([r0["outs"][step], r1["outs"][step]]), y.detach(), what=f"output, step {step}")
        assert_close(torch.cat([r0["grads"][step], r1["grads"][step]]), xs.grad, what=f"input grad, step {step}")
    assert_close(r0["weight_grad"] + r1["weight_grad"], ref.weight.grad, what="weight grad")
    assert_close(r0["bias_grad"] + r1["bias_grad"], ref.bias.grad, what="bias grad")
    for r in (r0, r1):
        assert_close(r["running_mean"], ref.running_mean, what="running mean")
        assert_close(r["running_var"], ref.running_var, what="running var (unbiased, as BatchNorm1d)")
        assert r["tracked"] == int(ref.num_batches_tracked) == 2
    ref.eval()
    assert_close(torch.cat([r0["evaluated"], r1["evaluated"]]), ref(x).detach(), what="eval mode")
    assert r0["half_dtype"] == torch.bfloat16, "the output keeps the input's dtype"
    # all_reduce_sum: the sum over ranks, in a new tensor (the caller's stays its own)
    for rank, r in enumerate((r0, r1)):
        assert torch.equal(r["summed"], torch.full((3,), 3.0))
        assert torch.equal(r["t_after"], torch.full((3,), float(rank + 1))), "all_reduce_sum changed its input"


def test_convert_batchnorm_swaps_every_batchnorm1d_keeping_its_settings_and_state():
    # Stage 1 converts its projector's BatchNorms under torchrun; a resumed (or a converted,
    # already trained) network keeps its running statistics and affine parameters.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4, eps=1e-3, momentum=0.2)),
                        nn.BatchNorm2d(4), nn.BatchNorm1d(4, affine=True))  # fmt: skip
    with torch.no_grad():
        for bn in (net[1][0], net[3]):
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert convert_batchnorm(net) is net
    assert type(net[1][0]) is GlobalBatchNorm1d and type(net[3]) is GlobalBatchNorm1d, "a nested one was missed"
    assert type(net[2]) is nn.BatchNorm2d
    assert (net[1][0].eps, net[1][0].momentum) == (1e-3, 0.2)
    after = net.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# --- seeds and the data position ----------------------------------------------------------------


def test_torch_seed_is_the_value_torch_takes_mod_2_64():
    # torch itself reduces a negative seed mod 2^64: the formula's stream stays the one torch gave.
    assert torch_seed(-1) == 2**64 - 1 == torch.Generator().manual_seed(-1).initial_seed()
    assert torch_seed(2**64 + 5) == 5 and torch_seed(2**63 + 1) == 2**63 + 1
    assert torch_seed(12345) == 12345


def test_loader_state_without_a_global_batch_resumes():
    # Data positions saved before the global batch was recorded still resume (nothing to check).
    data = {"image": torch.arange(20.0).view(10, 2), "label": torch.arange(10)}
    first = InMemoryLoader(data, 4, seed=5)
    next(first)
    state = {k: v for k, v in first.state_dict().items() if k != "global_batch_size"}
    resumed = InMemoryLoader(data, 4, seed=5)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["label"], next(first)["label"])


def test_the_position_is_the_epoch_and_batch_and_each_rank_resumes_its_rows():
    data = {"image": torch.arange(40.0).view(20, 2), "label": torch.arange(20)}
    loader = InMemoryLoader(data, 6, rank=1, world_size=2, seed=4)  # 3 batches an epoch
    for _ in range(4):
        next(loader)
    assert loader.state_dict() == {"epoch": 1, "index": 1, "seed": 4, "global_batch_size": 6}
    resumed = InMemoryLoader(data, 6, rank=1, world_size=2, seed=0)
    resumed.load_state_dict({"epoch": 0, "index": 4, "seed": 4, "global_batch_size": 6})  # unfolded
    whole = InMemoryLoader(data, 6, seed=4)
    for _ in range(4):
        next(whole)
    expected = next(whole)["label"][3:]
    assert torch.equal(next(resumed)["label"], expected)
    assert torch.equal(next(loader)["label"], expected)


# --- the Trainer's rank arithmetic ------------------------------------------------------------


def test_step_seed_separates_ranks_streams_steps_and_attempts():
    # Without global randomness each rank draws its own noise; a retried (non-finite) step draws
    # afresh; the draws (stream 0) and stage 1's augmentations (stream 1) are separate streams.
    base = _step_seed(3, 5, 0)
    others = [_step_seed(3, 5, 0, rank=1), _step_seed(3, 5, 1), _step_seed(3, 6, 0),
              _step_seed(3, 5, 0, attempt=1), _step_seed(4, 5, 0)]  # fmt: skip
    assert len({base, *others}) == 6, others
    assert base == (3 * 1_000_003 + 5 * 8_191) % (2**63 - 1)
    assert 0 <= _step_seed(2**70, 2**40, 1, 7, 3) < 2**63 - 1  # a seed torch takes
    assert _step_seed(-5, 0, 0) >= 0


def test_is_per_sample():
    assert _is_per_sample(torch.zeros(4, 2), 4)
    assert not _is_per_sample(torch.zeros(()), 4)
    assert not _is_per_sample(torch.zeros(8), 4) and not _is_per_sample(torch.zeros(2), 4)


def _as_rank(trainer, rank, world=2):
    """The trainer told it is ``rank`` of ``world`` (its loader keeps its global view)."""
    trainer.dist = DistInfo(rank, world, rank, CPU)
    trainer.local_batch = trainer.cfg.batch_size // world
    return trainer


@pytest.mark.parametrize("accum", [1, 2])
def test_with_global_randomness_a_rank_takes_its_rows_of_each_global_micro_batch(tmp_path, accum):
    """Global randomness (the CPU default): every rank draws the global batch's noise and
    augmentations, and rank r takes its share of each micro-batch (rows [i·B/n + r·b, ...) of
    micro-batch i), so 2 processes train on what 1 process does."""
    cfg = dict(grad_accum=accum, batch_size=8)
    one = Trainer(tiny_train_config(tmp_path / "one", "pretrain", **cfg))
    ranks = [_as_rank(Trainer(tiny_train_config(tmp_path / f"r{r}", "pretrain", **cfg)), r) for r in (0, 1)]
    assert one.global_randomness
    batch, draws = one._batch(0), one._draws(0)
    micro = 8 // accum
    for r, trainer in enumerate(ranks):
        rows = [i * micro + r * (micro // 2) + j for i in range(accum) for j in range(micro // 2)]
        got_batch, got_draws = trainer._batch(0), trainer._draws(0)
        for name in ("image", "view1", "view2"):
            assert torch.equal(got_batch[name], batch[name][rows]), f"rank {r}: {name}, rows {rows}"
        for name, v in draws.items():
            expected = v[rows] if v.dim() else v
            assert torch.equal(got_draws[name], expected), f"rank {r}: draw {name}"
    assert not torch.equal(batch["view1"], batch["view2"]), "the two views are augmented alike"


def test_with_global_randomness_one_process_keeps_the_batch_whole(tmp_path):
    trainer = Trainer(tiny_train_config(tmp_path, "diffusion", grad_accum=2))
    t = torch.arange(8)
    assert torch.equal(trainer._local_rows(t), t)


@pytest.fixture
def as_rank(one_process_group, monkeypatch):
    """Builds Trainers that setup() told are rank r of 2 (one real gloo process underneath, so
    DDP wraps and all-reduces are those of one process)."""
    def build(cfg, rank):
        info = DistInfo(rank, 2, rank, CPU)
        monkeypatch.setattr(distributed, "setup", lambda device=None: info)
        return Trainer(cfg)
    return build


def test_without_global_randomness_each_rank_loads_its_half_and_draws_its_own_noise(tmp_path, as_rank):
    """The GPU default: each rank's loader holds its rows of the global batch; per-sample noise
    and augmentations are the rank's own (not the same on every rank), per-batch values (stage
    1's grid index) the same on all."""
    common = dict(global_randomness=False, batch_size=8, grad_accum=2)
    whole = Trainer(tiny_train_config(tmp_path / "w", "pretrain", **common))
    ranks = [as_rank(tiny_train_config(tmp_path / f"r{r}", "pretrain", **common), r) for r in (0, 1)]
    for r, trainer in enumerate(ranks):
        assert trainer.local_batch == 4
        assert (trainer.loader.schedule.rank, trainer.loader.schedule.world_size) == (r, 2)
        assert trainer.loader.local_batch_size == 4
    images = whole._batch(0)["image"]
    batches = [t._batch(0) for t in ranks]
    for r, b in enumerate(batches):
        assert torch.equal(b["image"], images[4 * r : 4 * r + 4]), f"rank {r}'s rows"
    # the same images on both ranks: their augmentations still differ
    same = {"image": images[:4]}
    for t in ranks:
        t.loader = iter([same])
    views = [t._batch(1) for t in ranks]
    assert not torch.equal(views[0]["view1"], views[1]["view1"]), "both ranks cropped alike"
    draws = [t._draws(5) for t in ranks]
    assert draws[0]["eps"].shape[0] == 4
    assert not torch.equal(draws[0]["eps"], draws[1]["eps"]), "both ranks drew the same noise"
    own = ranks[1].objective.draw(5, 4, ranks[1].image_shape,
                                  torch.Generator().manual_seed(_step_seed(3, 5, 0, 1)), CPU)  # fmt: skip
    per_batch = [k for k, v in draws[0].items() if v.dim() == 0]
    assert per_batch and any(not torch.equal(own[k], draws[0][k]) for k in per_batch)  # would differ unshared
    for k in per_batch:
        assert torch.equal(draws[0][k], draws[1][k]), f"per-batch {k} differs between ranks"


def test_with_global_randomness_each_rank_loads_the_global_batch(tmp_path, as_rank):
    trainer = as_rank(tiny_train_config(tmp_path, "diffusion", batch_size=8), 1)
    assert trainer.global_randomness and trainer.local_batch == 4
    assert (trainer.loader.schedule.rank, trainer.loader.schedule.world_size) == (0, 1)
    assert trainer.loader.local_batch_size == 8
    assert trainer._batch(0)["image"].shape[0] == 4


def test_logged_values_are_the_mean_over_ranks_and_any_ranks_flag_counts(tmp_path, as_rank):
    # (one process underneath: the all-reduced sum is this rank's value; the world says 2)
    trainer = as_rank(tiny_train_config(tmp_path, "diffusion"), 1)
    terms = {"loss": torch.tensor(3.0), "diffusion": torch.tensor(1.0)}
    values, bad = trainer._reduced_values(terms, torch.tensor(2.0))
    assert (values["loss"], values["diffusion"], values["grad_norm"]) == (1.5, 0.5, 2.0)
    assert not bad and trainer.stop_signal == 0
    for loss, norm in ((float("nan"), 1.0), (1.0, float("inf"))):
        _, bad = trainer._reduced_values({"loss": torch.tensor(loss)}, torch.tensor(norm))
        assert bad, (loss, norm)


def test_ranks_agree_on_the_stop_signal(tmp_path):
    import signal

    trainer = Trainer(tiny_train_config(tmp_path, "diffusion"))
    assert trainer._signal_flags() == [0.0, 0.0]
    trainer._interrupted = signal.SIGTERM
    assert trainer._signal_flags() == [0.0, 1.0]
    trainer._agree_on_stop([0.0, 1.0])
    assert trainer.stop_signal == signal.SIGTERM
    trainer._interrupted = 0
    trainer._agree_on_stop([0.0, 0.0])
    assert trainer.stop_signal == 0
    trainer._agree_on_stop([1.0, 0.0])  # another rank's Ctrl-C
    assert trainer.stop_signal == signal.SIGINT
    trainer._agree_on_stop([2.0, 1.0])  # both, on different ranks: SIGTERM first
    assert trainer.stop_signal == signal.SIGTERM
    trainer._interrupted = signal.SIGINT  # this rank's own signal wins
    trainer._agree_on_stop([1.0, 1.0])
    assert trainer.stop_signal == signal.SIGINT


def test_ddp_reduces_only_in_the_last_micro_batch(tmp_path, as_rank):
    trainer = as_rank(tiny_train_config(tmp_path, "diffusion", grad_accum=2), 0)
    ddp = trainer.train_model
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)
    with trainer._gradient_sync(last=False):
        assert not ddp.require_backward_grad_sync
    with trainer._gradient_sync(last=True):
        assert ddp.require_backward_grad_sync


def test_one_process_has_no_gradient_sync_to_skip(tmp_path):
    alone = Trainer(tiny_train_config(tmp_path, "diffusion", grad_accum=2))
    assert isinstance(alone._gradient_sync(last=False), contextlib.nullcontext)


def test_every_ranks_rng_state_is_gathered_in_rank_order(tmp_path, monkeypatch):
    trainer = Trainer(tiny_train_config(tmp_path, "diffusion"))
    state = trainer._rng_state()
    assert sorted(state) == ["cpu"] and torch.equal(state["cpu"], torch.get_rng_state())
    mine = trainer._gather_rng_states()
    assert len(mine) == 1 and torch.equal(mine[0]["cpu"], torch.get_rng_state())
    _as_rank(trainer, 1)

    def all_gather_object(out, obj):
        out[:] = [{"cpu": torch.zeros(1)}, obj]  # rank 0's, then this rank's
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    states = trainer._gather_rng_states()
    assert len(states) == 2 and torch.equal(states[1]["cpu"], torch.get_rng_state())
    assert torch.equal(states[0]["cpu"], torch.zeros(1))


def test_fully_shard_shards_every_block_then_the_network(monkeypatch):
    import torch.distributed.fsdp as fsdp

    sharded = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module: sharded.append(module))
    net = nn.Module()
    net.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    net.decoder_blocks = nn.ModuleList([nn.Linear(2, 2)])
    _fully_shard(net)
    assert [id(m) for m in sharded] == [id(net.blocks[0]), id(net.blocks[1]), id(net.decoder_blocks[0]), id(net)]


def test_a_failing_rank_saves_alone_only_when_every_rank_fails_alike(tmp_path):
    # After one rank's own error the other ranks never join the checkpoint's collectives.
    trainer = Trainer(tiny_train_config(tmp_path, "diffusion"))
    saved = []
    trainer.save_checkpoint = lambda: saved.append(trainer.step) or tmp_path / "x.pt"
    trainer.step = 2
    _as_rank(trainer, 0)
    trainer._save_before_failing(collective=False)
    assert saved == []
    trainer._save_before_failing(collective=True)
    assert saved == [2]
    trainer._saved_step = 2
    trainer._save_before_failing(collective=True)
    assert saved == [2], "saved a step already saved"
    _as_rank(trainer, 0, world=1)
    trainer.step = 3
    trainer._save_before_failing(collective=False)
    assert saved == [2, 3]
    trainer._updating = True  # mid-update: no consistent state
    trainer.step = 4
    trainer._save_before_failing(collective=True)
    assert saved == [2, 3]


@pytest.mark.parametrize("global_randomness", [False, True])
def test_a_folder_run_shards_the_images_by_rank(tmp_path, as_rank, global_randomness):
    """data="folder" on 2 ranks: without global randomness rank 1 loads the second half of
    each global batch; with it, every rank loads the global batch (and takes its rows later)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "tree" / c / f"{k}.png")
    cfg = tiny_train_config(tmp_path, "diffusion", batch_size=4, global_randomness=global_randomness,
                            data="folder", data_options={"path": str(tmp_path / "tree"), "loader": "portable",
                                                         "workers": 0},
                            model_overrides={"img_size": 16, "patch_size": 4, "num_classes": 2})  # fmt: skip
    trainer = as_rank(cfg, 1)
    try:
        schedule = trainer.loader.schedule
        expected = (0, 1, 4) if global_randomness else (1, 2, 2)
        assert (schedule.rank, schedule.world_size, schedule.local_batch_size) == expected
        assert schedule.global_batch_size == 4 and trainer.local_batch == 2
        assert trainer._batch(0)["image"].shape[0] == 2
    finally:
        trainer.loader.close()


_END_SCRIPT = """
import sys
from epg import distributed
distributed._joined_gloo = True  # as setup() leaves a gloo worker
print("out, no newline", end="")
print("err, no newline", end="", file=sys.stderr)
distributed.end_process(3)
raise SystemExit("end_process returned")
"""


def test_end_process_flushes_buffered_output_before_its_exit(tmp_path):
    """os._exit skips the interpreter's own flush: end_process must flush a block-buffered
    stdout (a pipe, a log file) itself, or a worker's last lines are lost (PYTHONUNBUFFERED,
    which hides this, unset here)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", _END_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "out, no newline", proc.stdout
    assert proc.stderr.endswith("err, no newline"), proc.stderr[-2000:]


def test_stage1_views_take_their_own_augmentations_in_order(tmp_path):
    # View 1 (always blurred) and view 2 (solarized at times) are §2's asymmetric pair: each
    # view is made by its own pipeline, view 1's first, from one generator per step.
    trainer = Trainer(tiny_train_config(tmp_path, "pretrain"))
    calls = []

    def pipeline(k):
        def augment(image, g):
            calls.append((k, g.initial_seed()))
            return torch.full_like(image, float(k))
        return augment

    trainer.augment = (pipeline(1), pipeline(2))
    batch = trainer._batch(0)
    assert torch.all(batch["view1"] == 1) and torch.all(batch["view2"] == 2), "views swapped or shared"
    assert [k for k, _ in calls] == [1, 2] and calls[0][1] == calls[1][1] == _step_seed(3, 0, 1)
