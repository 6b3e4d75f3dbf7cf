"""InMemoryLoader: the documented order, sharding, checks and resume."""

import pytest
import torch

from epg.data.loader import InMemoryLoader


def _rows(n=23, width=3):
    x = torch.arange(n * width, dtype=torch.float32).view(n, width)
    return {"image": x, "label": torch.arange(n)}


def _order(seed, epoch, n):
    """The module docstring's order: randperm(N) from a generator seeded with seed·1_000_003 + e."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(n, generator=g)


@pytest.mark.parametrize("seed", [0, 7, 2**45 + 5])  # the last one overflowed torch's seed before
def test_batches_follow_the_documented_order_across_epochs(seed):
    data = _rows()
    loader = InMemoryLoader(data, 5, seed=seed)
    assert loader.batches_per_epoch == 4  # 23 // 5: the partial batch is dropped
    for step in range(9):  # over two epoch boundaries
        epoch, index = divmod(step, 4)
        batch = next(loader)
        expected = _order(seed, epoch, 23)[index * 5 : (index + 1) * 5]
        assert torch.equal(batch["label"], expected)
        assert torch.equal(batch["image"], data["image"][expected])


def test_two_ranks_split_each_global_batch():
    data = _rows()
    whole = InMemoryLoader(data, 6, seed=2)
    ranks = [InMemoryLoader(data, 6, rank=r, world_size=2, seed=2) for r in (0, 1)]
    for _ in range(5):
        parts = [next(r)["label"] for r in ranks]
        assert all(p.shape == (3,) for p in parts)
        assert torch.equal(torch.cat(parts), next(whole)["label"])


def test_resume_continues_exactly_including_at_an_epoch_end():
    data = _rows()
    for stop in (3, 4, 6):  # 4 batches per epoch: stop at, before and after a boundary
        straight = InMemoryLoader(data, 5, seed=1)
        expected = [next(straight)["label"] for _ in range(stop + 4)][stop:]
        first = InMemoryLoader(data, 5, seed=1)
        for _ in range(stop):
            next(first)
        state = first.state_dict()
        resumed = InMemoryLoader(data, 5, seed=9)  # the state's seed wins
        resumed.load_state_dict(state)
        assert resumed.seed == 1
        got = [next(resumed)["label"] for _ in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_different_global_batch_cannot_resume():
    loader = InMemoryLoader(_rows(), 5)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="global batch 5, this run 4"):
        InMemoryLoader(_rows(), 4).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch_size=6, rank=2, world_size=2), r"rank 2 is not in 0\.\.1"),
        (dict(global_batch_size=6, rank=-1, world_size=2), r"rank -1 is not in 0\.\.1"),
        (dict(global_batch_size=6, world_size=0), "rank 0 is not in"),
        (dict(global_batch_size=5, world_size=2), "global batch size 5 is not divisible by 2 ranks"),
        (dict(global_batch_size=0), "global batch size 0"),
        (dict(global_batch_size=24), r"exceeds the dataset \(23 samples\)"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InMemoryLoader(_rows(), **kwargs)


def test_bad_tensors_are_refused():
    with pytest.raises(ValueError, match="at least one tensor"):
        InMemoryLoader({}, 1)
    with pytest.raises(ValueError, match="same number of rows"):
        InMemoryLoader({"image": torch.zeros(4, 2), "label": torch.zeros(3)}, 2)
