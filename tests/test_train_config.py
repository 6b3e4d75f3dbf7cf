"""The Trainer's config checks: option ranges, nested option types, the run folder, the world
size, and what a resumed run takes from its new config."""

import dataclasses
import shutil

import pytest
import torch

from epg import distributed
from epg.presets import PRESETS
from epg.train import TrainConfig, Trainer, _coerce_nested, lr_factor
from helpers import TINY, tiny_train_config as _cfg

@pytest.mark.parametrize(
    "option, value",
    [("grad_clip", -1.0), ("ema_decay", 1.5), ("ema_decay", -0.1), ("target_ema", 2.0),
     ("weight_decay", -0.01), ("warmup_steps", -1), ("ckpt_every", -1), ("preview_every", -5),
     ("log_every", 0), ("max_bad_steps", 0), ("keep_checkpoints", 0), ("lr", 0.0), ("lr", -1e-4),
     ("lr", float("nan")), ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.9)),
     ("lr_milestones", (500, 400))],
)  # fmt: skip
def test_out_of_range_options_are_refused_naming_the_option_and_value(option, value):
    options = {option: value} | ({"mode": "pretrain"} if option == "target_ema" else {})
    if option == "lr_milestones":
        options.update(lr_schedule="warmup-step", lr_factors=(0.3, 0.08))
    with pytest.raises(ValueError, match=rf"^{option} must be .*got {value!r}".replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**options).validate()


@pytest.mark.parametrize(
    "mode, option, value",
    [("pretrain", "encoder", "s1"), ("pretrain", "perceptual", "s1"), ("pretrain", "perceptual_config", "rcm-b-16"),
     ("pretrain", "preview_every", 100), ("pretrain", "init", "s2"), ("diffusion", "perceptual", "s1"),
     ("diffusion", "perceptual_config", "rcm-b-16"), ("diffusion", "augment", {"flip_p": 0.0}),
     ("consistency", "augment", {"flip_p": 0.0}), ("diffusion", "target_ema", 0.9), ("pretrain", "ema_decay", 0.5)],
)  # fmt: skip
def test_an_option_the_mode_does_not_use_is_refused(mode, option, value):
    # Each was ignored without a word (`epg pretrain --set encoder=...` trained from scratch).
    with pytest.raises(ValueError, match=rf"^{option} is an option of .*a {mode} run does not use it"):
        TrainConfig(mode=mode, **{option: value}).validate()


def test_stage1_needs_two_images_a_batch():
    with pytest.raises(ValueError, match=r"stage 1 needs batch_size / grad_accum >= 2 .*got 1 / 1"):
        TrainConfig(mode="pretrain", batch_size=1).validate()
    with pytest.raises(ValueError, match=r"stage 1 needs batch_size / grad_accum >= 2 .*got 8 / 8"):
        TrainConfig(mode="pretrain", batch_size=8, grad_accum=8).validate()
    with pytest.raises(ValueError, match="grad_accum must be a number"):
        TrainConfig(mode="pretrain", grad_accum="x").validate()
    TrainConfig(mode="diffusion", batch_size=1).validate()


@pytest.mark.parametrize("option, value", [("lr", "x"), ("lr", None), ("log_every", True), ("grad_clip", [1.0])])
def test_a_non_number_given_directly_is_refused_naming_the_option(option, value):
    with pytest.raises(ValueError, match=rf"^{option} must be a number, got"):  # was a TypeError from `<`
        TrainConfig(**{option: value}).validate()


def test_defaults_offs_and_presets_still_validate():
    TrainConfig().validate()
    # 0 means off for these
    TrainConfig(grad_clip=0.0, ckpt_every=0, preview_every=0, warmup_steps=0, weight_decay=0.0,
                ema_decay=0.0, betas=(0.0, 0.0)).validate()  # fmt: skip
    TrainConfig(mode="pretrain", target_ema=1.0).validate()
    TrainConfig(ema_decay=1.0).validate()  # the ranges are closed: 1 keeps the start's weights
    for preset in PRESETS.values():
        TrainConfig.from_dict(preset).validate()


