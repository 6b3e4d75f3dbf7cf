"""Checkpoint I/O, continued: what atomic writes promise, save() into a folder already there, and
how official files wrapped or prefixed by their training code are unpacked."""

import fnmatch
import json
import os
import stat

import pytest
import torch
from test_checkpoint import _noisy

from epg import checkpoint as ck
from epg.models import build


@pytest.fixture
def inputs():
    return torch.randn(2, 3, 32, 32), torch.randn(2) * 100, torch.tensor([1, 7])


# --- atomic_write -------------------------------------------------------------------------------


def test_atomic_write_syncs_the_new_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    # Without the first fsync a crash after the rename can leave an empty or partial file under
    # the name; without the second the rename itself may not survive a power cut.
    target = tmp_path / "state.json"
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ck.atomic_write(target, lambda tmp: open(tmp, "w").write("{}"))
    assert synced == [(False, False), (True, True)]  # the file, not yet renamed; then its folder


def test_atomic_write_cleans_up_after_an_interrupt(tmp_path):
    # Ctrl-C while a checkpoint is written is no Exception, and must not leave a temporary.
    target = tmp_path / "state.json"
    target.write_text("old")

    def interrupted(tmp):
        open(tmp, "w").write("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.atomic_write(target, interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"] and target.read_text() == "old"


def test_atomic_write_never_takes_a_temporary_name_another_writer_holds(tmp_path, monkeypatch):
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(ck.secrets, "token_hex", lambda n: next(names))
    theirs = tmp_path / ".state.json.aaaa.tmp"  # another process's write in progress
    theirs.write_text("theirs")
    ck.atomic_write(tmp_path / "state.json", lambda tmp: open(tmp, "w").write("mine"))
    assert theirs.read_text() == "theirs" and (tmp_path / "state.json").read_text() == "mine"


def test_atomic_write_temporaries_are_hidden_and_found_by_the_resume_cleanup(tmp_path):
    # The Trainer removes leftovers of an interrupted checkpoint write by the pattern
    # ".step_*.tmp"; a temporary named otherwise would pile up (or be taken for a checkpoint).
    seen = []
    ck.atomic_write(tmp_path / "step_00000001.pt", lambda tmp: seen.append(os.path.basename(tmp)) or
                    open(tmp, "wb").write(b"x"))  # fmt: skip
    (name,) = seen
    assert fnmatch.fnmatch(name, ".step_*.tmp") and name != ".step_00000001.pt.tmp"


# --- save() -------------------------------------------------------------------------------------


def test_save_writes_the_given_state_dict_even_when_its_tensors_are_not_contiguous(tmp_path, inputs):
    # A gathered or transposed state need not be contiguous; safetensors refuses such tensors.
    model = _noisy("epg-tiny")
    other = _noisy("epg-tiny")
    state = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in other.state_dict().items()}
    assert any(not v.is_contiguous() for v in state.values())
    ck.save(model, tmp_path / "net", state_dict=state)
    assert torch.equal(ck.load(tmp_path / "net")(*inputs), other(*inputs))  # the state, not the model's


