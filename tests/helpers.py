"""Shared test helpers: tolerance rule, a verbose comparison, tiny configs, torchrun."""

import os
import subprocess
import sys

import torch

# atol / rtol floors by dtype (style.md B4).
FLOORS = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1e-1, 1.6e-2),
}


def assert_close(actual, expected, atol=None, rtol=None, what=""):
    """assert_close that names the worst element and both values on failure."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if atol is None:
        atol, rtol = FLOORS[expected.dtype if expected.is_floating_point() else torch.float64]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.to(actual.device).double()
    err = (a - e).abs() - rtol * e.abs()
    # A NaN against anything but NaN, or an infinity against another value, is the worst
    # mismatch: max() over a NaN compares False and would let it, and every other element, through.
    err = torch.where((a == e) | (a.isnan() & e.isnan()), 0.0, err.nan_to_num(nan=float("inf")))
    if err.numel() and err.max() > atol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: worst at {idx}: got {a[idx].item():.10g}, expected {e[idx].item():.10g} "
            f"(atol {atol}, rtol {rtol})"
        )


# 16-px, 1-channel tiny networks: the digits the Trainer loads by default.
TINY = dict(img_size=16, patch_size=4, in_channels=1)


def tiny_train_config(tmp_path, mode="diffusion", **kw):
    """A few-step TrainConfig of the tiny networks on 16-px digits, writing under tmp_path."""
    from epg.train import TrainConfig

    base = dict(
        mode=mode,
        model="rcm-tiny" if mode == "pretrain" else "epg-tiny",
        model_overrides=dict(TINY),
        run_dir=str(tmp_path / "run"),
        steps=6,
        batch_size=8,
        lr=1e-3,
        warmup_steps=2,
        ckpt_every=3,
        log_every=1,
        compile=False,
        progress=False,
        seed=3,
        ema_decay=0.9,
    )
    if mode == "pretrain":
        del base["ema_decay"]  # stage 1 has no model EMA (its target EMA is target_ema)
        base["augment"] = dict(crop_scale=(0.5, 1.0), flip_p=0.0)
        base["objective"] = dict(s0=4, s1=16)
    if mode == "consistency":
        base["model_overrides"]["drop"] = 0.5
        base["objective"] = dict(stage_length=3)
    base.update(kw)
    return TrainConfig(**base)


def torchrun(tmp_path, nproc, port, *args, timeout=300):
    """``python -m torch.distributed.run --nproc_per_node nproc --master_port port *args``, one
    thread per process (two processes share this machine's cores); returns the finished process.
    TMPDIR points into tmp_path: torchrun leaves a ``torchelastic_*`` folder in the temporary
    directory at every launch, which would otherwise pile up in /tmp."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(port), *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def signal_in_call(trainer, call, *signals):
    """Sends ``signals`` to this process during the ``call``-th loss computation of ``trainer``
    (handled between bytecodes, as a signal from outside)."""
    real_loss, calls = trainer.loss_fn, []

    def signalled(batch, draws):
        calls.append(1)
        if len(calls) == call:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real_loss(batch, draws)

    trainer.loss_fn = signalled


def _single_threaded(rank, fn, *args):
    # A forked child must not enter an OpenMP parallel region: the parent's thread pool did not
    # come along, and an op's region (BatchNorm's, seen) would wait on it forever.
    torch.set_num_threads(1)
    fn(rank, *args)


def fork_ranks(fn, nprocs, *args):
    """``fn(rank, *args)`` in ``nprocs`` forked processes (they inherit the imported torch, where
    spawn would re-import it, ~15 s here), each single-threaded; returns when all have ended."""
    import torch.multiprocessing as mp

    mp.start_processes(_single_threaded, args=(fn, *args), nprocs=nprocs, start_method="fork")