@pytest.mark.parametrize(
    "mode, group, key, value, expected",
    [("pretrain", "objective", "tau_rc", "abc", "a number"),
     ("pretrain", "objective", "s0", "abc", "an integer"),
     ("pretrain", "objective", "s0", 4.5, "an integer"),
     ("diffusion", "model_overrides", "drop", "abc", "a number"),
     ("pretrain", "augment", "flip_p", "abc", "a number"),
     ("pretrain", "augment", "crop_scale", 0.5, "two numbers"),
     ("diffusion", "data_options", "image_size", "abc", "an integer"),
     ("consistency", "objective", "match_dropout", "maybe", "true or false")],
)  # fmt: skip
def test_nested_option_types_are_checked_before_anything_is_built(tmp_path, mode, group, key, value, expected):
    cfg = _cfg(tmp_path, mode)
    cfg = dataclasses.replace(cfg, **{group: {**getattr(cfg, group), key: value}})
    with pytest.raises(ValueError, match=rf"{group}\.{key}: expected {expected}"):
        Trainer(cfg)


def test_a_bad_nested_value_keeps_the_run_resume_restart_would_discard(tmp_path):
    Trainer(_cfg(tmp_path, "pretrain", steps=3)).fit()
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert before
    bad = _cfg(tmp_path, "pretrain", steps=3, resume="restart", objective=dict(s0=4, s1=16, tau_rc="abc"))
    with pytest.raises(ValueError, match=r"objective\.tau_rc: expected a number, got 'abc'"):
        Trainer(bad)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_nested_values_from_set_are_read_as_their_types(tmp_path):
    # --set parses with YAML: "0.5,1.0" stays a string, as a top-level tuple option does
    cfg = _cfg(tmp_path, "pretrain", augment=dict(crop_scale="0.5,1.0", blur_sigma=[0.1, 1]),
               objective=dict(s0="4", s1=16.0, tau_rc="5e-2"), model_overrides={**TINY, "mlp_ratio": 2},
               data_options=dict(image_size="16"))  # fmt: skip
    coerced = _coerce_nested(cfg)
    assert coerced.augment == dict(crop_scale=(0.5, 1.0), blur_sigma=(0.1, 1.0))
    assert coerced.objective == dict(s0=4, s1=16, tau_rc=0.05)
    assert type(coerced.model_overrides["mlp_ratio"]) is float
    assert coerced.data_options == dict(image_size=16)
    trainer = Trainer(cfg)
    assert trainer.cfg.objective["tau_rc"] == 0.05 and trainer.augment[0].config.crop_scale == (0.5, 1.0)
    assert len(trainer.fit(stop_at=1)) == 1


def test_resume_takes_the_new_lr_betas_and_weight_decay(tmp_path):
    Trainer(_cfg(tmp_path, "diffusion")).fit(stop_at=3)
    new = _cfg(tmp_path, "diffusion", lr=2e-3, betas=(0.8, 0.9), weight_decay=0.05)
    resumed = Trainer(new)
    assert resumed.step == 3
    decay, no_decay = resumed.optimizer.param_groups
    lr = 2e-3 * lr_factor(3, new)
    for group in (decay, no_decay):
        assert group["betas"] == (0.8, 0.9) and group["initial_lr"] == 2e-3 and group["lr"] == lr
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    records = resumed.fit(stop_at=5)
    assert records[0]["lr"] == lr  # the first resumed step too
    assert records[1]["lr"] == pytest.approx(2e-3 * lr_factor(4, new))


