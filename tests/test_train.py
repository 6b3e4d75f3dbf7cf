"""The Trainer: schedules, exact resume, compile, non-finite steps, crash safety, torchrun."""

import json
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from epg import checkpoint as ckpt
from epg.models import build
from epg.train import Interrupted, TrainConfig, Trainer, export_checkpoint, lr_factor, read_checkpoint
from helpers import TINY, assert_close, signal_in_call, tiny_train_config as _cfg, torchrun

def _losses(records):
    return [r["loss"] for r in records]


def _perceptual_network(tmp_path, mode):
    """The Trainer options giving a consistency run a stage-1 network (its auxiliary InfoNCE's
    W_φ); none for the other modes."""
    if mode != "consistency":
        return {}
    ckpt.save(build("rcm-tiny", **TINY), tmp_path / "s1")
    return {"encoder": str(tmp_path / "s1")}


def test_lr_schedules():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(steps=700, warmup_steps=10, lr_schedule="warmup-step",
                       lr_milestones=(400, 500), lr_factors=(0.3, 0.08))  # fmt: skip
    assert [lr_factor(s, step) for s in (5, 399, 400, 499, 500)] == pytest.approx([0.6, 1, 0.3, 0.3, 0.08])


@pytest.mark.parametrize("mode", ["pretrain", "diffusion", "consistency"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, mode):
    straight = Trainer(_cfg(tmp_path / "a", mode))
    full = _losses(straight.fit())

    first = Trainer(_cfg(tmp_path / "b", mode))
    part = _losses(first.fit(stop_at=3))
    resumed = Trainer(_cfg(tmp_path / "b", mode))
    assert resumed.step == 3
    rest = _losses(resumed.fit())
    assert part + rest == full  # bit for bit
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_a_resumed_run_steps_with_its_own_machines_adamw(tmp_path):
    # load_state_dict restores the saving run's AdamW implementation with its groups: fused
    # from a GPU run's checkpoint (and the CPU's foreach loop on a GPU resumed from a CPU one).
    full = _losses(Trainer(_cfg(tmp_path / "a", "diffusion")).fit())
    part = _losses(Trainer(_cfg(tmp_path / "b", "diffusion")).fit(stop_at=3))
    path = tmp_path / "b" / "run" / "checkpoints" / "step_00000003.pt"
    state = read_checkpoint(path)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=True, foreach=False)  # as a GPU run saves them
    ckpt.torch_save_checksummed(state, path)
    resumed = Trainer(_cfg(tmp_path / "b", "diffusion"))
    assert resumed.step == 3
    assert [(g["fused"], g["foreach"]) for g in resumed.optimizer.param_groups] == [(False, True)] * 2
    assert part + _losses(resumed.fit()) == full


def test_a_fresh_start_never_overwrites_an_earlier_run_unasked(tmp_path, capsys):
    Trainer(_cfg(tmp_path, "diffusion", steps=3)).fit()
    ckpt_dir = Path(tmp_path / "run" / "checkpoints")
    before = sorted(p.name for p in ckpt_dir.iterdir())
    with pytest.raises(ValueError, match="holds an earlier run.*resume=restart"):
        Trainer(_cfg(tmp_path, "diffusion", steps=3, resume="none"))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before
    # Another run's settings in the folder: refused by auto-resume, naming the difference.
    with pytest.raises(ValueError, match=r"other settings \(objective: \{\} there, \{'label_dropout': 0.5\} now"):
        Trainer(_cfg(tmp_path, "diffusion", steps=3, objective={"label_dropout": 0.5}))
    with pytest.raises(ValueError, match="mode: 'diffusion' there, 'consistency' now"):
        Trainer(_cfg(tmp_path, "consistency", steps=3))
    export_checkpoint(tmp_path / "run")
    capsys.readouterr()
    restarted = Trainer(_cfg(tmp_path, "diffusion", steps=3, resume="restart"))
    assert restarted.step == 0 and not list(ckpt_dir.glob("step_*.pt"))
    assert not (tmp_path / "run" / "log.jsonl").exists() and not (tmp_path / "run" / "exports").exists()
    # What went is said: an export or the final network may be what someone meant to keep.
    err = capsys.readouterr().err
    assert f"resume=restart: discarded the earlier run in {tmp_path / 'run'} (exports/, step_00000003.pt, log.jsonl)" in err, err
    Trainer(_cfg(tmp_path, "diffusion", steps=3, resume="restart"))
    assert "discarded" not in capsys.readouterr().err  # nothing there, nothing said


def test_resume_skips_an_unreadable_newest_checkpoint_and_clears_temp_files(tmp_path, capsys):
    Trainer(_cfg(tmp_path, "diffusion", steps=4, ckpt_every=2, keep_checkpoints=3)).fit()
    ckpt_dir = Path(tmp_path / "run" / "checkpoints")
    newest = ckpt_dir / "step_00000004.pt"
    damaged = newest.read_bytes()[:1000]
    newest.write_bytes(damaged)  # damaged on disk
    (ckpt_dir / ".step_00000006.pt.abc123.tmp").write_bytes(b"half written")
    resumed = Trainer(_cfg(tmp_path, "diffusion", steps=4, ckpt_every=2, keep_checkpoints=1))
    assert resumed.step == 2
    err = capsys.readouterr().err
    assert "cannot read training checkpoint" in err and "truncated by an interrupted" in err and "weights_only" not in err
    # Set aside, not deleted, and not overwritten by the run's own step 4 either.
    aside = ckpt_dir / "step_00000004.pt.unreadable"
    assert aside.read_bytes() == damaged and not newest.exists() and not list(ckpt_dir.glob("*.tmp"))
    resumed.fit(stop_at=3)  # writes step 3 and prunes the older ones
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000003.pt", aside.name]
    again = Trainer(_cfg(tmp_path, "diffusion", steps=4, ckpt_every=2, keep_checkpoints=1))
    assert again.step == 3
    again.fit()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000004.pt", aside.name]
    assert aside.read_bytes() == damaged
    assert Trainer(_cfg(tmp_path, "diffusion", steps=4, ckpt_every=2, keep_checkpoints=1)).step == 4
    Trainer(_cfg(tmp_path, "diffusion", steps=4, resume="restart"))
    assert not list(ckpt_dir.iterdir())  # the earlier run's set-aside files go with it


