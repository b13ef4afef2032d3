"""pat.data: dataset splits, the device-resident loader's batches, bagging, error messages."""

from __future__ import annotations

import urllib.request
from urllib.error import URLError

import pytest
import torch

from pat.data import DeviceLoader, Split, bagging_indices, list_datasets, load_dataset
from pat.data.sources import digits_split
from pat.errors import PatError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _loader(x: torch.Tensor, y: torch.Tensor | None = None, **kw) -> DeviceLoader:
    channels = x.shape[1]
    y = torch.arange(len(x)) if y is None else y
    kw.setdefault("mean", (0.0,) * channels)
    kw.setdefault("std", (1.0,) * channels)
    return DeviceLoader(x, y, **kw)


def _unnormalise(xb: torch.Tensor, loader: DeviceLoader) -> torch.Tensor:
    """Back to uint8-valued floats in [0, 255]."""
    return (xb * loader._scale.reciprocal() + loader._shift / loader._scale).cpu()


def _batches(loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs).cpu(), torch.cat(ys).cpu()


def test_digits_shapes_classes_and_sizes(digits):
    total = len(digits.train) + len(digits.val) + len(digits.test)
    assert total == 1797
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 32)
    assert abs(len(digits.test) - 0.2 * 1797) <= 10  # stratified rounding per class
    assert abs(len(digits.val) - 0.1 * (1797 - len(digits.test))) <= 10
    for part in (digits.train, digits.val, digits.test):
        assert part.x.dtype == torch.uint8 and part.x.shape[1:] == (1, 32, 32)
        assert part.y.dtype == torch.int64 and part.y.shape == (len(part.x),)
        assert set(part.y.tolist()) == set(range(10))
    assert digits.train.x.max() > 200  # 0..16 was rescaled to 0..255, not left as is
    assert not digits.flip and digits.crop_padding == 4
    flat = digits.train.x.double() / 255
    assert digits.mean[0] == pytest.approx(flat.mean().item(), abs=1e-6)
    assert digits.std[0] == pytest.approx(flat.std(unbiased=False).item(), abs=1e-6)


def test_digits_test_split_ignores_seed_and_val_fraction(digits):
    other = load_dataset("digits", seed=7, val_fraction=0.3)
    assert torch.equal(other.test.x, digits.test.x) and torch.equal(other.test.y, digits.test.y)
    assert len(other.val) > len(digits.val)
    y = torch.cat([digits.train.y, digits.val.y, digits.test.y])
    _, val_a, _ = digits_split(y, 0.1, seed=0)
    _, val_b, _ = digits_split(y, 0.1, seed=1)
    assert not torch.equal(val_a, val_b)  # the seed does move val


@pytest.mark.parametrize("val_fraction,seed", [(0.1, 0), (0.25, 3), (0.0, 1)])
def test_digits_splits_disjoint_and_cover(val_fraction, seed):
    from sklearn.datasets import load_digits

    y = torch.as_tensor(load_digits().target)
    train, val, test = digits_split(y, val_fraction, seed)
    everything = torch.cat([train, val, test])
    assert len(everything) == len(y) and len(torch.unique(everything)) == len(y)
    assert len(val) == 0 if val_fraction == 0 else len(val) > 0


def test_in_order_loader_yields_normalised_data_exactly(digits):
    loader = digits.loader("val", batch_size=50)
    x, y = _batches(loader)
    expected = (digits.val.x.float() / 255 - digits.mean[0]) / digits.std[0]
    assert torch.allclose(x, expected, atol=1e-5) and torch.equal(y, digits.val.y)
    assert not loader.shuffle and not loader.augment


def test_augmentation_keeps_shapes_and_pixel_values(digits):
    loader = digits.loader("train", batch_size=64, seed=3)
    assert loader.shuffle and loader.augment
    for xb, yb in loader:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (1, 32, 32) and yb.dtype == torch.int64
        pixels = _unnormalise(xb, loader)
        assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3  # [0, 1] after / 255
        assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # still whole uint8 levels


def test_same_seed_and_epoch_repeat_other_epochs_and_seeds_differ(digits):
    a = digits.loader("train", seed=5)
    b = digits.loader("train", seed=5)
    a.set_epoch(2), b.set_epoch(2)
    xa, ya = _batches(a)
    xb, yb = _batches(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x3, y3 = _batches(a)  # the pass advanced a to epoch 3
    assert a.epoch == 4 and not torch.equal(y3, ya)
    a.set_epoch(2)
    assert torch.equal(_batches(a)[0], xa)  # resuming at epoch 2 replays it
    assert not torch.equal(_batches(digits.loader("train", seed=6))[1], ya)


def test_crop_shifts_known_image():
    # Every pixel holds a distinct nonzero value, so each crop reveals its own shift.
    image = (torch.arange(64, dtype=torch.uint8) + 1).view(1, 1, 8, 8)
    loader = _loader(image.repeat(40, 1, 1, 1), augment=True, flip=False, crop_padding=2)
    x, _ = _batches(loader)
    shifts = set()
    padded = torch.nn.functional.pad(image[0, 0], (2, 2, 2, 2))
    for out in _unnormalise(x, loader).round().to(torch.uint8)[:, 0]:
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out, padded[dy : dy + 8, dx : dx + 8])
        ]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 5 and shifts != {(2, 2)}


