"""Checkpoint I/O: epg's safetensors format, official layouts, unsafe and corrupt files."""

import json
import os

import pytest
import torch

from epg import checkpoint as ck
from epg.models import build


def _noisy(name, **overrides):
    model = build(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.fixture
def inputs():
    return torch.randn(2, 3, 32, 32), torch.randn(2) * 100, torch.tensor([1, 7])


def test_safetensors_round_trip(tmp_path, inputs):
    model = _noisy("epg-tiny")
    ck.save(model, tmp_path / "run", metadata={"step": 12})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ck.load(tmp_path / "run")
    assert loaded.config == model.config
    assert torch.equal(loaded(*inputs), model(*inputs))
    assert ck.read_config(tmp_path / "run")[1] == {"step": 12}
    assert all(p.requires_grad for p in loaded.parameters())


def test_loaded_networks_sample_in_eval_mode(tmp_path, inputs):
    # Both loaders returned train mode: with the consistency models' decoder dropout (0.5), a
    # user sampling straight from a loaded network got randomly dropped attention outputs.
    model = build("epg-tiny", drop=0.5).eval()
    ck.save(model, tmp_path / "run")
    torch.save(model.state_dict(), tmp_path / "nnet_ema.pth")
    for loaded in (ck.load(tmp_path / "run"), ck.load_official(tmp_path, "epg-tiny", drop=0.5)):
        assert not any(m.training for m in loaded.modules())
        assert torch.equal(loaded(*inputs), model(*inputs))


def test_round_trip_keeps_overridden_architecture(tmp_path):
    model = build("epg-tiny", in_channels=1, num_classes=3, decoder_depth=1)
    ck.save(model, tmp_path)
    assert ck.load(tmp_path / "model.safetensors").config == model.config


def test_rcm_round_trip_keeps_batchnorm_buffers(tmp_path):
    model = _noisy("rcm-tiny")
    model.train()(torch.randn(4, 3, 32, 32), torch.randn(4))  # moves the running statistics
    model.eval()
    ck.save(model, tmp_path)
    loaded = ck.load(tmp_path).eval()
    x, t = torch.randn(3, 3, 32, 32), torch.randn(3)
    assert torch.equal(loaded(x, t)[0], model(x, t)[0])


@pytest.mark.parametrize("layout", ["dir_ema", "dir_nnet_only", "bare", "wrapped", "module_prefix"])
def test_official_layouts_load_unchanged(tmp_path, inputs, layout):
    model = _noisy("epg-tiny")
    sd = model.state_dict()
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}
    if layout == "dir_ema":
        torch.save(sd, tmp_path / "nnet_ema.pth")
        torch.save(decoy, tmp_path / "nnet.pth")  # the EMA file is preferred
        path = tmp_path
    elif layout == "dir_nnet_only":
        torch.save(sd, tmp_path / "nnet.pth")
        path = tmp_path
    elif layout == "bare":
        path = tmp_path / "EPG-tiny.pth"
        torch.save(sd, path)
    elif layout == "wrapped":
        path = tmp_path / "wrapped.pth"
        torch.save({"step": torch.tensor(5), "nnet_ema": sd, "note": "x"}, path)
    else:
        path = tmp_path / "ddp.pth"
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    loaded = ck.load_official(path, "epg-tiny")
    assert torch.equal(loaded(*inputs), model(*inputs))


def test_an_official_file_without_a_class_embedding_loads_unconditional(tmp_path, inputs):
    model = _noisy("epg-tiny", num_classes=0)
    torch.save(model.state_dict(), tmp_path / "nnet_ema.pth")
    loaded = ck.load_official(tmp_path, "epg-tiny")
    assert loaded.config.num_classes == 0
    x, t, _ = inputs
    assert torch.equal(loaded(x, t, None), model(x, t, None))
    with pytest.raises(ck.CheckpointError, match=r"1 missing key\(s\): class_embed.weight"):
        ck.load_official(tmp_path, "epg-tiny", num_classes=10)  # asked for, so strict as ever
    with pytest.raises(ck.CheckpointError, match="missing key"):  # a stage-1 file is no such case
        ck.load_official(tmp_path, "rcm-tiny")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_float32(tmp_path, inputs, dtype):
    model = _noisy("epg-tiny")
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")
    loaded = ck.load_official(tmp_path / "half.pth", "epg-tiny")
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    widened = _noisy("epg-tiny")
    widened.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    assert torch.equal(loaded(*inputs), widened(*inputs))  # samples like the widened weights


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "nnet_ema.pth"
    torch.save({"cls_token": Exploit()}, path)
    with pytest.raises(ck.CheckpointError, match="refusing to load.*could run code") as err:
        ck.load_official(tmp_path, "epg-tiny")
    assert not marker.exists()
    assert "posix.system" in str(err.value) and "False" not in str(err.value)  # no weights_only=False


_LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
                b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 123456\n")  # fmt: skip


def _truncated_checkpoint(tmp_path):
    torch.save(build("epg-tiny").state_dict(), tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    return data[: len(data) // 2]


def _truncated_legacy_checkpoint(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "whole.pth", _use_new_zipfile_serialization=False)
    return (tmp_path / "whole.pth").read_bytes()[:60]  # within the pickle: EOF while unpickling


def _legacy_checkpoint_cut_in_its_tensors(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.pth", _use_new_zipfile_serialization=False)
    return (tmp_path / "whole.pth").read_bytes()[:-100]  # torch: "unexpected EOF, expected 100 more bytes"


@pytest.mark.parametrize("content, expected", [
    pytest.param(b"hello\nnot a checkpoint\n", "not a PyTorch checkpoint: it is a text file, starting 'hello'", id="text"),
    pytest.param(_LFS_POINTER, "not a PyTorch checkpoint: it is a Git LFS pointer.*git lfs pull", id="lfs-pointer"),
    pytest.param(b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>",
                 "not a PyTorch checkpoint: it is an HTML page, probably a failed download", id="html"),
    pytest.param(b"", "not a PyTorch checkpoint: the file is empty", id="empty"),
    pytest.param(_truncated_checkpoint, "corrupt: it begins as a PyTorch checkpoint \\(a zip archive\\).*truncated",
                 id="truncated-zip"),
    # A sign-in page need not start with a doctype.
    pytest.param(b"<html>\n<body>Sign in</body></html>", "not a PyTorch checkpoint: it is an HTML page",
                 id="html-without-doctype"),
    # torch.save's format before PyTorch 1.6 (a pickle, protocol 2), cut short.
    pytest.param(_truncated_legacy_checkpoint,
                 "corrupt: it begins as a PyTorch checkpoint \\(a pickle\\).*truncated", id="truncated-pickle"),
    pytest.param(_legacy_checkpoint_cut_in_its_tensors,
                 "corrupt: it begins as a PyTorch checkpoint \\(a pickle\\).*truncated", id="truncated-pickle-data"),
])  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, content, expected):
    path = tmp_path / "nnet_ema.pth"
    path.write_bytes(content(tmp_path) if callable(content) else content)
    for source in (path, tmp_path):  # the file itself, or the folder that holds it
        with pytest.raises(ck.CheckpointError, match=expected) as err:
            ck.load_official(source, "epg-tiny")
        message = str(err.value)
        assert message.startswith(str(path))
        assert "could run code" not in message and "False" not in message  # no weights_only=False


def test_a_weights_file_that_is_not_safetensors_says_what_it_is(tmp_path):
    run = tmp_path / "run"
    ck.save(build("epg-tiny"), run)
    weights = run / "model.safetensors"
    weights.write_bytes(_LFS_POINTER)
    with pytest.raises(ck.CheckpointError, match=f"{weights} is not a safetensors file: it is a Git LFS pointer"):
        ck.load(run)
    torch.save(build("epg-tiny").state_dict(), weights)
    with pytest.raises(ck.CheckpointError, match="it is a zip archive, as torch.save writes.*load_official"):
        ck.load(weights)
    (run / "config.json").write_bytes(_LFS_POINTER)
    with pytest.raises(ck.CheckpointError, match="config.json is not a valid epg config \\(it is a Git LFS"):
        ck.load(run)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        ck.load(tmp_path / "nope")


def test_a_safetensors_file_given_by_name_is_the_one_loaded(tmp_path, inputs):
    model = _noisy("epg-tiny")
    ck.save(model, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "renamed.safetensors")
    assert torch.equal(ck.load(tmp_path / "renamed.safetensors")(*inputs), model(*inputs))


def test_mismatched_checkpoint_names_the_bad_keys(tmp_path):
    sd = build("epg-tiny").state_dict()
    sd.pop("out.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["class_embed.weight"] = torch.zeros(5, 64)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_official(tmp_path / "bad.pth", "epg-tiny")
    msg = str(err.value)
    assert "1 missing key(s): out.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "class_embed.weight: checkpoint (5, 64) vs model (11, 64)" in msg


def test_mismatch_in_a_folder_names_the_file_read(tmp_path):
    sd = build("epg-tiny").state_dict()
    sd.pop("out.bias")
    torch.save(sd, tmp_path / "nnet.pth")  # the fallback when nnet_ema.pth is absent
    with pytest.raises(ck.CheckpointError, match=r"nnet\.pth does not fit EPGViT.*missing key\(s\): out\.bias"):
        ck.load_official(tmp_path, "epg-tiny")


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds none of"):
        ck.load_official(tmp_path, "epg-tiny")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ck.load_official(tmp_path / "nope.pth", "epg-tiny")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.load_official(tmp_path / "trunc.pth", "epg-tiny")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ck.CheckpointError, match="not a state dict"):
        ck.load_official(tmp_path / "list.pth", "epg-tiny")

    run = tmp_path / "run"
    ck.save(build("epg-tiny"), run)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.load(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="not a valid epg config"):
        ck.load(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ck.load(tmp_path / "empty")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "state.json"
    ck.atomic_write(target, lambda tmp: open(tmp, "w").write(json.dumps({"v": 1})))

    def failing(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ck.atomic_write(target, failing)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)],
                         ids=["umask-022", "umask-027", "umask-002"])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        ck.save(build("epg-tiny"), tmp_path / "run")
        ck.atomic_write(tmp_path / "state.json", lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(previous)
    for path in (tmp_path / "run" / "model.safetensors", tmp_path / "run" / "config.json",
                 tmp_path / "state.json"):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path


def test_save_refuses_a_foreign_module(tmp_path):
    with pytest.raises(TypeError, match="epg network"):
        ck.save(torch.nn.Linear(2, 2), tmp_path)


def test_a_folder_whose_name_is_not_utf8_loads(tmp_path, inputs):
    # safetensors refuses such a path, and the error used to call the file corrupt.
    model = _noisy("epg-tiny")
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/run\xff")
    ck.save(model, folder)
    assert torch.equal(ck.load(folder)(*inputs), model(*inputs))


def test_a_checksummed_save_can_be_checked_even_where_the_process_turned_checksums_off(tmp_path):
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        ck.torch_save_checksummed(state, tmp_path / "on.pt")
        assert not torch.serialization.get_crc32_options()  # the process's choice is left as it was
        torch.save(state, tmp_path / "off.pt")
    finally:
        torch.serialization.set_crc32_options(was)
    assert ck.zip_damage(tmp_path / "on.pt") is None
    assert "do not match the checksum" in ck.zip_damage(tmp_path / "off.pt")  # why the wrapper exists
    (tmp_path / "cut.pt").write_bytes((tmp_path / "on.pt").read_bytes()[:-100])
    assert "archive structure is damaged" in ck.zip_damage(tmp_path / "cut.pt")


def test_a_weights_file_changed_after_saving_is_refused_by_its_recorded_digest(tmp_path):
    ck.save(_noisy("epg-tiny"), tmp_path / "run")
    weights, config = tmp_path / "run" / "model.safetensors", tmp_path / "run" / "config.json"
    assert json.loads(config.read_text())["weights_sha256"] == ck.weights_digest(weights)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes: safetensors reads it as a different weight
    weights.write_bytes(bytes(data))
    for path in (tmp_path / "run", weights):
        with pytest.raises(ck.CheckpointError, match=r"model.safetensors is damaged: its SHA-256 is not the one recorded"):
            ck.load(path)
    # A folder without a recorded digest (written before it was, or by hand) loads as it is.
    payload = json.loads(config.read_text())
    del payload["weights_sha256"]
    config.write_text(json.dumps(payload))
    ck.load(tmp_path / "run")


def test_checked_weights_digest_takes_the_recorded_one_that_load_checks(tmp_path):
    ck.save(_noisy("epg-tiny"), tmp_path / "run")
    weights, config = tmp_path / "run" / "model.safetensors", tmp_path / "run" / "config.json"
    actual = ck.weights_digest(weights)
    other = tmp_path / "run" / "copy.safetensors"  # not the file load() checks: hashed
    other.write_bytes(weights.read_bytes())
    payload = json.loads(config.read_text())
    payload["weights_sha256"] = "sha256:recorded"
    config.write_text(json.dumps(payload))
    assert ck.checked_weights_digest(tmp_path / "run") == "sha256:recorded"
    assert ck.checked_weights_digest(weights) == "sha256:recorded"
    assert ck.checked_weights_digest(other) == actual
    del payload["weights_sha256"]  # nothing recorded: hashed
    config.write_text(json.dumps(payload))
    assert ck.checked_weights_digest(tmp_path / "run") == actual


@pytest.mark.parametrize(
    "edit, message",
    [({"weights_sha256": 5}, r"'weights_sha256' must be a string 'sha256:<hex>', got 5; delete the key"),
     ({"weights_sha256": "deadbeef"}, r"'weights_sha256' must be a string 'sha256:<hex>', got \"deadbeef\""),
     ({"metadata": None}, r'"metadata" must be a JSON object or absent, got null'),
     ({"config": 5}, r'"config" must be a JSON object \(the network config\), got 5'),
     ({"config": None, "drop": "config"}, r'no "config" key \(the network config that save\(\) writes\)')],
    ids=["digest-not-a-string", "digest-without-its-prefix", "metadata-null", "config-not-an-object", "no-config"],
)  # fmt: skip
def test_a_hand_edited_config_json_is_refused_naming_the_key(tmp_path, edit, message):
    # A non-string digest skipped the weights check without a word; a null metadata was an
    # AttributeError in `epg sample`; a missing config said only "'config'".
    ck.save(_noisy("epg-tiny"), tmp_path / "run")
    config = tmp_path / "run" / "config.json"
    payload = json.loads(config.read_text())
    payload.update({k: v for k, v in edit.items() if k != "drop"})
    payload.pop(edit.get("drop"), None)
    config.write_text(json.dumps(payload))
    with pytest.raises(ck.CheckpointError, match=rf"config.json is not a valid epg config: {message}"):
        ck.load(tmp_path / "run")


def test_save_takes_the_network_inside_torch_compile(tmp_path, inputs):
    # The compiled wrapper's keys carry "_orig_mod.": saved as such, load() refused the folder.
    model = _noisy("epg-tiny")
    ck.save(torch.compile(model), tmp_path / "net")
    assert torch.equal(ck.load(tmp_path / "net")(*inputs), model(*inputs))


def test_load_takes_a_finished_run_folder_and_names_the_files_it_cannot_read(tmp_path, inputs):
    model = _noisy("epg-tiny")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000003.pt").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match=r"has not finished.*`epg export .*run`"):
        ck.load(run)
    ck.save(model, run / "final")
    assert torch.equal(ck.load(run)(*inputs), model(*inputs))
    with pytest.raises(ck.CheckpointError, match=r"step_00000003.pt is a training checkpoint; `epg export"):
        ck.load(run / "checkpoints" / "step_00000003.pt")
    torch.save(model.state_dict(), tmp_path / "net.pth")
    with pytest.raises(ck.CheckpointError, match=r"net.pth is not an epg checkpoint.*load_official"):
        ck.load(tmp_path / "net.pth")
    (tmp_path / "official").mkdir()
    (tmp_path / "net.pth").rename(tmp_path / "official" / "nnet_ema.pth")
    with pytest.raises(ck.CheckpointError, match=r"holds an official EPG checkpoint \(nnet_ema.pth\).*load_official"):
        ck.load(tmp_path / "official")
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device name \(cpu, cuda, cuda:N\)"):
        ck.load(run, device="gpu")


def test_a_full_disk_while_saving_is_an_os_error_naming_the_file_and_leaves_no_folder(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(state, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OSError, match=r"net/model.safetensors cannot be written: No space left on device") as err:
        ck.save(build("epg-tiny"), tmp_path / "net")
    assert err.value.errno == 28
    assert not (tmp_path / "net").exists()  # nothing that looks like a half-saved network