def _flip_a_byte_of_a_tensor(path: Path) -> None:
    """Change one byte in the middle of the largest tensor record of a torch.save archive: it
    still loads, as a different tensor."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the record's bytes (stored, not deflated)
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["empty", "incomplete", "config", "flipped byte"])
def test_an_empty_or_incomplete_checkpoint_is_named_and_skipped(tmp_path, capsys, damage):
    Trainer(_cfg(tmp_path, "diffusion", steps=4, ckpt_every=2, keep_checkpoints=3)).fit()
    ckpt_dir = Path(tmp_path / "run" / "checkpoints")
    newest = ckpt_dir / "step_00000004.pt"
    if damage == "empty":
        newest.write_bytes(b"")
    elif damage == "flipped byte":  # loads, and would resume with a silently changed tensor
        _flip_a_byte_of_a_tensor(newest)
        torch.load(newest, weights_only=True)
    else:  # without the data position (it failed with KeyError 'data'), or the config's model
        state = torch.load(newest, weights_only=True)
        holder, key = (state, "data") if damage == "incomplete" else (state["config"], "model")
        del holder[key]
        torch.save(state, newest)
    capsys.readouterr()
    assert Trainer(_cfg(tmp_path, "diffusion", steps=4)).step == 2
    err = capsys.readouterr().err
    expected = {"empty": "the file is empty (0 bytes)", "incomplete": "is incomplete: it lacks data",
                "config": "is incomplete: it lacks config.model",
                "flipped byte": "do not match the checksum written with them: the file changed on disk"}[damage]
    assert expected in err and "resuming from the older step_00000002.pt" in err
    with pytest.raises(ckpt.CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Trainer(_cfg(tmp_path, "diffusion", steps=4, resume=str(ckpt_dir / "step_00000004.pt.unreadable")))
    (ckpt_dir / "step_00000002.pt").write_bytes(b"")  # none reads now
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint in .* reads: discard the run \(resume=restart\)"):
        Trainer(_cfg(tmp_path, "diffusion", steps=4))


def test_resuming_a_run_past_its_steps_says_nothing_is_left(tmp_path, capsys):
    Trainer(_cfg(tmp_path, "diffusion", steps=4)).fit()
    capsys.readouterr()
    trainer = Trainer(_cfg(tmp_path, "diffusion", steps=3))
    assert trainer.step == 4
    assert "at step 4 already, at or past steps=3: nothing is left to train" in capsys.readouterr().err


def _sigterm_reached_the_previous_handler(signum, frame):
    # (rather than SIG_DFL, which would end pytest itself were the Trainer's handler missing)
    raise AssertionError("SIGTERM reached the handler from before fit")


@pytest.mark.parametrize(
    "signum,previous",
    [(signal.SIGINT, signal.default_int_handler), (signal.SIGINT, signal.SIG_IGN),
     (signal.SIGTERM, _sigterm_reached_the_previous_handler)],
    ids=["ctrl-c", "ctrl-c-ignored", "sigterm"],
)  # fmt: skip
def test_a_signal_finishes_the_step_saves_once_and_resumes_exactly(tmp_path, signum, previous):
    # "ctrl-c-ignored": a process started with SIGINT ignored (a background job of a
    # non-interactive shell) still stops cleanly on Ctrl-C during fit, and gets its own handler
    # back afterwards. SIGTERM: how schedulers and containers stop a job.
    outer = signal.signal(signum, previous)
    try:
        _signal_then_resume(tmp_path, signum, previous)
    finally:
        signal.signal(signum, outer)


def _signal_then_resume(tmp_path, signum, previous):
    full = _losses(Trainer(_cfg(tmp_path / "a", "diffusion", ckpt_every=0)).fit())
    trainer = Trainer(_cfg(tmp_path / "b", "diffusion", ckpt_every=3, preview_every=3))
    saves, previews = [], []
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda: saves.append(trainer.step) or save()
    trainer.preview = lambda t, step: previews.append(step)
    signal_in_call(trainer, 3, signum)
    words = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    with pytest.raises(Interrupted, match=rf"^{re.escape(words)} at step 3; checkpoint saved") as stop:
        trainer.fit()
    assert stop.value.signum == signum
    assert saves == [3] and previews == []  # the stop's checkpoint only: no periodic one, no preview
    assert signal.getsignal(signum) is previous  # restored
    resumed = Trainer(_cfg(tmp_path / "b", "diffusion", ckpt_every=0))
    assert resumed.step == 3
    assert _losses(resumed.fit()) == full[3:]


def test_a_repeated_sigterm_is_one_request_and_ctrl_c_then_stops_at_once(tmp_path):
    # A torchrun worker of a Slurm job gets SIGTERM twice, from Slurm and from torchrun.
    trainer = Trainer(_cfg(tmp_path / "a", "diffusion", ckpt_every=0))
    signal_in_call(trainer, 2, signal.SIGTERM, signal.SIGTERM)
    with pytest.raises(Interrupted, match=r"^terminated \(SIGTERM\) at step 2; checkpoint saved"):
        trainer.fit()
    trainer = Trainer(_cfg(tmp_path / "b", "diffusion", ckpt_every=0))
    signal_in_call(trainer, 2, signal.SIGTERM, signal.SIGINT)
    with pytest.raises(Interrupted, match=r"^interrupted again: stopped at once$"):
        trainer.fit()
    assert not trainer.checkpoints()  # step 2 was not finished, nor saved


def test_a_signal_after_the_last_steps_collective_still_stops_the_run(tmp_path):
    # During the last step's logging, after its all-reduce: the run has its steps, saves them,
    # and still reports the signal (epg demo would otherwise go on into stage 2).
    trainer = Trainer(_cfg(tmp_path / "a", "diffusion", steps=3, ckpt_every=0))
    log = trainer._log
    trainer._log = lambda record: (record["step"] == 3 and os.kill(os.getpid(), signal.SIGTERM)) or log(record)
    with pytest.raises(Interrupted, match=r"^terminated \(SIGTERM\) at step 3; checkpoint saved"):
        trainer.fit()
    # and during the final checkpoint
    trainer = Trainer(_cfg(tmp_path / "b", "diffusion", steps=3, ckpt_every=0))
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda: os.kill(os.getpid(), signal.SIGTERM) or save()
    with pytest.raises(Interrupted, match=r"^terminated \(SIGTERM\) at step 3; checkpoint saved"):
        trainer.fit()
    assert Trainer(_cfg(tmp_path / "b", "diffusion", steps=3, ckpt_every=0)).step == 3


def test_interrupted_survives_pickling():
    # (as multiprocessing and torch's worker error wrapping carry exceptions)
    stop = pickle.loads(pickle.dumps(Interrupted("terminated (SIGTERM) at step 3", signal.SIGTERM)))
    assert (str(stop), stop.signum) == ("terminated (SIGTERM) at step 3", signal.SIGTERM)


def test_an_error_between_steps_keeps_the_steps_made(tmp_path, capsys):
    trainer = Trainer(_cfg(tmp_path, "diffusion", ckpt_every=0))
    real = trainer.loader

    class Loader:  # the fourth batch holds a corrupt image
        calls = 0

        def __next__(self):
            Loader.calls += 1
            if Loader.calls == 4:
                raise RuntimeError("corrupt image x.png")
            return next(real)

        def __getattr__(self, name):  # state_dict, close: the real loader's
            return getattr(real, name)

    trainer.loader = Loader()
    with pytest.raises(RuntimeError, match="corrupt image"):
        trainer.fit()
    assert "step 3) before stopping" in capsys.readouterr().err
    assert Trainer(_cfg(tmp_path, "diffusion", ckpt_every=0)).step == 3


def test_defaults_train_the_digits_networks_in_a_folder_per_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(TrainConfig(mode="pretrain", steps=1, batch_size=8, compile=False, progress=False))
    assert trainer.cfg.model == "rcm-digits" and trainer.run_dir == Path("runs/pretrain")
    trainer = Trainer(TrainConfig(mode="consistency", steps=1, batch_size=8, compile=False, progress=False))
    assert trainer.cfg.model == "epg-digits" and trainer.run_dir == Path("runs/consistency")
    err = capsys.readouterr().err
    assert "starts from random weights" in err and "auxiliary InfoNCE term of the consistency loss is off" in err


def test_weight_decay_groups_and_frozen_copies(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "diffusion"))
    no_decay = trainer.optimizer.param_groups[1]["params"]
    assert {id(p) for p in no_decay} == {id(trainer.model.pos_embed), id(trainer.model.cls_token)}
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert not any(p.requires_grad for p in trainer.ema.parameters())
    trainer.fit(stop_at=1)
    moved = [not torch.equal(e, p) for e, p in zip(trainer.ema.parameters(), trainer.model.parameters())]
    assert any(moved)  # the EMA lags the model


def _one_step_of_averaging(trainer, average):
    """The online parameters before and after one train_step, and ``average``'s before it."""
    before = [p.detach().clone() for p in trainer.model.parameters()]
    average_before = [p.detach().clone() for p in average.parameters()]
    trainer.train_step()
    after = [p.detach().clone() for p in trainer.model.parameters()]
    # lr 1e-2 without warm-up moves every weight by ~1e-2 in AdamW's first step: a wrong decay
    # (0.9999 for 0.99 differs by 1% of the step) or averaging the pre-step weights stands far
    # above the 1e-6 tolerance, which only float32 rounding of the lerp has to fit in.
    assert max((b - a).abs().max().item() for a, b in zip(before, after)) > 1e-3
    return before, average_before, after


