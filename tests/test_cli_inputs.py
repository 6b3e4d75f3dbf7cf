"""Bad input to the CLI is refused before any work, with a message and exit status 2."""

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
