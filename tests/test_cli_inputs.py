"""Bad input to the CLI is refused before any work, with a message and exit status 2."""

from pathlib import Path

import pytest
import torch

from epg import checkpoint as ckpt
from epg.cli import main
from epg.evaluation.digits import DigitsJudge
from epg.models import build
from epg.sampling import class_labels


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    ckpt.save(build("epg-tiny").eval(), folder, metadata={"mode": "diffusion"})
    return folder


def _sample(ckpt_dir, out, *extra):
    return main(["sample", str(ckpt_dir), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--num-images", "2", "--steps", "2", *extra])  # fmt: skip


@pytest.mark.parametrize(
    "var, value, message",
    [
        ("EPG_BACKEND", "bogus", "EPG_BACKEND='bogus': expected auto or one of reference"),
        ("EPG_BACKEND_NOTANOP", "triton", "EPG_BACKEND_NOTANOP: epg has no op 'notanop'"),
    ],
)
def test_a_bad_backend_variable_stops_a_command_before_it_touches_anything(
    tiny_ckpt, tmp_path, monkeypatch, capsys, var, value, message
):
    out = tmp_path / "s"
    assert _sample(tiny_ckpt, out) == 0
    before = sorted(p.name for p in (out / "images").iterdir())
    monkeypatch.setenv(var, value)
    # --overwrite used to discard the finished images first and fail at the first op.
    assert _sample(tiny_ckpt, out, "--overwrite") == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in (out / "images").iterdir()) == before
    assert main(["info"]) == 0  # info runs, and names the problem
    assert f"PROBLEM (every other command refuses to start): {message}" in capsys.readouterr().out


def test_an_os_error_on_an_output_path_is_a_message_not_a_traceback(tiny_ckpt, tmp_path, capsys):
    assert _sample(tiny_ckpt, tmp_path / ("x" * 300)) == 2
    assert "File name too long" in capsys.readouterr().err


def test_evaluate_checks_its_output_path_before_the_inception_pass(tmp_path, capsys):
    samples = tmp_path / "samples.npz"
    samples.write_bytes(b"never read: the output check comes first")
    (tmp_path / "out").mkdir()
    assert main(["evaluate", str(samples), "--ref", str(tmp_path / "r.npz"), "--json", str(tmp_path / "out")]) == 2
    assert "is a folder; the output needs a file name" in capsys.readouterr().err
    assert main(["evaluate", str(samples), "--save-ref", str(samples)]) == 2
    assert "is an input of this evaluation" in capsys.readouterr().err
    ref = tmp_path / "r.npz"
    assert main(["evaluate", str(samples), "--ref", str(ref), "--json", str(ref)]) == 2
    assert "is an input of this evaluation" in capsys.readouterr().err
    assert samples.read_bytes().startswith(b"never read")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--set", "mode=diffusion"], "--set mode=diffusion contradicts epg pretrain (pretrain)"),
        (["finetune", "--objective", "diffusion", "--set", "mode=consistency"],
         "contradicts epg finetune --objective diffusion"),
        (["pretrain", "--run-dir", "a", "--set", "run_dir=b"], "--set run_dir=b contradicts --run-dir (a)"),
        (["finetune", "--objective", "consistency", "--preset", "diffusion-epg-xl-16"],
         "preset diffusion-epg-xl-16 is a diffusion recipe, not consistency"),
    ],
)
def test_training_options_that_contradict_the_command_are_refused(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_a_config_file_of_another_mode_is_refused_as_a_preset_is(tmp_path, monkeypatch, capsys):
    # Its other options (weighting, P_mean, ...) belong to its own mode's objective.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("mode: diffusion\nsteps: 5\n")
    assert main(["finetune", "--objective", "consistency", "--encoder", "e", "--config", "run.yaml"]) == 2
    assert "run.yaml is a diffusion config, not consistency" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing trained, nothing written
    cfg = _train_config_of(monkeypatch, ["finetune", "--objective", "diffusion", "--encoder", "e",
                                         "--config", "run.yaml"])  # fmt: skip
    assert (cfg.mode, cfg.steps) == ("diffusion", 5)


def test_demo_refuses_a_bad_seed_or_output_before_making_anything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--seed", "-1", "--out", str(out), "--quick"]) == 2
    assert "seed must be a non-negative int" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "afile"), "--quick"]) == 2
    assert "is a file; the demo's output needs a folder" in capsys.readouterr().err