def _assert_averaged(average, average_before, after, decay):
    for (name, got), old, new in zip(average.named_parameters(), average_before, after):
        expected = decay * old.double() + (1 - decay) * new.double()
        assert_close(got.double(), expected, atol=1e-6, rtol=0, what=name)


def test_the_ema_moves_by_1_minus_ema_decay_towards_the_stepped_weights(tmp_path):
    # Spec §6.3: EMA of the parameters, starting from the online weights, updated after the
    # optimiser's step (the weights the EMA takes in are the new ones).
    trainer = Trainer(_cfg(tmp_path, "diffusion", ema_decay=0.9, lr=1e-2, warmup_steps=0))
    before, ema_before, after = _one_step_of_averaging(trainer, trainer.ema)
    assert all(torch.equal(e, p) for e, p in zip(ema_before, before))
    _assert_averaged(trainer.ema, ema_before, after, 0.9)


def test_the_stage1_target_averages_parameters_with_target_ema_and_keeps_its_buffers(tmp_path):
    # Spec §5.1: the target is an EMA (target_ema 0.99, not the stage-2 ema_decay, left at its
    # 0.9999 default here) of the parameters only; its eval-mode projector BatchNorms keep
    # their initial running statistics while the online network's follow the batches.
    trainer = Trainer(_cfg(tmp_path, "pretrain", lr=1e-2, warmup_steps=0))
    assert trainer.cfg.target_ema == 0.99 and trainer.cfg.ema_decay == 0.9999
    target_buffers = [b.clone() for b in trainer.target.buffers()]
    online_buffers = [b.clone() for b in trainer.model.buffers()]
    assert target_buffers  # the projector's BatchNorm statistics
    before, target_before, after = _one_step_of_averaging(trainer, trainer.target)
    assert all(torch.equal(t, p) for t, p in zip(target_before, before))
    _assert_averaged(trainer.target, target_before, after, 0.99)
    assert not all(torch.equal(a, b) for a, b in zip(online_buffers, trainer.model.buffers()))
    for (name, got), old in zip(trainer.target.named_buffers(), target_buffers):
        assert torch.equal(got, old), name


@pytest.mark.parametrize("after_warmup", [True, False])
def test_gradients_are_clipped_to_grad_clip_once_warm_up_ends(tmp_path, after_warmup):
    # Spec §6.3: clipping to a global norm, only after warm-up (clip_after_warmup); the logged
    # grad_norm is the norm before clipping. grad_clip is far below this network's gradient
    # norms (~1e3), so every clipped step shows in the norm AdamW steps with.
    cfg = _cfg(tmp_path, "diffusion", grad_clip=1e-3, warmup_steps=2, clip_after_warmup=after_warmup)
    trainer = Trainer(cfg)
    stepped = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        stepped.append(torch.stack([g.norm() for g in grads]).norm().item())

    trainer.optimizer.register_step_pre_hook(record_norm)
    logged = [trainer.train_step()["grad_norm"] for _ in range(3)]
    assert min(logged) > 1.0  # clipped steps too: the norm is logged before clipping
    expected = [1e-3 if step >= 2 or not after_warmup else norm for step, norm in enumerate(logged)]
    assert stepped == pytest.approx(expected, rel=1e-4)


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "diffusion", max_bad_steps=3))
    real_loss = trainer.loss_fn
    calls = {"n": 0}

    seen = []

    def sometimes_nan(batch, draws):
        calls["n"] += 1
        seen.append(draws["eps"].clone())
        loss, terms = real_loss(batch, draws)
        return (loss * float("nan"), terms) if calls["n"] == 2 else (loss, terms)

    trainer.loss_fn = sometimes_nan
    before = [p.clone() for p in trainer.model.parameters()]
    records = trainer.fit(stop_at=2)
    assert trainer.step == 2 and trainer.skipped_total == 1 and len(records) == 3
    assert not torch.equal(seen[1], seen[2])  # the retry of step 1 draws fresh noise
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    trainer.loss_fn = lambda b, d: (real_loss(b, d)[0] * float("inf"), real_loss(b, d)[1])
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row, the last at step 2 \(loss=inf"):
        trainer.fit()
    assert trainer.step == 2

    # A stop between checkpoints saves one with its bad-step count; resumed, the run gets three
    # tries of its own, not one.
    run = _cfg(tmp_path / "b", "diffusion", max_bad_steps=3, ckpt_every=0)
    trainer = Trainer(run)
    good, calls = trainer.loss_fn, []

    def fails_from_step_2(b, d):
        calls.append(1)
        loss, terms = good(b, d)
        return (loss * float("inf"), terms) if len(calls) > 2 else (loss, terms)

    trainer.loss_fn = fails_from_step_2
    with pytest.raises(RuntimeError, match="the last at step 2 .*; the newest checkpoint is in"):
        trainer.fit()  # (no checkpoint before this stop: it is the one saved on the way out)
    resumed = Trainer(run)
    assert resumed.step == 2 and resumed.bad_in_a_row == 3
    real_loss, tries = resumed.loss_fn, []
    resumed.loss_fn = lambda b, d: tries.append(1) or (real_loss(b, d)[0] * float("inf"), real_loss(b, d)[1])
    with pytest.raises(RuntimeError, match="6 non-finite steps in a row"):
        resumed.fit()
    assert len(tries) == 3
    # Not one step made: nothing to save, and the message does not point to a checkpoint.
    fresh = Trainer(_cfg(tmp_path / "c", "diffusion", max_bad_steps=2, ckpt_every=0))
    real_fresh = fresh.loss_fn
    fresh.loss_fn = lambda b, d: (real_fresh(b, d)[0] * float("nan"), real_fresh(b, d)[1])
    with pytest.raises(RuntimeError, match="at step 0 .*; no step was made, so there is no checkpoint"):
        fresh.fit()


@pytest.mark.parametrize("accum", [1, 2])
def test_fp16_scales_the_loss_as_the_paper_and_tracks_fp32(tmp_path, accum):
    fp32 = Trainer(_cfg(tmp_path / "f", "diffusion", steps=3, ckpt_every=0)).fit()
    # From a scale whose gradients fit in fp16 there is no retry, so the draws are fp32's; with
    # micro-batches each backward takes 1/accum of the scaled loss.
    settled = Trainer(_cfg(tmp_path / "s", "diffusion", steps=3, ckpt_every=0, precision="fp16", grad_accum=accum))
    settled.loss_scale = 64.0
    fp16 = settled.fit()
    assert [r["skipped"] for r in fp16] == [0, 0, 0]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in fp16] == pytest.approx([r[key] for r in fp32], rel=2e-2), key
    assert [r["loss_scale"] for r in fp16] == pytest.approx([64.0 * 1.000693**k for k in range(3)])


