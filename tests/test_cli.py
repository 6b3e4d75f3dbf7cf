import json
import subprocess
import sys

from epg.cli import main


def test_info_lists_versions_backends_and_devices(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "reference", "triton", "cuda", "devices"):
        assert word in out


def test_info_json_is_machine_readable(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"]["available"] is True
    assert "layer_norm" in info["backends"]["reference"]["ops"]
    for name, backend in info["backends"].items():
        assert backend["detail"], f"{name} gives no reason"


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "epg.cli", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "backends" in result.stdout


def test_info_shows_the_backend_variables_set_for_single_ops(monkeypatch, capsys):
    monkeypatch.setenv("EPG_BACKEND_LAYER_NORM", "reference")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend_env"] == {"EPG_BACKEND_LAYER_NORM": "reference"}
    assert main(["info"]) == 0
    assert "forced by environment: EPG_BACKEND_LAYER_NORM=reference" in capsys.readouterr().out


def test_command_defaults():
    # The defaults the help texts and README promise (a changed one changes every run's result).
    from epg.cli import build_parser

    parser = build_parser()
    sample = parser.parse_args(["sample", "ckpt", "--out", "o"])
    assert (sample.num_images, sample.batch_size, sample.seed, tuple(sample.interval)) == (50_000, 100, 0, (0.19, 1.61))
    assert (sample.labels, sample.precision, sample.steps, sample.guidance, sample.sampler) == ("balanced", "fp32", None, None, None)
    assert not (sample.no_interval or sample.no_clamp or sample.trailing_zero or sample.overwrite)
    prepare = parser.parse_args(["prepare", "src", "dst"])
    assert (prepare.resolution, prepare.format, prepare.quality, prepare.workers) == (256, "png", None, None)
    evaluate = parser.parse_args(["evaluate", "s.npz"])
    assert (evaluate.batch_size, evaluate.ref, evaluate.save_ref, evaluate.json) == (200, None, None, None)
    demo = parser.parse_args(["demo"])
    assert (demo.objective, demo.out, demo.seed, demo.quick) == ("diffusion", "epg-demo", 0, False)


def test_info_lists_the_dispatched_ops_and_their_backwards_only(capsys):
    assert main(["info", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["backends"]["reference"]["ops"]
    assert {"layer_norm", "layer_norm_backward", "to_uint8"} <= set(listed)
    assert "normalization_stats" not in listed  # a helper of epg.reference, not an op