def test_seeds_past_64_bits_draw_labels_and_fit_the_judge():
    # Both seeded torch generators directly: "Overflow when unpacking long long".
    big = 2**70 + 1
    labels = class_labels(20, 10, balanced=False, seed=big)
    assert torch.equal(labels, class_labels(20, 10, balanced=False, seed=big % 2**64))
    x = torch.rand(40, 1, 8, 8) * 2 - 1
    y = torch.arange(40) % 10
    DigitsJudge(8, 1, 10).fit(x, y, epochs=1, seed=big)


def test_sample_refuses_a_config_it_would_ignore(tiny_ckpt, tmp_path, capsys):
    assert _sample(tiny_ckpt, tmp_path / "s", "--config", "epg-xl-16") == 2
    assert "--config epg-xl-16 goes with --official" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sample_checks_its_settings_before_announcing_them(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(tiny_ckpt), "--out", str(out), "--device", "cpu", "--num-images", "0"]) == 2
    printed = capsys.readouterr()
    assert "num_images" in printed.err and "epg sample: 0 images" not in printed.out  # the banner came first
    assert not out.exists()


def test_prepare_refuses_a_quality_png_would_ignore(tmp_path, capsys):
    (tmp_path / "src" / "a").mkdir(parents=True)
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "dst"), "--quality", "50"]) == 2
    assert "--quality is for --format jpeg" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_prepare_refuses_negative_workers(tmp_path, capsys):
    (tmp_path / "src" / "a").mkdir(parents=True)
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "dst"), "--workers", "-3"]) == 2
    assert "workers must be >= 0" in capsys.readouterr().err


def test_config_files_say_what_is_wrong_with_them(tmp_path):
    from epg.presets import read_config_file

    (tmp_path / "run.YAML").write_text("lr: 1e-4\n")
    assert read_config_file(str(tmp_path / "run.YAML")) == {"lr": 1e-4}  # it was parsed as JSON
    (tmp_path / "run.txt").write_text("lr: 1e-4\n")
    with pytest.raises(ValueError, match=r"run.txt: name it .yaml, .yml or .json"):
        read_config_file(str(tmp_path / "run.txt"))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_config_file(str(tmp_path))  # it said "does not exist"
    (tmp_path / "bad.yaml").write_bytes(b"lr: \xff\n")
    with pytest.raises(ValueError, match=r"cannot parse .*bad.yaml"):
        read_config_file(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("command", ["info", "pretrain", "finetune", "export", "prepare", "sample", "evaluate", "demo"])
def test_a_forced_backend_that_cannot_run_is_bad_input_for_every_command(monkeypatch, capsys, command):
    from epg import cli
    from epg._backend import BackendUnavailableError

    def unavailable(args):  # what a forced flash_attn says at the first attention on a CPU
        raise BackendUnavailableError("backend 'flash_attn' was forced for 'attention' but: no GPU")

    monkeypatch.setattr(cli, f"_cmd_{command}", unavailable)
    argv = {"finetune": ["--objective", "diffusion"], "export": ["ckpt"], "prepare": ["src", "dst"],
            "sample": ["ckpt", "--out", "o"], "evaluate": ["s.npz"]}.get(command, [])  # fmt: skip
    assert main([command, *argv]) == 2
    assert capsys.readouterr().err == (f"epg {command}: error: backend 'flash_attn' was forced for "
                                       "'attention' but: no GPU\n")  # fmt: skip


@pytest.mark.parametrize("value, traceback", [("", False), ("0", False), ("false", False), ("No", False),
                                              ("OFF", False), ("1", True), ("yes", True)])  # fmt: skip
def test_epg_traceback_is_off_for_0_false_no_off_and_empty(tmp_path, monkeypatch, value, traceback):
    monkeypatch.setenv("EPG_TRACEBACK", value)
    argv = ["prepare", str(tmp_path / "src"), str(tmp_path / "dst"), "--quality", "50"]
    if traceback:
        with pytest.raises(ValueError, match="--quality is for --format jpeg"):
            main(argv)
    else:
        assert main(argv) == 2


def test_evaluate_checks_every_output_path_before_the_inception_pass(tmp_path, capsys):
    samples = tmp_path / "samples.npz"
    samples.write_bytes(b"never read: the output checks come first")
    ref = tmp_path / "r.npz"
    afile = tmp_path / "g.pth"
    afile.write_text("x")
    for argv, message in [
        (["--save-ref", str(afile / "r.npz")], f"{afile} is a file, not a folder"),
        (["--ref", str(ref), "--json", str(afile / "sub" / "x.json")], f"{afile} is a file, not a folder"),
        (["--save-ref", str(tmp_path / "stats.npz"), "--json", str(tmp_path / "m.json")],
         "--save-ref computes none"),
    ]:  # fmt: skip
        assert main(["evaluate", str(samples), *argv]) == 2
        assert message in capsys.readouterr().err, argv
    if Path("/proc/self").is_dir():  # a folder no file can be created in, even by root
        assert main(["evaluate", str(samples), "--ref", str(ref), "--json", "/proc/x.json"]) == 2
        assert ("/proc/x.json cannot be written: creating a file in /proc fails"
                in capsys.readouterr().err)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pth", "samples.npz"]


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "batch_size must be a positive int, got 0"),
    (["--seed", "-1"], "seed must be a non-negative int, got -1"),
    (["--cuda-graph"], "CUDA graphs need a network on a CUDA device"),
    (["--sampler", "heun", "--steps", "1"], "steps must be an integer >= 2"),
])  # fmt: skip
def test_sample_refuses_bad_settings_before_its_banner_and_the_folder(tiny_ckpt, tmp_path, capsys, extra, message):
    out = tmp_path / "s"
    assert _sample(tiny_ckpt, out, *extra) == 2
    printed = capsys.readouterr()
    assert message in printed.err and "epg sample:" not in printed.out
    assert not out.exists()