def test_fp16_overflows_from_the_papers_initial_scale_halve_it_without_stopping(tmp_path):
    # From the paper's 2^14 this network's first gradients overflow fp16 (more times in a row
    # than max_bad_steps): each overflow halves the scale and retries, without stopping the run.
    fresh = Trainer(_cfg(tmp_path / "p", "diffusion", steps=3, ckpt_every=0, precision="fp16", max_bad_steps=2))
    records = fresh.fit()
    assert records[0]["loss_scale"] == 2.0**14 and fresh.step == 3 and fresh.skipped_total >= 3
    skipped = [r["skipped"] > (p["skipped"] if p else 0) for p, r in zip([None, *records], records)]
    for a, b, a_skipped in zip(records, records[1:], skipped):
        assert b["loss_scale"] == pytest.approx(a["loss_scale"] * (0.5 if a_skipped else 1.000693))


def test_fp16_resumes_exactly_with_its_loss_scale(tmp_path):
    full = Trainer(_cfg(tmp_path / "a", "diffusion", steps=4, precision="fp16")).fit()
    part = Trainer(_cfg(tmp_path / "b", "diffusion", steps=4, precision="fp16")).fit(stop_at=2)
    resumed = Trainer(_cfg(tmp_path / "b", "diffusion", steps=4, precision="fp16"))
    assert resumed.loss_scale == pytest.approx(part[-1]["loss_scale"] * 1.000693)
    rest = resumed.fit()
    assert [r["loss"] for r in part + rest] == [r["loss"] for r in full]


def test_fp16_overflows_count_as_bad_steps_once_the_scale_is_down_to_1(tmp_path):
    # Gradients that stay infinite are not the scale's fault: from scale 4 two retries halve it
    # to 1, and from there max_bad_steps (3) tries stop the run.
    trainer = Trainer(_cfg(tmp_path / "a", "diffusion", precision="fp16", max_bad_steps=3))
    trainer.loss_scale = 4.0
    next(trainer.model.parameters()).register_hook(lambda g: g * float("inf"))
    with pytest.raises(RuntimeError, match="5 non-finite steps in a row, 2 of them fp16 overflows"):
        trainer.fit()
    assert trainer.loss_scale == 1.0 and trainer.step == 0 and trainer.skipped_total == 5

    # A non-finite loss is no overflow: it counts at once and leaves the scale.
    trainer = Trainer(_cfg(tmp_path / "b", "diffusion", precision="fp16", max_bad_steps=2))
    trainer.loss_scale = 64.0
    real = trainer.loss_fn
    trainer.loss_fn = lambda b, d: (real(b, d)[0] * float("nan"), real(b, d)[1])
    with pytest.raises(RuntimeError, match=r"2 non-finite steps in a row, the last at step 0 \(loss=nan"):
        trainer.fit()
    assert trainer.loss_scale == 64.0

    # An overflow streak ends with the step made after it: later infinite gradients at scale 1
    # get max_bad_steps (2) tries, not more.
    trainer = Trainer(_cfg(tmp_path / "c", "diffusion", precision="fp16", max_bad_steps=2))
    trainer.loss_scale = 2.0 * 64.0
    param = next(trainer.model.parameters())
    hook = param.register_hook(lambda g: g * float("inf"))
    trainer.train_step()  # overflow: the scale halves to 64, where this network's gradients fit
    hook.remove()
    trainer.train_step()
    assert trainer.step == 1 and trainer.loss_scale == pytest.approx(64.0 * 1.000693)
    trainer.loss_scale = 1.0
    param.register_hook(lambda g: g * float("inf"))
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row, the last at step 1"):
        trainer.fit()
    assert trainer.skipped_total == 3


def test_stage2_starts_from_a_stage1_encoder(tmp_path):
    stage1 = Trainer(_cfg(tmp_path / "s1", "pretrain", steps=2))
    stage1.fit()
    encoder_dir = stage1.export()
    cfg = _cfg(tmp_path / "s2", "diffusion", encoder=str(encoder_dir))
    stage2 = Trainer(cfg)
    for name, p in stage1.model.state_dict().items():
        if not name.startswith("projection_head"):
            assert torch.equal(stage2.model.state_dict()[name], p), name


def test_consistency_with_aux_weight_0_loads_no_perceptual_network(tmp_path):
    stage1 = tmp_path / "s1"
    ckpt.save(build("rcm-tiny", **TINY), stage1)
    cfg = _cfg(tmp_path / "a", "consistency", encoder=str(stage1), objective={"aux_weight": 0.0})
    trainer = Trainer(cfg)
    assert trainer.perceptual is None and trainer.objective.perceptual is None
    trainer.train_step()
    assert Trainer(_cfg(tmp_path / "b", "consistency", encoder=str(stage1))).perceptual is not None
    cfg = _cfg(tmp_path / "c", "consistency", perceptual=str(stage1), objective={"aux_weight": 0})
    with pytest.raises(ValueError, match="perceptual names the auxiliary InfoNCE's network, which objective.aux_weight=0"):
        Trainer(cfg)


def test_consistency_reads_an_official_stage1_file_with_the_matching_config(tmp_path):
    # A released RCM .pth carries no config: the perceptual network takes the stage-1 config
    # whose encoder has the model's shape (epg-tiny -> rcm-tiny, epg-l-16 -> rcm-l-16).
    rcm = build("rcm-tiny")
    torch.save(rcm.state_dict(), tmp_path / "rcm.pth")
    cfg = _cfg(tmp_path, "consistency", model_overrides={"drop": 0.5}, encoder=str(tmp_path / "rcm.pth"))
    trainer = Trainer(cfg)
    assert trainer.perceptual.config == rcm.config
    for name, p in trainer.perceptual.state_dict().items():
        assert torch.equal(p, rcm.state_dict()[name]), name
    cfg = _cfg(tmp_path / "b", "consistency", perceptual=str(tmp_path / "rcm.pth"))  # 16 px, 1 channel
    with pytest.raises(ValueError, match="no stage-1 config matches.*set perceptual_config"):
        Trainer(cfg)
    # A stage-1 file of another width is read as the matching config, fails, and says what to set.
    torch.save(build("rcm-tiny", embed_dim=32).state_dict(), tmp_path / "narrow.pth")
    cfg = _cfg(tmp_path / "c", "consistency", model_overrides={"drop": 0.5}, perceptual=str(tmp_path / "narrow.pth"))
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)mismatched key.*read as rcm-tiny.*name its config with perceptual_config"):
        Trainer(cfg)


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        Trainer(_cfg(tmp_path, "denoise"))
    with pytest.raises(ValueError, match="needs a stage-1 rcm"):
        Trainer(_cfg(tmp_path, "pretrain", model="epg-tiny"))
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(_cfg(tmp_path, "diffusion", resume=str(tmp_path / "nope.pt")))
    # A negative seed trained, then failed in sampling (epg demo, previews): refused up front.
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            Trainer(_cfg(tmp_path, "diffusion", seed=seed))