def test_an_unwritable_run_folder_is_refused_before_training(tmp_path):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"cannot write to the folder {in_the_way}.*File exists"):
        Trainer(_cfg(tmp_path, run_dir=str(in_the_way)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(ValueError, match=rf"cannot write to the folder {run / 'checkpoints'}"):
        Trainer(_cfg(tmp_path))
    (run / "checkpoints").unlink()
    Trainer(_cfg(tmp_path))
    assert [p.name for p in run.iterdir()] == ["checkpoints"]  # the probes are gone
    assert not list((run / "checkpoints").iterdir())


def test_a_batch_size_the_ranks_cannot_share_is_refused(tmp_path, monkeypatch):
    three = distributed.DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(distributed, "setup", lambda device=None: three)
    with pytest.raises(ValueError, match="batch_size 8 is not divisible by the world size 3"):
        Trainer(_cfg(tmp_path))


def test_resume_takes_the_same_encoder_by_any_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, seed in (("r1", 3), ("other", 4)):
        stage1 = Trainer(_cfg(tmp_path / name, "pretrain", steps=2, run_dir=name, seed=seed))
        stage1.fit()
        stage1.export()
    Trainer(_cfg(tmp_path, encoder="./r1")).fit(stop_at=3)
    for same in ("r1", str(tmp_path / "r1"), "r1/final", str(tmp_path / "r1" / "final") + "/"):
        assert Trainer(_cfg(tmp_path, encoder=same)).step == 3, same
    # The same weights elsewhere: a copy, a moved folder, or the same one named from another
    # working folder (the relative path recorded resolves elsewhere there).
    shutil.copytree("r1", "r2")
    capsys.readouterr()
    assert Trainer(_cfg(tmp_path, encoder="r2")).step == 3
    assert "note: encoder r2 holds the weights ./r1 held (same SHA-256)" in capsys.readouterr().err
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert Trainer(_cfg(tmp_path, encoder="../r1")).step == 3
    with pytest.raises(ValueError, match=r"other settings \(encoder: './r1' there, '../other' now"):
        Trainer(_cfg(tmp_path, encoder="../other"))
    assert (tmp_path / "r1" / "final").is_dir()


def test_a_run_resumes_exactly_after_its_encoder_is_gone(tmp_path, monkeypatch, capsys):
    # The checkpoint holds the network: the encoder is read only by a fresh start, which fails
    # without it as before. (It was read first: "does not exist", a run that could not go on.)
    monkeypatch.chdir(tmp_path)
    stage1 = Trainer(_cfg(tmp_path / "r1", "pretrain", steps=2, run_dir="r1"))
    stage1.fit()
    stage1.export()
    full = [r["loss"] for r in Trainer(_cfg(tmp_path / "a", encoder="r1", run_dir="a")).fit()]
    part = [r["loss"] for r in Trainer(_cfg(tmp_path / "b", encoder="r1", run_dir="b")).fit(stop_at=3)]
    Trainer(_cfg(tmp_path / "cm", "consistency", encoder="r1", run_dir="cm")).fit(stop_at=1)
    shutil.move("r1", "r1-elsewhere")
    # The consistency loss's auxiliary InfoNCE still needs it: that is said.
    with pytest.raises(FileNotFoundError, match=r"r1 does not exist: the consistency loss's auxiliary InfoNCE reads"):
        Trainer(_cfg(tmp_path / "cm", "consistency", encoder="r1", run_dir="cm"))
    capsys.readouterr()
    resumed = Trainer(_cfg(tmp_path / "b", encoder="r1", run_dir="b"))
    assert "note: r1 is gone; the run resumes from its checkpoint" in capsys.readouterr().err
    assert resumed.step == 3 and part + [r["loss"] for r in resumed.fit()] == full
    with pytest.raises(FileNotFoundError, match="r1"):
        Trainer(_cfg(tmp_path / "c", encoder="r1", run_dir="c"))


def test_a_resume_drops_the_log_records_of_the_steps_it_trains_again(tmp_path):
    import json

    Trainer(_cfg(tmp_path, "diffusion", steps=4, ckpt_every=2, keep_checkpoints=3)).fit()
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004.pt").unlink()  # as if killed after logging step 4
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by the kill
    resumed = Trainer(_cfg(tmp_path, "diffusion", steps=4, ckpt_every=2))
    assert resumed.step == 2
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # steps 3 and 4 were logged twice


def test_resume_names_its_keywords_for_a_checkpoint_that_is_not_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume takes auto, none, restart or a checkpoint file"):
        Trainer(_cfg(tmp_path, "diffusion", resume="Auto"))


def test_a_resume_value_that_is_no_checkpoint_file_is_refused_before_the_run_folder_is_made(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"resume=.* is a folder; give a checkpoint file \(a run folder's checkpoints/step_N.pt\)"):
        Trainer(_cfg(tmp_path, resume=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"resume checkpoint .*nothing.pt does not exist"):
        Trainer(_cfg(tmp_path, resume=str(tmp_path / "nothing.pt")))
    assert not run.exists()  # an empty checkpoints/ was left behind
    with pytest.raises(ValueError, match="training option resume: expected a string"):
        TrainConfig.from_dict({"resume": True})  # YAML's `resume: yes`


def test_a_diffusion_run_given_init_and_encoder_is_refused():
    # init won and the encoder went unread, without a word
    with pytest.raises(ValueError, match=r"init \(s2\) and encoder \(s1\) both given: a diffusion run starts from init"):
        TrainConfig(mode="diffusion", init="s2", encoder="s1").validate()
    TrainConfig(mode="consistency", init="s2", encoder="s1").validate()  # there the encoder is the loss's network


def test_a_stage1_network_given_as_init_points_to_encoder(tmp_path):
    stage1 = Trainer(_cfg(tmp_path / "s1", "pretrain", steps=2, ckpt_every=0))
    stage1.fit()
    encoder = stage1.export()
    with pytest.raises(Exception, match=rf"holds RCMViT \(a stage-1 encoder: start from it with --encoder {encoder}\)"):
        Trainer(_cfg(tmp_path / "s2", init=str(encoder)))


def test_paths_starting_with_a_tilde_are_the_home_folder(tmp_path, monkeypatch):
    # No shell expands `--set run_dir=~/r`, nor a YAML file's paths: a folder named "~" was made.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(_cfg(tmp_path, run_dir="~/r", steps=1))
    assert trainer.cfg.run_dir == str(tmp_path / "home" / "r") and trainer.run_dir.is_dir()
    assert not (tmp_path / "~").exists()


def test_an_unknown_preset_or_option_suggests_the_closest_name():
    from epg.presets import get_preset

    with pytest.raises(ValueError, match=r"unknown preset 'demo-difusion' \(did you mean 'demo-diffusion'\?\)"):
        get_preset("demo-difusion")
    with pytest.raises(ValueError, match=r"'warmup' \(did you mean 'warmup_steps'\?\), 'zzz'; valid"):
        TrainConfig.from_dict({"zzz": 1, "warmup": 3})


def test_tensor_data_mistakes_are_named(tmp_path):
    images, labels = torch.rand(32, 1, 16, 16) * 2 - 1, torch.randint(0, 10, (32,))
    cases = [
        ({"images": images, "labels": labels}, r"data needs .*'image', 'label' missing from keys \['images', 'labels'\]"),
        ({"image": images}, r"'label' missing"),
        ({"image": images, "label": labels[:, None]}, r"labels must be \(32,\) int64 or int32, got \(32, 1\)"),
        ({"image": (images + 1) * 127.5, "label": labels}, r"reach 25[0-9.]*: pixel values rather than normalised"),
        ({"image": images.to(torch.uint8), "label": labels}, r"must be normalised floats, got torch.uint8"),
    ]  # fmt: skip
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            Trainer(_cfg(tmp_path / "r"), data=data)
    Trainer(_cfg(tmp_path / "s1", "pretrain"), data={"image": images})  # stage 1 needs no labels


def test_export_before_any_step_is_refused(tmp_path):
    # It wrote the random initialisation as final/, which --encoder took without a word.
    trainer = Trainer(_cfg(tmp_path, "pretrain"))
    with pytest.raises(ValueError, match=r"nothing is trained yet \(step 0\)"):
        trainer.export()
    assert not (tmp_path / "run" / "final").exists()


def test_paper_presets_are_the_method_tables_recipes():
    # epg-method.md §5.5 (stage 1), §6.3 (diffusion), §7.4 (consistency): a preset off by a value
    # still validates and trains, just not the paper's run.
    from epg.presets import get_preset

    stage1 = get_preset("pretrain-rcm-l-16")
    assert {k: stage1[k] for k in ("mode", "steps", "batch_size", "lr", "betas", "weight_decay", "no_weight_decay",
                                   "lr_schedule", "warmup_steps", "grad_clip", "target_ema")} == dict(
        mode="pretrain", steps=600_000, batch_size=1024, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.03,
        no_weight_decay=(), lr_schedule="cosine", warmup_steps=10_000, grad_clip=0.0, target_ema=0.99)  # fmt: skip
    assert stage1["objective"] == dict(s0=20, s1=1280, tau_con=0.2, tau_rc=0.1)
    for name in ("pretrain-rcm-b-16", "pretrain-rcm-l-16", "pretrain-rcm-l-32", "diffusion-epg-xl-16",
                 "diffusion-epg-xxl-16", "diffusion-epg-g-16", "diffusion-epg-l-32", "consistency-epg-l-16"):  # fmt: skip
        assert get_preset(name)["model"] == name.split("-", 1)[1] and get_preset(name)["data"] == "folder", name
    diffusion = get_preset("diffusion-epg-xxl-16")
    assert {k: diffusion[k] for k in ("steps", "batch_size", "lr", "betas", "weight_decay", "lr_schedule",
                                      "warmup_steps", "grad_clip", "clip_after_warmup", "ema_decay")} == dict(
        steps=1_000_000, batch_size=1024, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, lr_schedule="cosine",
        warmup_steps=10_000, grad_clip=0.5, clip_after_warmup=True, ema_decay=0.9999)  # fmt: skip
    assert diffusion["objective"] == dict(label_dropout=0.1)
    assert TrainConfig.from_dict(diffusion).no_weight_decay == ("pos_embed", "cls_token")
    assert get_preset("diffusion-epg-g-16")["steps"] == 2_000_000  # 1600 epochs at 1024
    cm = get_preset("consistency-epg-l-16")
    assert {k: cm[k] for k in ("steps", "batch_size", "lr", "betas", "weight_decay", "lr_schedule", "warmup_steps",
                               "lr_milestones", "lr_factors", "grad_clip", "ema_decay")} == dict(
        steps=700_000, batch_size=1024, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.03, lr_schedule="warmup-step",
        warmup_steps=10_000, lr_milestones=(400_000, 500_000), lr_factors=(0.3, 0.08), grad_clip=0.0,
        ema_decay=0.9999)  # fmt: skip
    assert cm["model_overrides"] == dict(drop=0.5) and cm["objective"] == dict(stage_length=100_000, c=0.06)


def test_get_preset_hands_out_a_copy():
    # `--set objective.x=...` writes into the returned dicts: it must not change the preset for
    # the next run in the same process (the demo runs three).
    from epg.presets import get_preset

    preset = get_preset("demo-consistency")
    preset["objective"]["stage_length"] = 1
    preset["steps"] = 1
    assert PRESETS["demo-consistency"]["objective"]["stage_length"] == 375
    assert get_preset("demo-consistency")["steps"] == 1500


def test_lr_factor_warms_up_linearly_then_follows_its_schedule():
    cosine = TrainConfig(steps=110, warmup_steps=10)
    assert [lr_factor(s, cosine) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # step 0 trains at lr/10, not 0
    assert lr_factor(10, cosine) == 1.0
    assert lr_factor(60, cosine) == pytest.approx(0.5)
    assert lr_factor(110, cosine) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(160, cosine) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0, no rise again
    step = TrainConfig(mode="consistency", lr_schedule="warmup-step", warmup_steps=10, lr_milestones=(400, 500),
                       lr_factors=(0.3, 0.08))  # fmt: skip
    assert [lr_factor(s, step) for s in (10, 399, 400, 499, 500, 10_000)] == [1.0, 1.0, 0.3, 0.3, 0.08, 0.08]
    assert lr_factor(50, TrainConfig(lr_schedule="constant")) == 1.0


@pytest.mark.parametrize(
    "options, message",
    [({"steps": 0}, "steps and batch_size must be positive"), ({"batch_size": 0}, "steps and batch_size"),
     ({"seed": -1}, "seed must be a non-negative int"), ({"seed": True}, "seed must be"),
     ({"parallel": "zero"}, "parallel must be ddp or fsdp"), ({"lr_schedule": "linear"}, "lr_schedule must be"),
     ({"lr_milestones": (400,)}, "lr_milestones and lr_factors must have the same length"),
     ({"precision": "fp8"}, "precision must be"), ({"mode": "train"}, "mode must be one of"),
     ({"mode": "consistency", "objective": {"aux_weight": 0}, "perceptual": "s1"},
      "perceptual names the auxiliary InfoNCE's network, which objective.aux_weight=0 turns off")],
)  # fmt: skip
def test_bad_top_level_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options).validate()


def test_from_dict_reads_each_option_as_its_type():
    cfg = TrainConfig.from_dict({"compile": "off", "progress": "on", "steps": "2e3", "betas": "0.8, 0.95",
                                 "lr_milestones": "400,500", "encoder": None, "lr_factors": 0.5})  # fmt: skip
    assert (cfg.compile, cfg.progress, cfg.steps, cfg.betas) == (False, True, 2000, (0.8, 0.95))
    assert (cfg.lr_milestones, cfg.encoder, cfg.lr_factors) == ((400, 500), None, (0.5,))
    assert all(type(m) is int for m in cfg.lr_milestones)  # compared with the int step, saved as JSON
    for options, expected in [({"steps": 2.5}, "an integer"), ({"betas": "0.9"}, "two numbers"),
                              ({"compile": "maybe"}, "true or false"), ({"steps": None}, "int"),
                              ({"objective": [1]}, "a mapping"), ({"lr": "fast"}, "a number"),
                              ({"model": ["epg-l-16"]}, "a string"), ({"data": None}, "str")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"training option {next(iter(options))}: expected {expected}"):
            TrainConfig.from_dict(options)


def test_defaults_are_the_diffusion_recipes_optimiser_and_keep_runs_safe():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.no_weight_decay, cfg.ema_decay, cfg.target_ema) == (
        1e-4, (0.9, 0.999), 0.01, ("pos_embed", "cls_token"), 0.9999, 0.99)  # fmt: skip
    assert (cfg.keep_checkpoints, cfg.max_bad_steps, cfg.resume, cfg.grad_accum, cfg.seed) == (2, 5, "auto", 1, 0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_home_expansion_covers_every_path_option(monkeypatch):
    from epg.train import _home_expanded_paths

    monkeypatch.setenv("HOME", "/h")
    cfg = TrainConfig(run_dir="~/r", resume="~/c.pt", encoder="~/e", init="rel", data_options={"path": "~/d", "x": 1})
    assert _home_expanded_paths(cfg) == {"run_dir": "/h/r", "resume": "/h/c.pt", "encoder": "/h/e",
                                         "data_options": {"path": "/h/d", "x": 1}}  # fmt: skip


def test_a_network_path_given_only_on_one_side_is_a_different_run(tmp_path, monkeypatch):
    from epg.train import _same_identity

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r1").mkdir()
    assert _same_identity("encoder", "r1", "./r1") and _same_identity("init", str(tmp_path / "r1"), "r1/")
    assert not _same_identity("encoder", "r1", None) and not _same_identity("encoder", None, "r1")
    assert not _same_identity("encoder", "r1", "r2")
    assert _same_identity("objective", {"a": 1, "b": 2}, {"b": 2, "a": 1}) and not _same_identity("lr", 1e-4, 2e-4)


def test_set_option_under_a_value_that_is_not_a_mapping_is_named():
    # `--set lr.x=1` met a float: a TypeError about item assignment that named no option
    from epg.presets import set_option

    options = {"lr": 1e-4, "objective": {"c": 0.06}}
    set_option(options, "objective.aux_weight", 0.0)
    set_option(options, "augment.crop_scale", (0.4, 1.0))
    assert options == {"lr": 1e-4, "objective": {"c": 0.06, "aux_weight": 0.0}, "augment": {"crop_scale": (0.4, 1.0)}}
    with pytest.raises(ValueError, match=r"cannot set lr\.x: lr is not a mapping"):
        set_option(options, "lr.x", 1)


def test_an_option_the_trainer_passes_itself_is_refused_in_the_objective_group(tmp_path):
    # objective.img_size is the Trainer's to pass (from the model): given too, it reached the
    # constructor as a "got multiple values" TypeError
    with pytest.raises(ValueError, match=r"unknown objective \(diffusion\) option\(s\) 'img_size'; valid: \[.*'label_dropout'"):
        Trainer(_cfg(tmp_path, objective={"img_size": 16}))