def test_guidance_on_an_unconditional_network_says_so(tmp_path, capsys):
    folder = tmp_path / "uncond"
    # Named after a config with a released guidance scale, which is no default for it.
    ckpt.save(build("epg-tiny", num_classes=0).eval(), folder, metadata={"mode": "diffusion", "model": "epg-xl-16"})
    assert _sample(folder, tmp_path / "a", "--guidance", "2") == 2
    printed = capsys.readouterr()
    assert "guidance 2: this network is unconditional (no class labels)" in printed.err
    assert "labels='none'" not in printed.err and "epg sample:" not in printed.out
    assert not (tmp_path / "a").exists()
    assert _sample(folder, tmp_path / "b") == 0
    assert "guidance 1," in capsys.readouterr().out


def test_an_output_that_is_a_file_is_named_up_front(tiny_ckpt, tmp_path, capsys):
    afile = tmp_path / "g.pth"
    afile.write_text("x")
    assert _sample(tiny_ckpt, afile) == 2
    printed = capsys.readouterr()
    assert f"error: {afile} is a file; the output needs a folder" in printed.err and printed.out == ""
    assert _sample(tiny_ckpt, afile / "x") == 2
    assert f"error: {afile} is a file, not a folder: {afile / 'x'} cannot be written" in capsys.readouterr().err
    (tmp_path / "src" / "a").mkdir(parents=True)
    assert main(["prepare", str(tmp_path / "src"), str(afile), "--no-progress"]) == 2
    assert f"error: {afile} is a file; the output needs a folder" in capsys.readouterr().err
    assert afile.read_text() == "x"


# --- how the training commands assemble their options -------------------------------------------


def _train_config_of(monkeypatch, argv):
    """The TrainConfig a training command would train with (nothing is trained)."""
    from epg import cli

    seen = []
    monkeypatch.setattr(cli, "_cmd_train", lambda args, mode_options: seen.append(cli._train_config(args, mode_options)) or 0)
    assert main(argv) == 0
    (cfg,) = seen
    return cfg


def test_set_splits_at_the_first_equals_sign_and_trims_the_key():
    from epg.cli import _parse_sets

    # A value may hold "=" (a path, a URL query): the key ends at the first one.
    assert _parse_sets(["data_options.path=/d/a=b", " lr =1e-3"]) == [("data_options.path", "/d/a=b"), ("lr", 1e-3)]
    for pair in ("=3", "steps"):
        with pytest.raises(ValueError, match=rf"--set expects key=value, got '{pair}'"):
            _parse_sets([pair])