def test_a_seed_past_the_generators_64_bits_trains(tmp_path):
    # seed·1_000_003 + epoch (the data order) and seed·7919 + 1 (dropout) used to overflow
    # torch's 64-bit seed ("Overflow when unpacking long long") before the first step.
    big = 2**70 + 3
    records = Trainer(_cfg(tmp_path / "big", "diffusion", steps=2, seed=big)).fit()
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize("mode", ["pretrain", "diffusion", "consistency"])
def test_gradient_accumulation_takes_the_whole_batchs_step(tmp_path, mode):
    # Per-sample losses averaged over the batch, and the InfoNCE keys of the whole batch given
    # to every micro-batch: n micro-batches of B/n rows, each backward taking 1/n, give the
    # loss and gradient of the whole batch (up to rounding). Dropout off: its masks come from a
    # stream consumed per pass, which micro-batches split differently. Stage 1 without its
    # projector's BatchNorm (statistics over the micro-batch; see the test below); the
    # consistency loss with its auxiliary InfoNCE through a perceptual network.
    overrides = {"proj_layers": 1} if mode == "pretrain" else {"drop": 0.0}
    extra = _perceptual_network(tmp_path, mode)
    runs = {}
    for n in (1, 2, 4):
        cfg = _cfg(tmp_path / f"n{n}", mode, steps=3, ckpt_every=0, grad_accum=n, **extra)
        cfg.model_overrides.update(overrides)
        trainer = Trainer(cfg)
        runs[n] = (trainer.fit(), trainer)
    records, reference = runs[1]
    terms = [k for k in records[0] if k not in ("step", "lr", "skipped", "images_per_s")]
    assert "grad_norm" in terms and len(terms) >= 3
    if mode == "consistency":
        assert records[0]["aux"] > 0
    for n in (2, 4):
        other, trainer = runs[n]
        for a, b in zip(records, other):
            assert [b[k] for k in terms] == pytest.approx([a[k] for k in terms], rel=1e-5, abs=1e-7)
        # AdamW divides by sqrt(v): where a gradient is ~0 its rounding moves the update, so
        # parameters agree to 1% of one step's size (lr 1e-3), not to the gradients' 1e-5.
        for (name, a), b in zip(reference.model.named_parameters(), trainer.model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["pretrain", "consistency"])
def test_keys_computed_slice_by_slice_are_the_whole_batchs(tmp_path, mode):
    # What makes the micro-batches' whole-batch keys exact: each key depends on its own sample
    # only, with the projector BatchNorms of the networks the Trainer builds (stage 1's target
    # and the perceptual network in eval mode; h taken before the online projector).
    extra = _perceptual_network(tmp_path, mode)
    trainer = Trainer(_cfg(tmp_path, mode, batch_size=16, grad_accum=4, **extra))
    batch, draws = trainer._batch(0), trainer._draws(0)
    sliced = trainer._whole_batch_keys(list(trainer._micro_batches(batch, draws)))
    whole = trainer.objective.keys(batch, draws)
    assert sorted(whole) == (["h_n1", "z1", "z2"] if mode == "pretrain" else ["z"])
    for name, k in whole.items():
        torch.testing.assert_close(sliced[name], k, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pretrain", "consistency"])
def test_compiled_accumulated_steps_agree_with_eager(tmp_path, mode):
    # The compiled key pass, and the compiled loss given the whole batch's keys.
    extra = _perceptual_network(tmp_path, mode)
    runs = []
    for compiled in (False, True):
        cfg = _cfg(tmp_path / str(compiled), mode, steps=2, ckpt_every=0, grad_accum=2, compile=compiled, **extra)
        if mode == "consistency":
            cfg.model_overrides["drop"] = 0.0
        runs.append([{k: r[k] for k in r if k not in ("step", "lr", "skipped", "images_per_s")}
                     for r in Trainer(cfg).fit()])  # fmt: skip
    eager, compiled = runs
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4, abs=1e-6)
    # AdamW's first step moves every parameter by ±lr, whatever the size of its gradient: the
    # signs of stage 1's near-zero gradients follow the rounding, so later steps agree loosely.
    assert compiled[1]["loss"] == pytest.approx(eager[1]["loss"], rel=1e-3)


def test_accumulated_stage1_normalises_over_the_micro_batch_and_resumes_exactly(tmp_path):
    # The projector's BatchNorm takes its statistics from the micro-batch, so the contrastive
    # term (on the projector's z) differs from the whole batch's; the consistency term (on h,
    # before the projector) is the whole batch's at the first step, negatives and all.
    whole = Trainer(_cfg(tmp_path / "w", "pretrain", steps=1)).fit()[0]
    full = Trainer(_cfg(tmp_path / "a", "pretrain", steps=4, grad_accum=2)).fit()
    assert full[0]["consistency"] == pytest.approx(whole["consistency"], rel=1e-5)
    assert full[0]["contrastive"] != pytest.approx(whole["contrastive"], rel=1e-3)
    part = _losses(Trainer(_cfg(tmp_path / "b", "pretrain", steps=4, grad_accum=2)).fit(stop_at=2))
    rest = _losses(Trainer(_cfg(tmp_path / "b", "pretrain", steps=4, grad_accum=2)).fit())
    assert part + rest == _losses(full)


@pytest.mark.parametrize("mode", ["pretrain", "diffusion", "consistency"])
def test_activation_checkpointing_trains_the_same_steps(tmp_path, mode):
    # Bit for bit: the recomputed blocks replay the forward, dropout masks included (consistency:
    # drop 0.5, the target pass rewinding the RNG to the online pass's masks), and in consistency
    # the gradient also flows through the frozen perceptual network, which recomputes too.
    extra = _perceptual_network(tmp_path, mode)
    runs = []
    for on in (False, True):
        trainer = Trainer(_cfg(tmp_path / str(on), mode, steps=3, ckpt_every=0, activation_checkpointing=on, **extra))
        assert trainer.model.activation_checkpointing is on
        if mode == "consistency":
            assert trainer.perceptual.activation_checkpointing is on and trainer.ema.activation_checkpointing is False
        runs.append([{k: v for k, v in r.items() if k != "images_per_s"} for r in trainer.fit()])
    assert runs[1] == runs[0]
    if mode == "consistency":
        assert runs[0][0]["aux"] != 0


def test_a_draw_neither_per_sample_nor_per_batch_is_refused(tmp_path):
    # Micro-batches slice per-sample rows and share 0-d values; anything else has no split.
    trainer = Trainer(_cfg(tmp_path, "diffusion", grad_accum=2))
    draw = trainer.objective.draw
    trainer.objective.draw = lambda *args: {**draw(*args), "pairs": torch.zeros(16)}
    with pytest.raises(RuntimeError, match="pairs has 16 rows where the step has 8"):
        trainer.train_step()


