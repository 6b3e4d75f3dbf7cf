"""`epg prepare` on awkward inputs: an interrupted run, a source that lost files, files the scan
ignores, Ctrl-C with workers, an output folder of the user's, a full disk, small sources."""

import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import epg
from epg.cli import main
from epg.data.folder import FolderIndex
from epg.data.portable import PortableLoader
from epg.data.prepare import center_crop_arr, prepare

prepare_module = sys.modules["epg.data.prepare"]  # the package exports the function by that name
RES = 8


def _tree(root, files):
    """``files``: {relative path: side}; each a random RGB image of side × (side + 3)."""
    rng = np.random.default_rng(0)
    for rel, side in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)).save(path)
    return root


def _interrupt_at(monkeypatch, n):
    """Make the in-process run stop with a KeyboardInterrupt at its n-th image (1-based)."""
    prepare_one, calls = prepare_module._prepare_one, []

    def interrupted(task):
        calls.append(task)
        if len(calls) == n:
            raise KeyboardInterrupt
        return prepare_one(task)

    monkeypatch.setattr(prepare_module, "_prepare_one", interrupted)


def _run(src, dst, **kw):
    return prepare(src, dst, RES, workers=0, progress=False, **kw)


def test_training_refuses_the_output_of_an_unfinished_run(tmp_path, monkeypatch):
    # A killed run left index.txt saying so, but a scan of DST (data_options.path=DST) trained
    # on the half-prepared folder without a word.
    src = _tree(tmp_path / "src", {"a/x.png": 20, "a/y.png": 20, "b/z.png": 20})
    dst = tmp_path / "dst"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _run(src, dst)
    assert (dst / "a" / "x.png").is_file() and not (dst / "b" / "z.png").exists()
    unfinished = r"dst is an unfinished `epg prepare` output.*Rerun the same `epg prepare` command"
    for read in (lambda: FolderIndex.scan(dst),
                 lambda: FolderIndex.from_file_list(dst / "index.txt"),
                 lambda: PortableLoader(dst, RES, 1, num_workers=0)):  # fmt: skip
        with pytest.raises(ValueError, match=unfinished):
            read()
    report = _run(src, dst)  # the rerun finishes it
    assert (report.written, report.existing) == (2, 1)
    assert FolderIndex.scan(dst).paths() == FolderIndex.from_file_list(dst / "index.txt").paths()


def test_a_rerun_removes_the_outputs_whose_source_is_gone_and_nothing_else(tmp_path, monkeypatch):
    # y's source removed: y.png stayed in DST, and a scan of DST trained on it, index.txt not.
    files = {"a/v.png": 20, "a/x.png": 20, "a/y.png": 20, "b/z.png": 20, "c/w.png": 20}
    src = _tree(tmp_path / "src", files)
    dst = tmp_path / "dst"
    _run(src, dst)
    (src / "a" / "y.png").unlink()
    not_ours = [dst / "a" / "mine.png", dst / "a" / "notes.txt", tmp_path / "victim.png"]
    for path in not_ours:  # files epg prepare did not write, one named by an edited index
        path.write_bytes(b"the user's")
    with open(dst / "index.txt", "a") as f:
        f.write("../victim.png 0\n")
    report = _run(src, dst)
    assert report.removed == 1 and "1 output(s) of an earlier run removed" in str(report)
    assert not (dst / "a" / "y.png").exists()
    assert all(p.read_bytes() == b"the user's" for p in not_ours)
    (dst / "a" / "mine.png").unlink()
    assert FolderIndex.scan(dst).paths() == FolderIndex.from_file_list(dst / "index.txt").paths()

    # A class gone from the source: its outputs and then its folder are removed.
    (src / "c" / "w.png").unlink()
    (src / "c").rmdir()
    assert _run(src, dst).removed == 1 and not (dst / "c").exists()

    # An interrupted run lists what it may have written: x.png, written before the interruption
    # (at b/z.png, after a/v.png and a/x.png) and its source then removed, is removed by the next.
    (dst / "a" / "x.png").unlink()
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            _run(src, dst)
    assert (dst / "a" / "x.png").is_file()
    (src / "a" / "x.png").unlink()
    assert _run(src, dst).removed == 1 and not (dst / "a" / "x.png").exists()
    assert FolderIndex.scan(dst).paths() == [str(dst / "a" / "v.png"), str(dst / "b" / "z.png")]