def test_an_empty_set_key_is_named_as_such(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--set", "=3"]) == 2
    assert "--set expects key=value, got '=3'" in capsys.readouterr().err


def test_preset_then_config_then_command_line_then_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("steps: 7\nlr: 0.002\nrun_dir: from-file\nencoder: file-encoder\n")
    argv = ["finetune", "--objective", "diffusion", "--preset", "demo-diffusion", "--config", str(config)]
    cfg = _train_config_of(monkeypatch, argv)
    assert (cfg.mode, cfg.steps, cfg.lr, cfg.run_dir, cfg.encoder) == ("diffusion", 7, 0.002, "from-file", "file-encoder")
    # The command's own options win over the file, --set over both.
    cfg = _train_config_of(monkeypatch, [*argv, "--run-dir", "r", "--encoder", "e", "--set", "steps=9"])
    assert (cfg.mode, cfg.steps, cfg.run_dir, cfg.encoder) == ("diffusion", 9, "r", "e")


def test_set_may_repeat_what_the_command_line_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _train_config_of(monkeypatch, ["pretrain", "--run-dir", "a", "--set", "run_dir=a", "--set", "mode=pretrain"])
    assert (cfg.mode, cfg.run_dir) == ("pretrain", "a")
    cfg = _train_config_of(monkeypatch, ["finetune", "--objective", "consistency", "--encoder", "e",
                                         "--set", "mode=consistency", "--set", "encoder=e"])  # fmt: skip
    assert (cfg.mode, cfg.encoder) == ("consistency", "e")


def test_finetune_needs_its_objective(capsys):
    # Without it the run would train TrainConfig's default mode without a word.
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--encoder", "e"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --objective" in capsys.readouterr().err


# --- output paths ------------------------------------------------------------------------------------


def test_output_checks_take_new_nested_folders_and_existing_outputs(tmp_path):
    from epg.cli import _check_output

    # A folder to make several levels down, and its file: the nearest existing folder decides.
    _check_output(tmp_path / "a" / "b" / "c", folder=True)
    _check_output(tmp_path / "a" / "b" / "m.json", folder=False)
    # Outputs that are there already: a sample folder to resume, a metrics file to rewrite.
    (tmp_path / "samples").mkdir()
    (tmp_path / "m.json").write_text("{}")
    _check_output(tmp_path / "samples", folder=True)
    _check_output(tmp_path / "m.json", folder=False)
    with pytest.raises(NotADirectoryError, match="is a file; the output needs a folder"):
        _check_output(tmp_path / "m.json", folder=True)
    with pytest.raises(IsADirectoryError, match="is a folder; the output needs a file name"):
        _check_output(tmp_path / "samples", folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "samples"]  # nothing made


def test_evaluate_takes_exactly_one_of_ref_and_save_ref(tmp_path, capsys):
    samples = tmp_path / "samples.npz"
    samples.write_bytes(b"never read")
    for extra in ([], ["--ref", str(tmp_path / "r.npz"), "--save-ref", str(tmp_path / "o.npz")]):
        assert main(["evaluate", str(samples), *extra]) == 2
        assert "give --ref REF.npz (evaluate SAMPLES against it) or --save-ref OUT.npz" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


# --- how a command ends -------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(None, 130), (15, 143)])
def test_an_interrupted_command_exits_as_the_shell_reports_its_signal(monkeypatch, capsys, signum, code):
    from epg import cli

    def interrupted(args):
        exc = KeyboardInterrupt() if signum is None else KeyboardInterrupt("stopped by SIGTERM")
        if signum is not None:
            exc.signum = signum
        raise exc

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert main(["info"]) == code  # Ctrl-C (no signal recorded) is SIGINT's 128 + 2
    assert capsys.readouterr().err == ("epg info: interrupted\n" if signum is None else "epg info: stopped by SIGTERM\n")


@pytest.mark.parametrize("command", ["pretrain", "finetune", "demo"])
def test_a_run_stopped_by_non_finite_steps_ends_with_its_message_not_a_traceback(monkeypatch, capsys, command):
    from epg import cli
    from epg.train import NonFiniteStop

    def stopped(args):
        raise NonFiniteStop("3 non-finite steps in a row (step 7)")

    monkeypatch.setattr(cli, f"_cmd_{command}", stopped)
    argv = ["--objective", "diffusion"] if command == "finetune" else []
    assert main([command, *argv]) == 2
    assert capsys.readouterr().err == f"epg {command}: error: 3 non-finite steps in a row (step 7)\n"