def test_grad_accum_must_divide_each_ranks_rows(tmp_path):
    for bad in (0, -1, 1.5, 2.0):
        with pytest.raises(ValueError, match="grad_accum must be an integer >= 1"):
            Trainer(_cfg(tmp_path, "diffusion", grad_accum=bad))
    with pytest.raises(ValueError, match="takes 8 rows of batch_size 8, which grad_accum 3 does not divide"):
        Trainer(_cfg(tmp_path, "diffusion", grad_accum=3))
    assert TrainConfig.from_dict({"grad_accum": "4"}).grad_accum == 4


@pytest.mark.slow
def test_compiled_steps_agree_with_eager_and_resume_within_tolerance(tmp_path):
    eager = _losses(Trainer(_cfg(tmp_path / "e", "diffusion", steps=4)).fit())
    compiled_run = Trainer(_cfg(tmp_path / "c", "diffusion", steps=4, compile=True))
    compiled = _losses(compiled_run.fit())
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)
    part = _losses(Trainer(_cfg(tmp_path / "r", "diffusion", steps=4, compile=True)).fit(stop_at=2))
    rest = _losses(Trainer(_cfg(tmp_path / "r", "diffusion", steps=4, compile=True)).fit())
    assert part + rest == pytest.approx(compiled, rel=1e-4, abs=1e-6)


_CRASH_SCRIPT = """
import os, signal, sys, torch
from epg.train import TrainConfig, Trainer
cfg = TrainConfig(**{config})
saves = {{"n": 0}}
real_save = torch.save
def dying_save(obj, f, *a, **k):
    saves["n"] += 1
    if saves["n"] == 2:  # the second checkpoint: write half of it, then die like kill -9
        with open(f, "wb") as fh:
            fh.write(b"partial")
            fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = dying_save
Trainer(cfg).fit()
"""


def test_kill_during_checkpoint_write_leaves_the_previous_one_resumable(tmp_path):
    cfg = _cfg(tmp_path, "diffusion", ckpt_every=2, steps=6)
    options = {k: v for k, v in cfg.to_dict().items()}
    script = _CRASH_SCRIPT.format(config=repr(options))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir())
    assert "step_00000002.pt" in ckpts and "step_00000004.pt" not in ckpts  # only a temp file
    resumed = Trainer(cfg)
    assert resumed.step == 2
    rest = _losses(resumed.fit())
    full = _losses(Trainer(_cfg(tmp_path / "ref", "diffusion", ckpt_every=2, steps=6)).fit())
    assert rest == full[2:]


_DIST_SCRIPT = """
import json, os, sys
import torch.distributed
from epg.checkpoint import torch_save_checksummed
from epg.distributed import end_process
from epg.train import TrainConfig, Trainer, read_checkpoint
cfg = TrainConfig(**json.loads(sys.argv[1]))
stop_at = int(sys.argv[3])
trainer = Trainer(cfg)
losses = [r["loss"] for r in trainer.fit(stop_at=stop_at or None)]
if stop_at:  # resume in a fresh Trainer from the checkpoint written at stop_at
    if trainer.dist.rank == 0:  # as a GPU run writes it: the fused AdamW in its groups
        path = trainer.checkpoints()[-1]
        state = read_checkpoint(path)
        for group in state["optimizer"]["param_groups"]:
            group.update(fused=True, foreach=False)
        torch_save_checksummed(state, path)
    if trainer.dist.distributed:
        torch.distributed.barrier()
    trainer = Trainer(cfg)
    assert [(g["fused"], g["foreach"]) for g in trainer.optimizer.param_groups] == [(False, True)] * 2
    losses += [r["loss"] for r in trainer.fit()]
    trainer.export()
if trainer.dist.rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(losses, f)
trainer.close()
end_process(0)  # as the epg CLI ends a gloo worker
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,parallel,stop_at,accum",
    [("pretrain", "ddp", 0, 1), ("diffusion", "ddp", 0, 1), ("diffusion", "fsdp", 2, 1),
     ("diffusion", "ddp", 0, 2), ("diffusion", "fsdp", 0, 2), ("pretrain", "ddp", 0, 2),
     ("consistency", "ddp", 0, 2), ("pretrain", "fsdp", 2, 1)],
)  # fmt: skip
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, mode, parallel, stop_at, accum):
    # accum: the two processes accumulate their rows in that many micro-batches (DDP reduces
    # once, in the last backward; FSDP every micro-batch); in stage 2 the one process takes its
    # batch whole (consistency: dropout off, and the auxiliary InfoNCE's keys, the whole batch's
    # in every micro-batch, gathered over the ranks). Stage 1's projector BatchNorm takes its
    # statistics over the micro-batch: there both accumulate, and must pick the same ones.
    # stop_at: resumed from there in a fresh Trainer, from a checkpoint that names the fused
    # AdamW (a GPU run's), which must step with this machine's (set_optimizer_state_dict too).
    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT)
    extra = _perceptual_network(tmp_path, mode)
    results = {}
    for nproc in (1, 2):
        cfg = _cfg(tmp_path / f"p{nproc}", mode, steps=3, ckpt_every=0, parallel=parallel,
                   grad_accum=accum if nproc == 2 or mode == "pretrain" else 1, **extra)  # fmt: skip
        if mode == "consistency":
            cfg.model_overrides["drop"] = 0.0
        if mode == "pretrain":
            # AdamW's first step moves each parameter by ±lr, the sign of its gradient, and
            # stage 1 has near-zero gradients whose sign the reduction order's rounding sets.
            cfg.lr = 1e-4
        out = tmp_path / f"losses{nproc}.json"
        port = (29500 + 10 * nproc + {"pretrain": 1, "diffusion": 2, "consistency": 3}[mode]
                + (5 if parallel == "fsdp" else 0) + 100 * (accum - 1))  # fmt: skip
        proc = torchrun(tmp_path, nproc, port, script, json.dumps(cfg.to_dict()), out, stop_at)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads(out.read_text())
    assert len(results[1]) == 3
    assert results[2] == pytest.approx(results[1], rel=1e-4, abs=1e-6)


_ONE_RANK_SIGNALLED_SCRIPT = """
import json, os, signal, sys
from epg.distributed import end_process
from epg.train import Interrupted, TrainConfig, Trainer
trainer = Trainer(TrainConfig(**json.loads(sys.argv[1])))
real_loss, calls = trainer.loss_fn, []
def loss(batch, draws):
    calls.append(1)
    if trainer.dist.rank == 1 and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_loss(batch, draws)
trainer.loss_fn = loss
try:
    trainer.fit()
except Interrupted as stop:
    with open(sys.argv[2] + str(trainer.dist.rank), "w") as f:
        json.dump([trainer.step, int(stop.signum), str(stop)], f)
