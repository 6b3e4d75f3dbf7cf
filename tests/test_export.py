"""`epg export` / epg.train.export_checkpoint: the network of a training checkpoint as an epg
checkpoint folder, to sample or fine-tune from a run that has not finished."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epg import checkpoint as ckpt
from epg.cli import main
from epg.generate import load_network
from epg.train import Trainer, export_checkpoint, load_encoder_weights
from epg.models import build
from helpers import TINY, tiny_train_config as _cfg


def _meta(folder: Path) -> dict:
    return json.loads((folder / ckpt.CONFIG_NAME).read_text())["metadata"]


@pytest.mark.parametrize("mode", ["pretrain", "diffusion", "consistency"])
def test_the_last_checkpoint_exports_what_the_run_exports_as_final(tmp_path, mode):
    trainer = Trainer(_cfg(tmp_path, mode, steps=4, ckpt_every=2, keep_checkpoints=3))
    trainer.fit()
    final = trainer.export()
    run = tmp_path / "run"
    out, meta = export_checkpoint(run / "checkpoints" / "step_00000004.pt")
    assert out == run / "exports" / "step_00000004"
    expected, got = load_file(str(final / ckpt.WEIGHTS_NAME)), load_file(str(out / ckpt.WEIGHTS_NAME))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    exported = _meta(out)
    assert exported.pop("exported_from") == meta["source"]  # what makes it replaceable by a re-export
    assert exported == _meta(final) == {k: v for k, v in meta.items() if k != "source"}
    assert _meta(out)["convention"] == "simple"
    # An earlier checkpoint is another network: the EMA (stage 2) / online encoder (stage 1) then.
    early, _ = export_checkpoint(run / "checkpoints" / "step_00000002.pt", tmp_path / "early")
    assert _meta(early)["step"] == 2
    assert not torch.equal(load_file(str(early / ckpt.WEIGHTS_NAME))[next(iter(got))], next(iter(got.values())))


def test_an_unfinished_run_is_sampled_and_fine_tuned_through_export(tmp_path, capsys):
    Trainer(_cfg(tmp_path / "s1", "pretrain", steps=4, ckpt_every=2)).fit(stop_at=2)
    Trainer(_cfg(tmp_path / "s2", "diffusion", steps=4, ckpt_every=2)).fit(stop_at=2)
    s1, s2 = tmp_path / "s1" / "run", tmp_path / "s2" / "run"
    capsys.readouterr()
    # Without final/, sampling says how to get a network out of the run, and of a step file.
    assert main(["sample", str(s2), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "a training run that has not finished (no final/ yet); `epg export" in capsys.readouterr().err
    step_file = s2 / "checkpoints" / "step_00000002.pt"
    assert main(["sample", str(step_file), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert f"`epg export {step_file}` writes the network of a training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    assert main(["export", str(s2)]) == 0
    printed = capsys.readouterr().out
    assert "exported the EMA network of" in printed and "(diffusion epg-tiny, step 2)" in printed
    net, info = load_network(s2 / "exports" / "step_00000002")
    assert info["mode"] == "diffusion" and info["config"] == "epg-tiny" and not net.training

    model = build("epg-tiny", **TINY)
    # As --encoder, the unfinished stage-1 run is named as such (the error spoke of the
    # official file names nnet_ema.pth / nnet.pth).
    with pytest.raises(FileNotFoundError, match=r"training run that has not finished \(no final/ yet\); `epg export"):
        load_encoder_weights(model, s1)
    assert main(["export", str(s1), "--out", str(tmp_path / "enc")]) == 0
    assert "exported the online encoder" in capsys.readouterr().out
    load_encoder_weights(model, tmp_path / "enc")  # stage 2 starts from it


def test_export_skips_a_damaged_newest_checkpoint_and_refuses_a_foreign_folder(tmp_path, capsys, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, "diffusion", steps=4, ckpt_every=2, keep_checkpoints=3))
    trainer.fit()
    trainer.export()
    run = tmp_path / "run"
    newest = run / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    out, meta = export_checkpoint(run)
    assert meta["step"] == 2 and out.name == "step_00000002"
    assert "step_00000004.pt" in capsys.readouterr().err and newest.exists()  # left as it was
    with pytest.raises(ckpt.CheckpointError, match="truncated by an interrupted"):
        export_checkpoint(newest)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an earlier export"):
        export_checkpoint(run, busy)
    assert (busy / "notes.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    with pytest.raises(FileExistsError, match="is not an earlier export"):  # a file is not replaced
        export_checkpoint(run, busy / "notes.txt")
    assert (busy / "notes.txt").read_text() == "mine"
    export_checkpoint(run, out)  # an earlier export is replaced; a run's final/ is not
    with pytest.raises(FileExistsError, match="is not an earlier export"):
        export_checkpoint(run, run / "final")
    # Inside checkpoints/, a bare file name still finds the run folder; the folder itself works.
    monkeypatch.chdir(run / "checkpoints")
    assert export_checkpoint("step_00000002.pt")[0] == run / "exports" / "step_00000002"
    assert export_checkpoint(run / "checkpoints")[1]["step"] == 2
    with pytest.raises(FileNotFoundError, match="holds no training checkpoints"):
        export_checkpoint(tmp_path / "busy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere")


def test_a_checkpoint_from_before_the_convention_was_recorded_gets_the_datas(tmp_path):
    Trainer(_cfg(tmp_path, "diffusion", steps=2, ckpt_every=0)).fit()
    path = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    state = torch.load(path, weights_only=True)
    assert state.pop("convention") == "simple"
    torch.save(state, path)
    out, meta = export_checkpoint(path)
    assert meta["convention"] == "simple"
    state["config"]["data"] = "folder"
    torch.save(state, path)
    assert export_checkpoint(path, tmp_path / "f")[1]["convention"] == "imagenet"  # the folder loader's default


def test_an_export_of_another_run_is_not_replaced(tmp_path):
    # `epg export s1 --out s2/exports/step_3` used to replace s2's export with s1's network.
    for name in ("a", "b"):
        Trainer(_cfg(tmp_path / name, "diffusion", steps=2, ckpt_every=1)).fit()
    run_a, run_b, out = tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "out"
    export_checkpoint(run_a / "checkpoints" / "step_00000001.pt", out)
    export_checkpoint(run_a, out)  # the same run, a later step: replaced as before
    assert _meta(out)["step"] == 2
    with pytest.raises(FileExistsError, match=r"out holds an export of another run \(.*a/run/checkpoints"):
        export_checkpoint(run_b, out)
    assert _meta(out)["exported_from"].startswith(str(run_a))
