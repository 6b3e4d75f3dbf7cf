"""Training from an image folder (data="folder"): both stages, exact resume, wiring errors,
and `epg prepare` on the bundled JPEGs."""

import os
import signal

import numpy as np
import pytest
from PIL import Image

from epg.checkpoint import read_config
from epg.cli import main
from epg.data.dali import dali_available
from epg.train import Interrupted, TrainConfig, Trainer
from helpers import signal_in_call

RES = 16


@pytest.fixture(scope="module")
def png_tree(tmp_path_factory):
    """3 classes × 4 random RGB PNGs of RES², as `epg prepare` writes them."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for c in ("n02", "n00", "n01"):
        os.makedirs(root / c)
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    return root


def _cfg(tmp_path, tree, mode="diffusion", loader="portable", **kw):
    base = dict(
        mode=mode, model="rcm-tiny" if mode == "pretrain" else "epg-tiny",
        model_overrides=dict(img_size=RES, patch_size=4) | ({} if mode == "pretrain" else {"num_classes": 3}),
        data="folder", data_options={"path": str(tree), "loader": loader, "workers": 0},
        run_dir=str(tmp_path / "run"), steps=4, batch_size=4, lr=1e-3, warmup_steps=1, ckpt_every=2,
        log_every=1, compile=False, progress=False, seed=1, ema_decay=0.9,
    )  # fmt: skip
    if mode == "pretrain":
        del base["ema_decay"]
        base["augment"] = dict(crop_scale=(0.5, 1.0))
        base["objective"] = dict(s0=4, s1=16)
    base.update(kw)
    return TrainConfig(**base)


def _fit(cfg, stop_at=None):
    trainer = Trainer(cfg)
    try:
        return trainer, [r["loss"] for r in trainer.fit(stop_at=stop_at)]
    finally:
        trainer.close()


@pytest.mark.parametrize("mode", ["diffusion", "pretrain"])
def test_folder_training_resumes_exactly_and_records_the_normalisation(tmp_path, png_tree, mode):
    straight, full = _fit(_cfg(tmp_path / "a", png_tree, mode))
    _, part = _fit(_cfg(tmp_path / "b", png_tree, mode), stop_at=2)
    resumed, rest = _fit(_cfg(tmp_path / "b", png_tree, mode))
    assert part + rest == full  # same batches, flips and noise after the restart
    assert resumed.convention == "imagenet"
    if mode == "pretrain":  # the photometric views work in the data's colour space
        assert all(a.config.convention == "imagenet" for a in resumed.augment)
    _, meta = read_config(straight.export(tmp_path / "export"))
    assert meta["convention"] == "imagenet"


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_cpu_loader_trains_like_the_portable_one(tmp_path, png_tree):
    _, portable = _fit(_cfg(tmp_path / "p", png_tree, steps=2))
    _, dali = _fit(_cfg(tmp_path / "d", png_tree, loader="dali", steps=2))
    assert dali == pytest.approx(portable, rel=1e-6)


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_a_dali_run_stopped_by_sigterm_resumes_exactly(tmp_path, png_tree):
    # SIGTERM arrives while DALI's own threads decode; the step finishes, the checkpoint holds
    # the loader's position, and the resumed run draws the batches the straight run drew.
    _, full = _fit(_cfg(tmp_path / "a", png_tree, loader="dali", steps=5, ckpt_every=0))
    trainer = Trainer(_cfg(tmp_path / "b", png_tree, loader="dali", steps=5, ckpt_every=0))
    signal_in_call(trainer, 3, signal.SIGTERM)
    try:
        with pytest.raises(Interrupted, match=r"^terminated \(SIGTERM\) at step 3; checkpoint saved"):
            trainer.fit()
    finally:
        trainer.close()
    _, rest = _fit(_cfg(tmp_path / "b", png_tree, loader="dali", steps=5, ckpt_every=0))
    assert rest == full[3:]


def test_folder_wiring_errors_are_clear(tmp_path, png_tree):
    with pytest.raises(ValueError, match="data_options.path"):
        Trainer(_cfg(tmp_path, png_tree, data_options={"loader": "portable"}))
    with pytest.raises(ValueError, match="has 3 classes; the network was built for 10"):
        Trainer(_cfg(tmp_path, png_tree, model_overrides={"img_size": RES, "patch_size": 4}))
    with pytest.raises(ValueError, match="loader must be"):
        Trainer(_cfg(tmp_path, png_tree, data_options={"path": str(png_tree), "loader": "pillow"}))
    with pytest.raises(ValueError, match="'simple'"):
        Trainer(_cfg(tmp_path, png_tree, data="digits", data_options={"convention": "imagenet"}))


def test_prepare_command_crops_the_bundled_jpegs(tmp_path, capsys):
    from epg.data.embedded import sample_jpeg_paths

    src = tmp_path / "raw"
    for i, path in enumerate(sample_jpeg_paths()):
        os.makedirs(src / f"n0{i}")
        (src / f"n0{i}" / os.path.basename(path)).write_bytes(open(path, "rb").read())
    (src / "n00" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["prepare", str(src), str(tmp_path / "out"), "--resolution", "32", "--workers", "0",
                 "--no-progress"]) == 0  # fmt: skip
    assert "2 written" in capsys.readouterr().out
    out = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert out == ["n00/china.png", "n01/flower.png"]
    assert Image.open(tmp_path / "out" / "n00" / "china.png").size == (32, 32)
    assert "broken.jpg" in (tmp_path / "out" / "skipped.txt").read_text()
    assert main(["prepare", str(src), str(tmp_path / "jpeg"), "--resolution", "32", "--workers", "0",
                 "--no-progress", "--format", "jpeg", "--quality", "90"]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "jpeg").rglob("*.jp*g")) == ["china.jpg", "flower.jpg"]
    assert "index:" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert "epg prepare: error:" in capsys.readouterr().err