trainer.close()
end_process(0)
"""


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    # (Kubernetes signals each pod's main process; the flag rides the step's all-reduce)
    script = tmp_path / "run.py"
    script.write_text(_ONE_RANK_SIGNALLED_SCRIPT)
    cfg = _cfg(tmp_path, "diffusion", steps=50, ckpt_every=0)
    proc = torchrun(tmp_path, 2, 29661, script, json.dumps(cfg.to_dict()), tmp_path / "stopped")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stops = [json.loads((tmp_path / f"stopped{rank}").read_text()) for rank in (0, 1)]
    assert [s[:2] for s in stops] == [[3, signal.SIGTERM]] * 2, stops
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")] == ["step_00000003.pt"]


_REDUCTIONS_SCRIPT = """
import json, sys
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from epg.distributed import end_process
from epg.train import TrainConfig, Trainer
counts = {}
for accum in (1, 2):
    options = json.loads(sys.argv[1])
    options.update(grad_accum=accum, run_dir=options["run_dir"] + str(accum))
    trainer = Trainer(TrainConfig(**options))
    calls = []
    def hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)
    trainer.train_model.register_comm_hook(None, hook)
    trainer.fit()
    counts[accum] = len(calls)
# One process group for both Trainers: close() destroys it, and joining torchrun's again can hang.
if trainer.dist.rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(counts, f)
trainer.close()
end_process(0)
"""


@pytest.mark.slow
def test_accumulating_ddp_reduces_the_gradients_once_a_step(tmp_path):
    # Reducing after every micro-batch gives the same gradients (the two-process test cannot
    # tell), at n times the traffic: count DDP's bucket reductions instead.
    script = tmp_path / "run.py"
    script.write_text(_REDUCTIONS_SCRIPT)
    cfg = _cfg(tmp_path / "r", "diffusion", steps=3, ckpt_every=0)
    proc = torchrun(tmp_path, 2, 29631, script, json.dumps(cfg.to_dict()), tmp_path / "counts.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["1"] >= 3 and counts["2"] == counts["1"]


@pytest.mark.slow
def test_two_process_resume_continues_each_ranks_dropout_stream(tmp_path):
    # Consistency tuning with dropout 0.5: each rank draws its own masks, so a resumed run is
    # exact only if every rank gets its own RNG state back (not rank 0's, not a fresh seed).
    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT)
    results = {}
    for stop_at in (0, 2):
        cfg = _cfg(tmp_path / f"s{stop_at}", "consistency", steps=4, ckpt_every=0)
        out = tmp_path / f"losses{stop_at}.json"
        proc = torchrun(tmp_path, 2, 29541 + stop_at, script, json.dumps(cfg.to_dict()), out, stop_at)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[stop_at] = json.loads(out.read_text())
    assert len(results[0]) == 4
    assert results[2] == results[0]  # bit for bit


@pytest.mark.slow
def test_two_processes_resume_past_a_damaged_checkpoint_and_set_it_aside_once(tmp_path):
    # Every rank tries the damaged file; rank 0 alone renames it, after a barrier, so no rank
    # finds it gone half-way and both resume from the same step.
    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT)
    cfg = _cfg(tmp_path, "diffusion", steps=4, ckpt_every=2, keep_checkpoints=3)
    Trainer(cfg).fit()
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    (ckpt_dir / "step_00000004.pt").write_bytes(b"")
    out = tmp_path / "losses.json"
    proc = torchrun(tmp_path, 2, 29549, script, json.dumps(cfg.to_dict()), out, 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(out.read_text())) == 2  # steps 3 and 4, trained again
    assert proc.stderr.count("set step_00000004.pt aside as step_00000004.pt.unreadable") == 1
    assert (ckpt_dir / "step_00000004.pt.unreadable").read_bytes() == b""
    assert read_checkpoint(ckpt_dir / "step_00000004.pt")["step"] == 4


_NON_FINITE_SCRIPT = """
import json, sys
from epg.train import TrainConfig, Trainer
trainer = Trainer(TrainConfig(**json.loads(sys.argv[1])))
real_loss = trainer.loss_fn
def inf_on_rank1_from_step_2(batch, draws):
    loss, terms = real_loss(batch, draws)
    return (loss * float("inf"), terms) if trainer.step >= 2 and trainer.dist.rank == 1 else (loss, terms)
trainer.loss_fn = inf_on_rank1_from_step_2
trainer.fit()
"""


@pytest.mark.slow
def test_two_process_non_finite_stop_saves_the_steps_made(tmp_path):
    # One rank's non-finite loss stops both ranks at the same step, so they can write the
    # checkpoint together before failing (a rank's own error, like a bad image, cannot).
    script = tmp_path / "run.py"
    script.write_text(_NON_FINITE_SCRIPT)
    cfg = _cfg(tmp_path / "run", "diffusion", steps=6, ckpt_every=0, max_bad_steps=2)
    proc = torchrun(tmp_path, 2, 29547, script, json.dumps(cfg.to_dict()))
    assert proc.returncode != 0
    assert "2 non-finite steps in a row, the last at step 2" in proc.stderr
    assert "(step 2) before stopping" in proc.stderr, proc.stderr[-3000:]
    assert Trainer(cfg).step == 2


def test_previews_and_logs_are_written(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "diffusion", steps=2, preview_every=2, log_every=2))
    trainer.fit()
    run = Path(trainer.cfg.run_dir)
    assert (run / "previews" / "step_00000002.png").is_file()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]
    assert {"loss", "diffusion", "lr", "grad_norm", "images_per_s", "skipped"} <= set(records[0])


@pytest.mark.cuda
def test_cuda_bf16_compiled_steps_track_fp32_eager(tmp_path):
    """GPU only: bf16 (and fp16) autocast + torch.compile on CUDA against fp32 eager on the same
    draws."""
    fp32 = _losses(Trainer(_cfg(tmp_path / "f", "diffusion", steps=3, device="cuda", precision="fp32")).fit())
    bf16 = _losses(Trainer(_cfg(tmp_path / "b", "diffusion", steps=3, device="cuda", precision="bf16",
                                compile=True)).fit())  # fmt: skip
    assert all(math.isfinite(v) for v in bf16)
    assert bf16 == pytest.approx(fp32, rel=5e-2)
    # fp16 with loss scaling, from a scale this network's gradients fit (no retry, same draws)
    trainer = Trainer(_cfg(tmp_path / "h", "diffusion", steps=3, device="cuda", precision="fp16", compile=True))
    trainer.loss_scale = 64.0
    assert _losses(trainer.fit()) == pytest.approx(fp32, rel=5e-2)


@pytest.mark.cuda
def test_cuda_compiled_bf16_accumulation_and_checkpointing_track_the_plain_step(tmp_path):
    """GPU only: two micro-batches with activation checkpointing, compiled in bf16 on CUDA,
    against the whole batch without either (bf16 rounding differs with the shapes)."""
    common = dict(steps=3, device="cuda", precision="bf16", compile=True, ckpt_every=0)
    plain = Trainer(_cfg(tmp_path / "p", "diffusion", **common)).fit()
    both = Trainer(_cfg(tmp_path / "b", "diffusion", grad_accum=2, activation_checkpointing=True, **common)).fit()
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in both] == pytest.approx([r[key] for r in plain], rel=2e-2), key


@pytest.mark.cuda
def test_cuda_compiled_consistency_target_shares_dropout_masks(tmp_path):
    """GPU only: with drop=0.5 and r forced equal to t, the compiled consistency term is 0 on CUDA
    only if the target pass replays the online pass's dropout masks."""
    trainer = Trainer(_cfg(tmp_path, "consistency", steps=1, device="cuda", compile=True))
    batch = trainer._batch(0)
    draws = trainer._draws(0)
    draws["r"] = draws["t"].clone()
    _, terms = trainer.loss_fn(batch, draws)
    assert terms["consistency"].item() == 0.0


