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