def test_the_summary_counts_the_files_the_scan_ignores(tmp_path, capsys):
    # Sub-folders of a class folder and other extensions were skipped without a word.
    src = _tree(tmp_path / "src", {"a/x.png": 20, "a/sub/v.png": 20, "a/sub/deeper/u.jpg": 20})
    for rel in ("a/y.gif", "a/z.tif", "a/.hidden.gif", "notes.txt"):
        (src / rel).write_bytes(b"not prepared")
    report = _run(src, tmp_path / "dst")
    assert report.written == 1 and not (tmp_path / "dst" / "skipped.txt").read_text()
    assert report.ignored == [("a/sub/deeper/u.jpg", "in a sub-folder"),
                              ("a/sub/v.png", "in a sub-folder"),
                              ("a/y.gif", "not .bmp/.jpeg/.jpg/.png/.webp"),
                              ("a/z.tif", "not .bmp/.jpeg/.jpg/.png/.webp"),
                              ("notes.txt", "outside the class folders")]  # fmt: skip
    assert main(["prepare", str(src), str(tmp_path / "dst2"), "--resolution", str(RES),
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert ("5 files ignored: 2 in a sub-folder (first: a/sub/deeper/u.jpg), 2 not "
            ".bmp/.jpeg/.jpg/.png/.webp (first: a/y.gif), 1 outside the class folders "
            "(first: notes.txt)") in capsys.readouterr().out  # fmt: skip


_SLOW_RUN = """
import os, sys, time
import epg.data.prepare
from epg.cli import main

module = sys.modules["epg.data.prepare"]
crop = module.center_crop_arr


def slow(image, resolution):  # the forked workers inherit it
    open(os.path.join(sys.argv[3], str(os.getpid())), "w").close()
    time.sleep(0.5)
    return crop(image, resolution)


module.center_crop_arr = slow
sys.exit(main(["prepare", sys.argv[1], sys.argv[2], "--resolution", "8", "--workers", "2",
               "--no-progress"]))
"""


def test_ctrl_c_with_workers_prints_one_line_and_the_run_resumes(tmp_path):
    # Ctrl-C reaches the whole process group: every pool worker printed its own traceback.
    src = _tree(tmp_path / "src", {f"a/{k}.png": 12 for k in range(12)})
    dst, started = tmp_path / "dst", tmp_path / "started"
    started.mkdir()
    script = tmp_path / "slow_run.py"
    script.write_text(_SLOW_RUN)
    env = {**os.environ, "PYTHONPATH": str(Path(epg.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(dst), str(started)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(started)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(os.listdir(started)) == 2, "the two workers did not start"
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the parent and the workers
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT
    assert err.strip() == "epg prepare: interrupted", err
    report = _run(src, dst)
    assert report.written + report.existing == 12 and len(FolderIndex.scan(dst)) == 12


def test_prepare_refuses_a_non_empty_folder_it_did_not_make(tmp_path, capsys):
    # `epg prepare SRC ~` wrote class folders and index.txt beside the user's files.
    src = _tree(tmp_path / "src", {"a/x.png": 20})
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "cv.txt").write_text("mine")
    refused = r"home exists, is not empty and is not an earlier `epg prepare` output.*use a new"
    with pytest.raises(ValueError, match=refused):
        _run(src, home)
    assert main(["prepare", str(src), str(home), "--resolution", str(RES), "--no-progress"]) == 2
    assert "use a new or empty folder" in capsys.readouterr().err
    left = sorted(p.relative_to(home).as_posix() for p in home.rglob("*"))
    assert left == ["Documents", "Documents/cv.txt"]  # nothing written
    # An empty folder is taken, and an earlier output is rerun (resumed) as before.
    (tmp_path / "empty").mkdir()
    assert _run(src, tmp_path / "empty").written == 1
    assert _run(src, tmp_path / "empty").existing == 1


def test_a_rerun_removes_empty_stale_class_folders_and_warns_of_others(tmp_path, caplog):
    src = _tree(tmp_path / "src", {"a/x.png": 20})
    dst = tmp_path / "dst"
    _run(src, dst)
    (dst / "old").mkdir()  # an empty class folder of a class since removed from the source
    (dst / "other").mkdir()
    (dst / "other" / "f.txt").write_text("data")
    with caplog.at_level("WARNING"):
        _run(src, dst)
    assert not (dst / "old").exists() and (dst / "other" / "f.txt").read_text() == "data"
    assert f"{dst / 'other'} is not a class of the source" in caplog.text


@pytest.mark.parametrize("where", ["image", "index"])
def test_a_full_disk_names_the_output(tmp_path, monkeypatch, capsys, where):
    # It said "[Errno 28] No space left on device" and nothing else.
    src = _tree(tmp_path / "src", {"a/x.png": 20})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "image":
        monkeypatch.setattr(Image.Image, "save", full)
        named = os.path.join(tmp_path / "dst", "a", "x.png")
    else:
        monkeypatch.setattr(Path, "write_text", full)
        named = str(tmp_path / "dst" / "index.txt")
    with pytest.raises(OSError, match=f"{os.strerror(errno.ENOSPC)}: cannot write") as info:
        _run(src, tmp_path / "dst")
    assert info.value.errno == errno.ENOSPC and str(info.value).endswith(named)
    assert main(["prepare", str(src), str(tmp_path / "dst"), "--resolution", str(RES),
                 "--workers", "0", "--no-progress"]) == 2  # fmt: skip
    assert named in capsys.readouterr().err


def test_center_crop_arr_shapes_and_the_count_of_upscaled_images(tmp_path):
    gray = Image.fromarray(np.arange(30 * 40, dtype=np.uint8).reshape(30, 40))
    assert center_crop_arr(gray, RES).shape == (RES, RES)  # one band: no channel axis
    assert center_crop_arr(gray.convert("RGB"), RES).shape == (RES, RES, 3)
    src = _tree(tmp_path / "src", {"a/big.png": 20, "a/small.png": 5, "b/tall.png": RES})
    report = _run(src, tmp_path / "dst")
    assert (report.written, report.upscaled) == (3, 1) and "3 written (1 upscaled" in str(report)
    assert _run(src, tmp_path / "dst").upscaled == 0  # kept outputs: not decoded again


def test_a_source_whose_short_side_is_exactly_twice_the_resolution_is_halved_first():
    # ADM halves while the short side is >= 2·resolution: at exactly 2·res the BOX halving gives
    # res × (W // 2), with no bicubic resampling (a ">" would resize 16×19 to 10×8 bicubically).
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (2 * RES, 2 * RES + 3, 3),
                                                              dtype=np.uint8))  # fmt: skip
    halved = np.asarray(image.resize((RES + 1, RES), Image.BOX))
    np.testing.assert_array_equal(center_crop_arr(image, RES), halved[:, :RES])


def test_a_rerun_redoes_an_output_of_the_wrong_format_or_mode(tmp_path):
    # Only a complete RGB image of the run's format and size counts as done: a JPEG or a gray PNG
    # under an output's name (the right size) would otherwise be kept and trained on.
    src = _tree(tmp_path / "src", {"a/x.png": 20, "a/y.png": 20, "b/z.png": 20})
    dst = tmp_path / "dst"
    _run(src, dst)
    rgb = np.asarray(Image.open(dst / "a" / "x.png"))
    Image.fromarray(rgb).save(dst / "a" / "x.png", format="JPEG", quality=95)
    Image.fromarray(rgb).convert("L").save(dst / "a" / "y.png", format="PNG")
    report = _run(src, dst)
    assert (report.written, report.existing) == (2, 1)
    for name in ("x.png", "y.png"):
        with Image.open(dst / "a" / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (RES, RES))


def test_a_write_error_that_names_its_file_is_left_as_it_is(tmp_path, monkeypatch):
    # Only an error without a file name (a full disk's, raised by a write) is given the output's
    # name; one that has a name already keeps it and its own message.
    src = _tree(tmp_path / "src", {"a/x.png": 20})

    def denied(self, fp, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(fp))

    monkeypatch.setattr(Image.Image, "save", denied)
    with pytest.raises(PermissionError) as info:
        _run(src, tmp_path / "dst")
    assert info.value.filename == os.path.join(tmp_path / "dst", "a", ".x.png.tmp")
    assert "cannot write" not in str(info.value)


def test_an_interrupted_write_leaves_no_partial_output_under_its_name(tmp_path, monkeypatch):
    # The image is written to a hidden name and renamed: a run killed mid-write must not leave a
    # truncated x.png that a folder scan would list.
    src = _tree(tmp_path / "src", {"a/x.png": 20})
    save = Image.Image.save

    def killed_mid_write(self, fp, *args, **kwargs):
        save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(10)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", killed_mid_write)
        with pytest.raises(KeyboardInterrupt):
            _run(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / "a" / "x.png").exists()
    assert _run(src, tmp_path / "dst").written == 1


def test_jpeg_outputs_are_encoded_at_the_asked_quality(tmp_path):
    src = _tree(tmp_path / "src", {"a/x.png": 20})
    expected = center_crop_arr(Image.open(src / "a" / "x.png").convert("RGB"), RES)
    for quality in (30, 95):
        dst = tmp_path / f"q{quality}"
        prepare(src, dst, RES, format="jpeg", quality=quality, workers=0, progress=False)
        buffer = io.BytesIO()
        Image.fromarray(expected).save(buffer, format="JPEG", quality=quality)
        assert (dst / "a" / "x.jpg").read_bytes() == buffer.getvalue()


def test_a_rerun_removes_only_entries_of_the_form_of_its_outputs(tmp_path):
    # An index entry deeper than <class>/<file> (here added by hand) names no output of epg
    # prepare: the file it names is the user's, and stays.
    src = _tree(tmp_path / "src", {"a/x.png": 20})
    dst = tmp_path / "dst"
    _run(src, dst)
    (dst / "a" / "sub").mkdir()
    (dst / "a" / "sub" / "keep.png").write_bytes(b"the user's")
    with open(dst / "index.txt", "a") as f:
        f.write("a/sub/keep.png 0\n")
    assert _run(src, dst).removed == 0
    assert (dst / "a" / "sub" / "keep.png").read_bytes() == b"the user's"


def test_prepare_refuses_a_source_inside_the_output(tmp_path):
    src = _tree(tmp_path / "out" / "raw", {"a/x.png": 20})
    with pytest.raises(ValueError, match="must not contain each other"):
        _run(src, tmp_path / "out")


def test_two_sources_that_would_share_an_output_are_refused(tmp_path):
    # a/x.png and a/x.jpg both become a/x.png: the second would overwrite the first.
    src = _tree(tmp_path / "src", {"a/x.png": 20, "a/x.jpg": 20})
    with pytest.raises(ValueError, match=r"a/x\.jpg and a/x\.png would both be written to .*x\.png"):
        _run(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_a_name_index_txt_cannot_hold_is_skipped_and_counted(tmp_path):
    # A line break in a file name cannot be written to index.txt: that file is skipped with the
    # reason, the rest prepared; skipped.txt and the report are in path order.
    src = _tree(tmp_path / "src", {"a/x\ny.png": 20, "a/z.png": 20})
    (src / "a" / "b.png").write_bytes(b"not an image")
    report = _run(src, tmp_path / "dst")
    assert (report.total, report.written) == (3, 1)
    assert [rel for rel, _ in report.failed] == ["a/b.png", "a/x\ny.png"]
    assert "cannot be written to index.txt" in report.failed[1][1]
    assert FolderIndex.scan(tmp_path / "dst").paths() == [str(tmp_path / "dst" / "a" / "z.png")]


def test_a_run_killed_while_removing_stale_outputs_leaves_them_listed(tmp_path, monkeypatch):
    # index.txt is rewritten before the stale outputs are removed; it must keep listing them so
    # that the next run still knows they are its own.
    src = _tree(tmp_path / "src", {"a/x.png": 20, "a/y.png": 20})
    dst = tmp_path / "dst"
    _run(src, dst)
    (src / "a" / "y.png").unlink()

    def killed(path):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module.os, "remove", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(src, dst)
    assert (dst / "a" / "y.png").is_file()
    assert _run(src, dst).removed == 1 and not (dst / "a" / "y.png").exists()


def test_index_txt_is_in_scan_order_whatever_the_source_index_order(tmp_path):
    src = _tree(tmp_path / "src", {"a/x.png": 20, "a/y.png": 20, "b/z.png": 20})
    scanned = FolderIndex.scan(src)
    reverse = FolderIndex.from_files(scanned.paths()[::-1])
    report = _run(reverse, tmp_path / "dst")
    listed = FolderIndex.from_file_list(report.index_list)
    assert listed.paths() == FolderIndex.scan(tmp_path / "dst").paths()
    assert listed.labels.tolist() == [0, 0, 1]


def test_an_index_txt_of_the_users_is_not_taken_for_an_earlier_run(tmp_path):
    # A folder with a file list of the user's (its own "#" header) is not an earlier output of
    # epg prepare: refused as a folder of the user's, not as "prepared with other settings".
    src = _tree(tmp_path / "src", {"a/x.png": 20})
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "index.txt").write_text("# my own list\na/x.png 0\n")
    with pytest.raises(ValueError, match="is not empty and is not an earlier `epg prepare` output"):
        _run(src, dst)
    assert (dst / "index.txt").read_text() == "# my own list\na/x.png 0\n"
