"""What the model is fed: the in-memory dataset, the epoch-keyed sampler and loaders, the
binarization keyed by sample index, and the random streams behind all of them."""

from __future__ import annotations

import pytest
import torch

from vae_dist.data import keyed
from vae_dist.data.loaders import EpochShuffleSampler, MnistImages, check_batch_fits, make_loader
from vae_dist.errors import ConfigError


def _grey(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


IMAGES = _grey(300)
IMAGES[7] = 255


def test_a_batch_is_unit_floats_and_its_indices():
    ds = MnistImages(IMAGES)
    idx = [5, 0, 299, 5, 7]
    x, i = ds.__getitems__(idx)
    assert x.dtype == torch.float32 and x.shape == (5, 1, 28, 28)
    assert torch.equal(x, IMAGES[idx].float() / 255.0) and float(x[4].min()) == 1.0  # 255 is exactly 1
    assert i.dtype == torch.int64 and i.tolist() == idx
    assert IMAGES.dtype == torch.uint8 and int(IMAGES[7].min()) == 255  # the divide did not reach the split
    x1, i1 = ds[3]
    assert torch.equal(x1, IMAGES[3:4].float() / 255.0) and i1.tolist() == [3]


def test_the_order_is_a_permutation_that_depends_on_seed_and_epoch_only():
    def order(seed: int, epoch: int) -> list[int]:
        s = EpochShuffleSampler(500, seed)
        s.set_epoch(epoch)
        return list(s)

    first = order(3, 4)
    assert sorted(first) == list(range(500)) and first != list(range(500))
    assert order(3, 4) == first  # no hidden state: rebuilt as is on resume
    assert len({tuple(order(3, e)) for e in range(3)} | {tuple(order(4, 0))}) == 4


def test_the_noise_depends_on_seed_and_epoch_only():
    a = keyed.noise(keyed.TRAIN_NOISE, 7, 3, 50, (4,))
    assert torch.equal(a, keyed.noise(keyed.TRAIN_NOISE, 7, 3, 50, (4,)))
    assert not torch.equal(a, keyed.noise(keyed.TRAIN_NOISE, 7, 4, 50, (4,))) and not torch.equal(a, keyed.noise(keyed.TRAIN_NOISE, 8, 3, 50, (4,)))


def test_shuffle_and_noise_draw_from_independent_streams(monkeypatch):
    """The data order of epoch e+1 and the noise of epoch e (and every other pair of
    purposes and epochs) come from different generator seeds."""
    seeds: list[int] = []
    real = torch.Generator

    class Recording(real):  # type: ignore[misc, valid-type]
        def manual_seed(self, seed):  # type: ignore[override]
            seeds.append(int(seed))
            return super().manual_seed(seed)

    monkeypatch.setattr(torch, "Generator", Recording)
    for seed in (0, 1, 42):
        for epoch in range(4):
            sampler = EpochShuffleSampler(16, seed)
            sampler.set_epoch(epoch)
            list(sampler)
            keyed.noise(keyed.TRAIN_NOISE, seed, epoch, 16, (2,))
            keyed.coins(seed, keyed.train_stream(epoch), 1)
        keyed.noise(keyed.EVAL_NOISE, seed, 0, 16, (2,))
    assert len(seeds) == 3 * 13
    assert len(set(seeds)) == len(seeds), "two purposes share a random stream"


def test_a_shuffled_loader_follows_the_samplers_permutation_and_drops_the_partial_batch():
    loader = make_loader(MnistImages(IMAGES), 64, shuffle_seed=42, drop_last=True, num_workers=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 300 // 64
    for x, idx in batches:
        assert x.shape == (64, 1, 28, 28) and torch.equal(x, IMAGES[idx].float() / 255.0)
    seen = torch.cat([i for _, i in batches]).tolist()
    assert seen == list(EpochShuffleSampler(300, 42))[: len(seen)]
    loader.sampler.set_epoch(1)
    assert torch.cat([i for _, i in loader]).tolist() != seen


def test_an_unshuffled_loader_keeps_everything_in_order():
    loader = make_loader(MnistImages(IMAGES), 128, shuffle_seed=None, drop_last=False, num_workers=0)
    assert [x.shape[0] for x, _ in loader] == [128, 128, 44]
    assert torch.cat([i for _, i in loader]).tolist() == list(range(300))


def test_iterating_a_loader_does_not_touch_the_global_rng():
    loader = make_loader(MnistImages(IMAGES), 32, shuffle_seed=0, drop_last=True, num_workers=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in loader:
        pass
    assert torch.equal(torch.rand(3), expected)


def test_an_epoch_needs_one_global_batch():
    check_batch_fits(128, 64, 2)
    with pytest.raises(ConfigError, match=r"smaller than one global batch \(64 x 2 processes > 127 images\)"):
        check_batch_fits(127, 64, 2)


# --- binarization --------------------------------------------------------------------------


def test_a_samples_coins_depend_on_its_index_not_on_its_batch():
    images = _grey(64).float() / 255
    coins = keyed.coins(42, keyed.train_stream(3), 64)
    whole = keyed.apply(images, coins)
    order = torch.randperm(64)
    assert torch.equal(keyed.apply(images[order], coins[order]), whole[order])  # any batching, any rank
    assert not torch.equal(keyed.apply(images, keyed.coins(42, keyed.train_stream(4), 64)), whole)  # new epoch
    assert not torch.equal(keyed.apply(images, keyed.coins(43, keyed.train_stream(3), 64)), whole)  # new seed


def test_binarization_is_bernoulli_of_the_grey_level():
    level = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand(256, 1, 28, 28).contiguous()
    on = torch.cat([keyed.binarize_split(level, s, 1) for s in range(5)]).float().div(255)  # 5 draws per level
    frequency = on.view(5, 256, -1).mean(dim=(0, 2))  # per level, over 5 x 784 coins
    assert frequency[0] == 0 and frequency[255] == 1  # blank stays blank, ink stays ink
    assert torch.allclose(frequency, torch.arange(256) / 255, atol=0.04)
    # The batch path gives the same bits as the whole-split path.
    coins = keyed.coins(5, 9, 256)
    assert torch.equal(keyed.apply(level.float() / 255, coins) * 255, keyed.binarize_split(level, 5, 9).float())
