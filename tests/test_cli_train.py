"""The training commands of the CLI: presets, config files, --set, and the demo pipeline."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from epg.cli import STAGE1_ONLY_OPTIONS, STAGE2_ONLY_OPTIONS, TRAIN_OPTION_GROUPS, _parse_sets, main
from epg.presets import PRESETS, get_preset, read_config_file, set_option
from epg.train import UNUSED_OPTIONS, Interrupted, TrainConfig

TINY_SETS = [
    "--set", "steps=2", "--set", "batch_size=8", "--set", "compile=false",
    "--set", "progress=false", "--set", "model_overrides={img_size: 16, patch_size: 4, in_channels: 1}",
]  # fmt: skip


def test_presets_are_valid_train_configs():
    for name in PRESETS:
        TrainConfig.from_dict(get_preset(name)).validate()
    xl = get_preset("diffusion-epg-xl-16")
    assert (xl["lr"], xl["grad_clip"], xl["ema_decay"], xl["objective"]["label_dropout"]) == (1e-4, 0.5, 0.9999, 0.1)


@pytest.mark.parametrize("columns", ["60", "100", "200"])
def test_training_help_names_every_option_of_its_stage_and_its_presets(capsys, monkeypatch, columns):
    listed = [key for _, keys in TRAIN_OPTION_GROUPS for key in keys]
    assert sorted(key.removesuffix(".*") for key in listed) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    # the options one stage's help leaves out are those its modes refuse
    stage1_only, stage2_only = ({key.removesuffix(".*") for key in keys} for keys in (STAGE1_ONLY_OPTIONS, STAGE2_ONLY_OPTIONS))  # fmt: skip
    assert stage2_only == set(UNUSED_OPTIONS["pretrain"])
    assert stage1_only == set(UNUSED_OPTIONS["diffusion"]) & set(UNUSED_OPTIONS["consistency"])
    monkeypatch.setenv("COLUMNS", columns)  # argparse wraps to it: no name may be split
    for command, stage1 in (["pretrain"], True), (["finetune", "--objective", "diffusion"], False):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        words = {word.rstrip(".") for word in capsys.readouterr().out.replace(",", " ").replace(";", " ").split()}
        other_stage = STAGE2_ONLY_OPTIONS if stage1 else STAGE1_ONLY_OPTIONS
        assert {key for key in listed if key not in other_stage} <= words
        assert not words & set(other_stage)
        for name, preset in PRESETS.items():
            assert (name in words) == ((preset["mode"] == "pretrain") == stage1), name


def test_set_option_reaches_nested_keys():
    options = {"objective": {"c": 0.06}}
    set_option(options, "objective.tau_aux", 0.2)
    set_option(options, "model_overrides.drop", 0.5)
    assert options == {"objective": {"c": 0.06, "tau_aux": 0.2}, "model_overrides": {"drop": 0.5}}


def test_pretrain_then_finetune_from_the_command_line(tmp_path, capsys):
    stage1 = tmp_path / "s1"
    assert main(["pretrain", "--run-dir", str(stage1), "--set", "model=rcm-tiny",
                 "--set", "augment.flip_p=0", "--set", "objective.s0=4", "--set", "objective.s1=16",
                 *TINY_SETS]) == 0  # fmt: skip
    assert (stage1 / "final" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (stage1 / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and {"contrastive", "consistency", "lr", "grad_norm"} <= set(records[-1])

    stage2 = tmp_path / "s2"
    config = tmp_path / "run.yaml"
    config.write_text("model: epg-tiny\nlr: 0.0005\nobjective:\n  label_dropout: 0.2\n")
    assert main(["finetune", "--objective", "diffusion", "--encoder", str(stage1 / "final"),
                 "--config", str(config), "--run-dir", str(stage2), *TINY_SETS]) == 0  # fmt: skip
    saved = json.loads((stage2 / "train_config.json").read_text())
    assert saved["lr"] == 0.0005 and saved["objective"] == {"label_dropout": 0.2}
    assert saved["encoder"] == str(stage1 / "final")
    assert "network saved to" in capsys.readouterr().out


def test_bad_command_line_input_is_reported(tmp_path, capsys, monkeypatch):
    assert main(["pretrain", "--set", "steps"]) == 2
    assert "--set expects key=value" in capsys.readouterr().err
    # Bad files and options: one line on stderr and exit status 2, no traceback...
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "epg pretrain: error:" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "pretrain-rcm-xs"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    # ...unless asked for one.
    monkeypatch.setenv("EPG_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown preset"):
        main(["pretrain", "--preset", "pretrain-rcm-xs"])


def test_option_values_are_read_as_their_types(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nsteps: 2e3\nbetas: 0.9,0.95\nobjective:\n  tau_rc: 1e-1\n")
    options = read_config_file(str(config))
    for key, value in _parse_sets(["no_weight_decay=pos_embed", "compile=false", "warmup_steps=1e2"]):
        set_option(options, key, value)
    cfg = TrainConfig.from_dict(options)
    assert (cfg.lr, cfg.steps, cfg.betas, cfg.warmup_steps) == (1e-4, 2000, (0.9, 0.95), 100)
    assert cfg.objective == {"tau_rc": 0.1} and cfg.no_weight_decay == ("pos_embed",)
    assert cfg.compile is False


@pytest.mark.parametrize("pair, message", [
    ("betas=0.9", "betas: expected two numbers"),
    ("steps=1.5", "steps: expected an integer"),
    ("lr=fast", "lr: expected a number"),
    ("objective=3", "objective: expected a mapping"),
    ("objective.bogus=1", "unknown objective (pretrain) option(s) 'bogus'; valid: ["),
    ("augment.bogus=1", "unknown augment option(s) 'bogus'; valid: ["),
    ("data_options.bogus=1", "unknown data_options (digits) option(s) 'bogus'; valid: ["),
    ("batchsize=8", "unknown training option(s) 'batchsize' (did you mean 'batch_size'?); valid: ["),
    ("objective.tau_rcm=0.1", "unknown objective (pretrain) option(s) 'tau_rcm' (did you mean 'tau_rc'?)"),
    ("resume=yes", "training option resume: expected a string (YAML reads yes/no/on/off/true/false as booleans"),
    ("device=gpu", "unknown device 'gpu'"),
])  # fmt: skip
def test_bad_option_values_name_the_option(tmp_path, capsys, pair, message):
    assert main(["pretrain", "--run-dir", str(tmp_path / "r"), *TINY_SETS, "--set", pair]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_paper_presets_ask_for_the_image_folder(tmp_path, capsys):
    assert main(["pretrain", "--preset", "pretrain-rcm-b-16", "--run-dir", str(tmp_path / "r")]) == 2
    assert "data_options.path=DIR" in capsys.readouterr().err


def test_encoder_must_be_a_stage1_network_and_may_be_its_run_folder(tmp_path, capsys):
    stage1 = tmp_path / "s1"
    assert main(["pretrain", "--run-dir", str(stage1), "--set", "model=rcm-tiny", *TINY_SETS]) == 0
    stage2 = tmp_path / "s2"  # the run folder itself stands for its final/
    assert main(["finetune", "--objective", "diffusion", "--encoder", str(stage1), "--set", "model=epg-tiny",
                 "--run-dir", str(stage2), *TINY_SETS]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["finetune", "--objective", "diffusion", "--encoder", str(stage2), "--set", "model=epg-tiny",
                 "--run-dir", str(tmp_path / "s3"), *TINY_SETS]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "not a stage-1 encoder" in err and f"--set init={stage2 / 'final'}" in err


def test_a_bad_image_and_ctrl_c_end_the_command_with_a_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    from epg.data.folder import BadImageError
    from epg.train import NonFiniteStop, Trainer

    def corrupt(self, stop_at=None):
        raise BadImageError("cannot decode data/n01/x.png: truncated", "data/n01/x.png")

    monkeypatch.setattr(Trainer, "fit", corrupt)
    assert main(["pretrain", "--run-dir", str(tmp_path / "a"), *TINY_SETS]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "epg pretrain: error: cannot decode data/n01/x.png: truncated"

    def diverged(self, stop_at=None):  # a traceback before
        raise NonFiniteStop("stopping: 5 non-finite steps in a row, the last at step 0 (loss=nan)")

    monkeypatch.setattr(Trainer, "fit", diverged)
    assert main(["pretrain", "--run-dir", str(tmp_path / "a"), *TINY_SETS]) == 2
    assert capsys.readouterr().err.strip().startswith("epg pretrain: error: stopping: 5 non-finite steps")

    def interrupted(self, stop_at=None):
        raise KeyboardInterrupt("interrupted at step 3; checkpoint saved in runs/x/checkpoints")

    monkeypatch.setattr(Trainer, "fit", interrupted)
    assert main(["pretrain", "--run-dir", str(tmp_path / "b"), *TINY_SETS]) == 130
    assert "interrupted at step 3; checkpoint saved" in capsys.readouterr().err

    def terminated(self, stop_at=None):
        raise Interrupted("terminated (SIGTERM) at step 3; checkpoint saved in runs/x/checkpoints", signal.SIGTERM)

    monkeypatch.setattr(Trainer, "fit", terminated)
    assert main(["pretrain", "--run-dir", str(tmp_path / "b"), *TINY_SETS]) == 143  # 128 + 15, as a shell reports it
    assert "terminated (SIGTERM) at step 3; checkpoint saved" in capsys.readouterr().err


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo += children.get(tree[-1], [])
    return tree


@pytest.mark.slow
@pytest.mark.parametrize("how", ["one-process", "torchrun", "every-process"])
def test_sigterm_ends_a_training_command_with_a_checkpoint_it_resumes_from(tmp_path, how):
    # SIGTERM is how Slurm (time limit, preemption), Kubernetes, docker and systemd stop a job.
    # "torchrun": sent to torchrun, which passes it on to its workers. "every-process": sent to
    # every process of the job, as Slurm and systemd do: the data loader's worker processes
    # too, and torchrun's workers twice (directly and from torchrun).
    run = tmp_path / "run"
    options = ["--run-dir", str(run), *TINY_SETS, "--set", "model=epg-tiny", "--set", "ckpt_every=0",
               "--set", "log_every=1"]  # fmt: skip
    if how == "every-process":
        for c in range(3):
            (tmp_path / "tree" / f"n{c}").mkdir(parents=True)
            for k in range(4):
                Image.new("RGB", (16, 16), (60 * c, 20 * k, 90)).save(tmp_path / "tree" / f"n{c}" / f"{k}.png")
        options += ["--set", "model_overrides={img_size: 16, patch_size: 4, num_classes: 3}", "--set", "data=folder",
                    "--set", f"data_options={{path: {tmp_path / 'tree'}, loader: portable, workers: 1}}"]  # fmt: skip
    epg = ["-m", "epg.cli", "finetune", "--objective", "diffusion", *options]
    if how != "one-process":
        epg = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641", *epg]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, *epg, "--set", "steps=100000"], env=env, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not get to step 3"
        time.sleep(0.2)
    targets = _process_tree(proc.pid) if how == "every-process" else [proc.pid]
    assert len(targets) >= (5 if how == "every-process" else 1)  # torchrun, 2 ranks, their loader workers
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if how == "one-process":
        assert proc.returncode == 143, err[-2000:]
    saved = [p.name for p in (run / "checkpoints").glob("step_*.pt")]
    assert len(saved) == 1, err[-2000:]
    step = int(saved[0][5:13])
    assert step >= 3 and f"terminated (SIGTERM) at step {step}; checkpoint saved" in err
    assert "DataLoader worker" not in err and "stopped at once" not in err
    # the same command goes on from there
    finish = subprocess.run([sys.executable, *epg, "--set", f"steps={step + 2}"], env=env, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps[-2:] == [step + 1, step + 2]


def test_demo_quick_runs_the_whole_pipeline(tmp_path, capsys, monkeypatch):
    # The judge learns from the training split, and the samples are measured against the
    # held-out test split, next to training digits (disjoint from it) as the reference.
    import torch

    import epg.demo
    from epg.data import load_digits_tensors

    seen = {}
    real_fit, real_report = epg.demo.DigitsJudge.fit, epg.demo.digits_report

    def fit(judge, x, y, **kwargs):
        seen["fit"] = x
        return real_fit(judge, x, y, **kwargs)

    def report(samples, labels, judge, real_test, real_reference, seed):
        seen["test"], seen["reference"] = real_test[0], real_reference
        seen["report"] = real_report(samples, labels, judge, real_test, real_reference=real_reference, seed=seed)
        return seen["report"]

    monkeypatch.setattr(epg.demo.DigitsJudge, "fit", fit)
    monkeypatch.setattr(epg.demo, "digits_report", report)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["frechet_distance"] > 0 and metrics["reference_frechet_distance"] > 0
    for key in ("accuracy", "frechet_distance", "reference_frechet_distance"):
        assert metrics[key] == pytest.approx(seen["report"][key], rel=1e-12), key
    train, test = load_digits_tensors("train", 16, 1)[0], load_digits_tensors("test", 16, 1)[0]
    assert torch.equal(seen["fit"], train) and torch.equal(seen["reference"], train)
    assert torch.equal(seen["test"], test)
    assert (out / "samples.png").is_file() and (out / "stage2" / "final" / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "samples.png" in printed and "metrics.json" in printed


def test_demo_quick_consistency_runs_the_one_step_pipeline(tmp_path):
    out = tmp_path / "demo-cm"
    assert main(["demo", "--objective", "consistency", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "consistency" and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["frechet_distance"] > 0
    stage2 = json.loads((out / "stage2" / "train_config.json").read_text())
    assert stage2["mode"] == "consistency" and stage2["ema_decay"] == 0.98
    assert stage2["objective"] == {"stage_length": 10, "P_mean": 1.0, "aux_weight": 0.0}  # 40 quick steps in 4 ECT stages
    assert (out / "samples.png").is_file()


@pytest.mark.parametrize("stage", [1, 2])
def test_a_signal_during_the_demo_says_a_rerun_starts_afresh(tmp_path, capsys, monkeypatch, stage):
    # A training run's stop message advises resume=auto, an option the demo does not take.
    import epg.demo

    class SignalledTrainer(epg.demo.Trainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            real_loss, calls = self.loss_fn, []

            def loss(batch, draws):
                calls.append(1)
                if len(calls) == 3 and (self.cfg.mode == "pretrain") == (stage == 1):
                    os.kill(os.getpid(), signal.SIGTERM)
                return real_loss(batch, draws)

            self.loss_fn = loss

    monkeypatch.setattr(epg.demo, "Trainer", SignalledTrainer)
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"epg demo: terminated (SIGTERM) in stage {stage} at step 3; epg demo starts afresh when run again" in err
    assert "resume=" not in err
    assert not (tmp_path / "demo" / "metrics.json").exists()


def test_demo_presets_rerun_the_demo_stages_from_the_command_line(tmp_path):
    from pathlib import Path

    from epg.demo import DemoConfig, _stage1_config, _stage2_config

    def same_as_preset(options: dict, name: str, but: set[str]) -> None:
        preset = json.loads(json.dumps(get_preset(name)))  # tuples as the JSON file's lists
        differs = {k for k in preset if json.loads(json.dumps(options[k])) != preset[k]}
        assert differs == but, (name, differs)

    quick = ["--set", "steps=2", "--set", "progress=false", "--set", "batch_size=8"]
    stage1 = tmp_path / "s1"
    assert main(["pretrain", "--preset", "demo-pretrain", "--run-dir", str(stage1), *quick]) == 0
    same_as_preset(json.loads((stage1 / "train_config.json").read_text()), "demo-pretrain", {"steps", "batch_size"})
    for objective in ("diffusion", "consistency"):
        run = tmp_path / objective
        assert main(["finetune", "--objective", objective, "--preset", f"demo-{objective}",
                     "--encoder", str(stage1), "--run-dir", str(run), *quick]) == 0  # fmt: skip
        same_as_preset(json.loads((run / "train_config.json").read_text()), f"demo-{objective}", {"steps", "batch_size"})
    # epg demo trains with exactly these recipes.
    same_as_preset(dataclasses.asdict(_stage1_config(DemoConfig(), Path("r"))), "demo-pretrain", set())
    for objective in ("diffusion", "consistency"):
        cfg = DemoConfig(objective=objective)
        cfg.validate()
        same_as_preset(dataclasses.asdict(_stage2_config(cfg, Path("r"), Path("e"))), f"demo-{objective}", set())