def test_init_starts_from_a_whole_stage2_network(tmp_path):
    dm = Trainer(_cfg(tmp_path / "dm", "diffusion", steps=1))
    dm.fit()
    exported = dm.export()
    # The config name is recorded: it picks `epg sample`'s default guidance scale.
    assert ckpt.read_config(exported)[1]["model"] == "epg-tiny"
    # A consistency run (decoder dropout 0.5) from the diffusion network, as ECT starts.
    cm = Trainer(_cfg(tmp_path / "cm", "consistency", steps=1, init=str(exported)))
    for a, b in zip(cm.model.state_dict().values(), dm.ema.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(cm.ema.parameters(), cm.model.parameters()):
        assert torch.equal(a, b)
    cm.fit()
    with pytest.raises(ValueError, match="holds EPGConfig"):
        Trainer(_cfg(tmp_path / "x", "diffusion", init=str(exported), model_overrides={**TINY, "depth": 3}))
    with pytest.raises(ValueError, match="init"):
        TrainConfig(mode="pretrain", init=str(exported)).validate()
    # A plain state dict (an official-style .pth) and a training checkpoint (its EMA network)
    # are built as the run's model with its model_overrides: they were built without them, and
    # the error named a network the run does not build.
    pth = tmp_path / "net.pth"
    torch.save(dm.ema.state_dict(), pth)
    for init in (pth, tmp_path / "dm" / "run" / "checkpoints" / "step_00000001.pt"):
        started = Trainer(_cfg(tmp_path / "from", "diffusion", steps=1, init=str(init), resume="restart"))
        for a, b in zip(started.model.state_dict().values(), dm.ema.state_dict().values()):
            assert torch.equal(a, b)


_END_PROCESS_SCRIPT = """
import sys
from epg import distributed
distributed.end_process(5)  # no process group joined yet: returns
info = distributed.setup("cpu")
print(f"rank {info.rank} flushed", end="")  # no newline: only an explicit flush writes it
distributed.end_process(3 + info.rank)
raise SystemExit("end_process returned in a gloo worker")
"""


@pytest.mark.slow
def test_a_gloo_worker_ends_with_its_exit_status_and_flushed_output(tmp_path):
    # end_process skips interpreter finalization (torch's gloo threads can abort it) and must
    # still report the status and lose no output.
    script = tmp_path / "end.py"
    script.write_text(_END_PROCESS_SCRIPT)
    # A single process joins no group: end_process returns and the script goes on.
    alone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 1 and "end_process returned in a gloo worker" in alone.stderr
    proc = torchrun(tmp_path, 2, 29557, script, timeout=120)
    assert proc.returncode != 0 and "end_process returned" not in proc.stderr, proc.stderr[-2000:]
    assert "rank 0 flushed" in proc.stdout and "rank 1 flushed" in proc.stdout
    assert "exitcode  : 3" in proc.stderr or "exitcode  : 4" in proc.stderr, proc.stderr[-2000:]


# --- schedules, loss scale and retries ------------------------------------------------------------


def test_cosine_stays_at_zero_past_steps():
    # A run resumed past its `steps` (or its log) must not see the cosine climb back up, e.g. to
    # 0.5 at 1.5× the span.
    cfg = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(160, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(210, cfg) == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_a_single_step_after_warm_up_ends_at_zero():
    # With exactly one post-warm-up step the cosine goes from 1 to 0 in that step; a wider span
    # would leave 0.5 at `steps`.
    one = TrainConfig(steps=11, warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(10, one) == pytest.approx(1.0)
    assert lr_factor(11, one) == pytest.approx(0.0, abs=1e-12)
    no_warmup = TrainConfig(steps=1, warmup_steps=0, lr_schedule="cosine")
    assert [lr_factor(s, no_warmup) for s in (0, 1)] == pytest.approx([1.0, 0.0], abs=1e-12)


def test_a_run_resumed_with_more_steps_stretches_its_cosine(tmp_path):
    # The schedule follows this run's `steps`, not the checkpoint's: resumed at step 2 of a
    # 4-step run with steps=8, the lr is the 8-step cosine's at 2 (0.854·lr, not 0.5·lr).
    short = _cfg(tmp_path, "diffusion", steps=4, warmup_steps=0, batch_size=4)
    Trainer(short).fit(stop_at=2)
    longer = _cfg(tmp_path, "diffusion", steps=8, warmup_steps=0, batch_size=4)
    resumed = Trainer(longer)
    assert resumed.step == 2
    expected = longer.lr * lr_factor(2, longer)
    assert expected != pytest.approx(short.lr * lr_factor(2, short))
    assert all(g["lr"] == pytest.approx(expected) for g in resumed.optimizer.param_groups)
    records = resumed.fit(stop_at=3)
    assert [r["lr"] for r in records] == pytest.approx([expected])

def test_fp16_loss_scale_keeps_growing_above_2_to_the_16(tmp_path):
    # The GradScaler settings grow the scale by ×1.000693 after every step made, whatever its
    # size. The loss is shrunk by 2^-24 so that the gradients at scale 2^20 stay finite and no
    # step is skipped.
    trainer = Trainer(_cfg(tmp_path, "diffusion", steps=2, ckpt_every=0, precision="fp16"))
    trainer.loss_scale = 2.0**20
    real = trainer.loss_fn
    trainer.loss_fn = lambda b, d: (lambda out: (out[0] * 2.0**-24, out[1]))(real(b, d))
    records = trainer.fit()
    assert [r["skipped"] for r in records] == [0, 0]
    assert trainer.loss_scale == pytest.approx(2.0**20 * 1.000693**2, rel=1e-9)


def test_a_retried_stage1_step_augments_with_fresh_randomness(tmp_path):
    # The module doc promises that a skipped step's retry takes "the next batch with fresh noise";
    # the views' crops and flips are that step's randomness too, so the retry's generator must be
    # seeded anew.
    trainer = Trainer(_cfg(tmp_path, "pretrain", steps=1, ckpt_every=0, max_bad_steps=3))
    seeds = []
    first = trainer.augment[0]

    def recording(image, g):
        seeds.append(g.initial_seed())
        return first(image, g)

    trainer.augment = [recording, trainer.augment[1]]
    real, calls = trainer.loss_fn, []

    def nan_once(batch, draws):
        loss, terms = real(batch, draws)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), terms

    trainer.loss_fn = nan_once
    records = trainer.fit()
    assert [r["skipped"] for r in records] == [1, 1] and trainer.step == 1
    assert len(seeds) == 2 and seeds[0] != seeds[1]


def test_an_fp16_overflow_halves_the_loss_scale_no_lower_than_1(tmp_path):
    # Growth makes the scale no power of two: halving 1.5 would give 0.75, where the documented
    # floor is 1 (from there a skip counts towards max_bad_steps).
    trainer = Trainer(_cfg(tmp_path, "diffusion", steps=1, ckpt_every=0, precision="fp16", max_bad_steps=2))
    trainer.loss_scale = 1.5
    trainer._skip(0, {"loss": 1.0})
    assert trainer.loss_scale == 1.0 and trainer._overflows_in_a_row == 1