def test_a_failed_save_into_an_existing_folder_leaves_the_folder_and_its_files(tmp_path, monkeypatch):
    # Only a folder save() created is removed when it fails: a user's folder is not rmtree'd.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")

    def full(state, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OSError):
        ck.save(build("epg-tiny"), folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


# --- load() -------------------------------------------------------------------------------------


def test_a_config_json_without_metadata_loads_with_empty_metadata(tmp_path, inputs):
    # "metadata" may be absent (a folder written by hand or by an older epg).
    model = _noisy("epg-tiny")
    ck.save(model, tmp_path, metadata={"step": 3})
    payload = json.loads((tmp_path / "config.json").read_text())
    del payload["metadata"]
    (tmp_path / "config.json").write_text(json.dumps(payload))
    assert ck.read_config(tmp_path) == (model.config, {})
    assert torch.equal(ck.load(tmp_path)(*inputs), model(*inputs))


def test_a_folder_without_its_weights_file_says_so(tmp_path):
    ck.save(build("epg-tiny"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"no model.safetensors in {tmp_path}"):
        ck.load(tmp_path)


def test_another_safetensors_file_in_a_folder_is_not_checked_against_the_folders_digest(tmp_path, inputs):
    # The recorded digest is of model.safetensors; a second weights file of the same
    # architecture (another step, say) loads with the folder's config.
    ck.save(_noisy("epg-tiny"), tmp_path / "a")
    other = _noisy("epg-tiny")
    ck.save(other, tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").rename(tmp_path / "a" / "other.safetensors")
    assert torch.equal(ck.load(tmp_path / "a" / "other.safetensors")(*inputs), other(*inputs))


def test_a_long_list_of_bad_keys_is_cut_to_twelve_and_says_how_many_more(tmp_path):
    # A stage-1 file read with a stage-2 config: hundreds of keys, the message stays readable.
    torch.save(build("rcm-tiny").state_dict(), tmp_path / "enc.pth")
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_official(tmp_path / "enc.pth", "epg-tiny")
    msg = str(err.value)
    missing = sorted(set(build("epg-tiny").state_dict()) - set(build("rcm-tiny").state_dict()))
    assert len(missing) > 12
    assert f"{len(missing)} missing key(s): {', '.join(missing[:12])}, ... ({len(missing) - 12} more)" in msg
    assert missing[12] not in msg.split("unexpected")[0]


def test_a_stage_one_file_read_as_stage_two_is_not_taken_for_an_unconditional_network(tmp_path):
    # No class embedding and no decoder: a wrong file, reported against the config as asked
    # (with its class embedding), not against an unconditional variant.
    torch.save(build("rcm-tiny").state_dict(), tmp_path / "enc.pth")
    with pytest.raises(ck.CheckpointError, match=r"missing key\(s\): class_embed.weight") as err:
        ck.load_official(tmp_path / "enc.pth", "epg-tiny")
    assert "num_classes=10" in str(err.value)


# --- official files as training code writes them -----------------------------------------------


def test_a_training_checkpoint_with_online_and_ema_networks_loads_the_ema_one(tmp_path, inputs):
    # The official trainer's files hold both; the EMA network is the one that samples.
    ema, online = _noisy("epg-tiny"), _noisy("epg-tiny")
    torch.save({"nnet": online.state_dict(), "nnet_ema": ema.state_dict(), "step": torch.tensor(9)},
               tmp_path / "ckpt.pth")  # fmt: skip
    assert torch.equal(ck.load_official(tmp_path / "ckpt.pth", "epg-tiny")(*inputs), ema(*inputs))


def test_a_dict_of_two_unnamed_state_dicts_is_refused_as_ambiguous(tmp_path):
    sd = build("epg-tiny").state_dict()
    torch.save({"first": sd, "second": dict(sd)}, tmp_path / "two.pth")
    with pytest.raises(ck.CheckpointError, match=r"keys \['first', 'second'\].*wrapping exactly one \(found 2\)"):
        ck.load_official(tmp_path / "two.pth", "epg-tiny")


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_a_state_dict_saved_from_a_compiled_or_ddp_wrapped_network_loads(tmp_path, inputs, prefix):
    # torch.compile's wrapper prefixes every key with "_orig_mod.", DDP's with "module.", nested
    # either way round (compile(DDP(net)) gives "_orig_mod.module.").
    model = _noisy("epg-tiny")
    torch.save({f"{prefix}{k}": v for k, v in model.state_dict().items()}, tmp_path / "c.pth")
    assert torch.equal(ck.load_official(tmp_path / "c.pth", "epg-tiny")(*inputs), model(*inputs))


@pytest.mark.parametrize("content, what", [
    (b"", "the file is empty"),
    (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "it is an HTML page, probably a failed download"),
], ids=["empty", "html"])  # fmt: skip
def test_a_config_json_that_is_no_json_says_what_it_is(tmp_path, content, what):
    # A failed copy or download of the folder leaves such a config.json next to good weights.
    ck.save(build("epg-tiny"), tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ck.CheckpointError, match=rf"config.json is not a valid epg config \({what}"):
        ck.load(tmp_path)