@pytest.mark.parametrize("flip", [False, True])
def test_flip_only_when_enabled(flip):
    x = torch.randint(0, 256, (64, 3, 6, 6), dtype=torch.uint8)
    loader = _loader(x, augment=True, flip=flip, crop_padding=0)
    out, y = _batches(loader)
    out = _unnormalise(out, loader).round().to(torch.uint8)
    same = (out == x[y]).flatten(1).all(1)
    mirrored = (out == x[y].flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert mirrored.any() == flip and same.any()


def test_indices_restrict_the_loader():
    x = torch.zeros(50, 1, 4, 4, dtype=torch.uint8)
    keep = torch.tensor([3, 7, 8, 20, 41, 49])
    loader = _loader(x, indices=keep, shuffle=True, augment=True, batch_size=4)
    assert loader.num_samples == 6 and len(loader) == 2
    _, y = _batches(loader)
    assert sorted(y.tolist()) == keep.tolist()
    with pytest.raises(PatError, match="indices"):
        _loader(x, indices=[0, 50])


@pytest.mark.parametrize("drop_last,batches,last", [(False, 3, 2), (True, 2, 4)])
def test_len_with_and_without_drop_last(drop_last, batches, last):
    loader = _loader(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), batch_size=4, drop_last=drop_last)
    sizes = [len(yb) for _, yb in loader]
    assert len(loader) == batches == len(sizes) and sizes[-1] == last


def test_dataset_loader_shares_one_resident_copy(digits):
    a, b = digits.loader("train"), digits.loader("train", indices=torch.arange(10))
    assert a.x.data_ptr() == b.x.data_ptr()


def test_bagging_indices():
    a = bagging_indices(1000, 0.9, seed=1, member=0)
    assert len(a) == 900 and a.dtype == torch.int64
    assert torch.equal(a, a.sort().values) and len(torch.unique(a)) == 900 and a.max() < 1000
    assert torch.equal(a, bagging_indices(1000, 0.9, seed=1, member=0))
    assert not torch.equal(a, bagging_indices(1000, 0.9, seed=1, member=1))
    assert not torch.equal(a, bagging_indices(1000, 0.9, seed=2, member=0))
    assert torch.equal(bagging_indices(7, 1.0, seed=0, member=3), torch.arange(7))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(PatError, match=str(bad)):
            bagging_indices(10, bad, seed=0, member=0)


def test_registry_names_and_errors():
    names = list_datasets()
    assert {
        "cifar10",
        "cifar100",
        "svhn",
        "mnist",
        "fashion-mnist",
        "digits",
        "synthetic",
        "folder:PATH",
    } <= set(names)
    with pytest.raises(PatError, match=r"unknown dataset 'foo'; choose one of: .*cifar10"):
        load_dataset("foo")
    with pytest.raises(PatError, match="val_fraction .*1.5"):
        load_dataset("digits", val_fraction=1.5)
    with pytest.raises(PatError, match="train_size"):
        load_dataset("digits", train_size=10)


@pytest.mark.parametrize(
    "name,error", [("cifar10", OSError("no route to host")), ("mnist", URLError("offline"))]
)
def test_offline_torchvision_dataset_names_data_dir(tmp_path, monkeypatch, name, error):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", refuse)  # torchvision downloads through it
    with pytest.raises(
        PatError, match=rf"dataset '{name}' is not in --data-dir .*could not be downloaded"
    ) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "\n" not in message
    # a data dir that did not exist is not left behind, empty, by the failed download
    with pytest.raises(PatError, match="could not be downloaded"):
        load_dataset(name, data_dir=tmp_path / "new" / "data")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    (kept / "data").mkdir(parents=True)
    (kept / "data" / "notes.txt").write_text("mine")
    with pytest.raises(PatError, match="could not be downloaded"):
        load_dataset(name, data_dir=kept / "data")
    assert (kept / "data" / "notes.txt").read_text() == "mine"
    with pytest.raises(PatError, match="download=False"):
        load_dataset(name, data_dir=tmp_path, download=False)


def test_synthetic_is_seeded_and_honours_options():
    a = load_dataset(
        "synthetic",
        seed=4,
        num_classes=3,
        in_channels=2,
        image_size=16,
        train_size=60,
        test_size=30,
    )
    b = load_dataset(
        "synthetic",
        seed=4,
        num_classes=3,
        in_channels=2,
        image_size=16,
        train_size=60,
        test_size=30,
    )
    assert a.train.x.shape == (54, 2, 16, 16) and len(a.val) == 6 and len(a.test) == 30
    assert a.num_classes == 3 and len(a.mean) == len(a.std) == 2
    assert torch.equal(a.train.x, b.train.x)
    assert not torch.equal(
        a.train.x,
        load_dataset(
            "synthetic",
            seed=5,
            num_classes=3,
            in_channels=2,
            image_size=16,
            train_size=60,
            test_size=30,
        ).train.x,
    )


def test_folder_dataset(tmp_path):
    from PIL import Image

    for part, count in (("train", 4), ("val", 2)):
        for cls, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 12), colour).save(tmp_path / part / cls / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}", val_fraction=0.25, image_size=8)
    assert ds.num_classes == 2 and ds.in_channels == 3 and ds.image_size == 8
    assert len(ds.train) == 6 and len(ds.val) == 2 and len(ds.test) == 4
    assert ds.test.x.shape == (4, 3, 8, 8) and ds.test.y.tolist() == [0, 0, 1, 1]
    assert ds.test.x[0, 0, 0, 0] == 200 and ds.test.x[-1, 2, 0, 0] == 200
    with pytest.raises(PatError, match="train/"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")


def test_split_lookup(digits):
    assert isinstance(digits.split("val"), Split) and digits.split("test") is digits.test
    with pytest.raises(PatError, match="'dev'"):
        digits.split("dev")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_give_the_same_batches(digits):
    cpu = _batches(digits.loader("train", seed=9, device="cpu"))
    gpu = _batches(digits.loader("train", seed=9, device="cuda"))
    assert torch.equal(cpu[1], gpu[1]) and torch.allclose(cpu[0], gpu[0], atol=1e-6)
