from __future__ import annotations

import numpy as np
import pytest
import torch

from pat.ensemble import corrupt, corrupt_split, list_corruptions, load_cifar_c
from pat.errors import PatError

NAMES = list_corruptions()
NOISE = ["gaussian_noise", "shot_noise", "impulse_noise"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # smooth images with texture, away from 0 and 1 so that clipping does not hide changes
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    base = 0.2 + 0.6 * (0.5 + 0.5 * torch.sin(6 * xx + 4 * yy))
    return (base.expand(4, 3, 32, 32) * torch.rand(4, 3, 1, 1, generator=g).add(0.5).clamp(max=1)).contiguous()


def test_names() -> None:
    assert NAMES == ["gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast",
                     "brightness", "pixelate", "jpeg_compression"]


@pytest.mark.parametrize("name", NAMES)
def test_shape_range_seed_and_severity(name, images) -> None:
    outs = [corrupt(images, name, s, seed=5) for s in range(1, 6)]
    for out in outs:
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(corrupt(images, name, 3, seed=5), outs[2])
    dist = [float((o - images).abs().mean()) for o in outs]
    assert dist[0] > 0 and dist[4] > dist[0], dist
    assert not torch.equal(outs[0], outs[4])


@pytest.mark.parametrize("name", NOISE)
def test_noise_grows_with_severity_and_depends_on_seed(name, images) -> None:
    dist = [float((corrupt(images, name, s, seed=1) - images).abs().mean()) for s in range(1, 6)]
    assert all(a < b for a, b in zip(dist[:-1], dist[1:], strict=True)), dist
    assert not torch.equal(corrupt(images, name, 2, seed=1), corrupt(images, name, 2, seed=2))


def test_jpeg_alias_and_brightness_raises_the_value_channel(images) -> None:
    assert torch.equal(corrupt(images, "jpeg", 2), corrupt(images, "jpeg_compression", 2))
    out = corrupt(images, "brightness", 4)  # + 0.2 on the HSV value
    torch.testing.assert_close(out.amax(1), (images.amax(1) + 0.2).clamp(max=1))


def test_corrupt_split_on_uint8(images) -> None:
    x = (images * 255).round().to(torch.uint8)
    out = corrupt_split(x, "contrast", 5, batch_size=3)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    expected = (corrupt(x.float() / 255, "contrast", 5) * 255).round().to(torch.uint8)
    assert torch.equal(out, expected)  # contrast is deterministic, so batching does not matter
    with pytest.raises(PatError, match="x must be uint8 images"):
        corrupt_split(images, "contrast", 1)


def test_bad_arguments() -> None:
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(PatError, match="unknown corruption 'fog'"):
        corrupt(x, "fog", 1)
    with pytest.raises(PatError, match=r"severity must be an integer in \[1, 5\]. Got 6."):
        corrupt(x, "contrast", 6)
    with pytest.raises(PatError, match=r"x must be float images \(N, C, H, W\)"):
        corrupt(x[0], "contrast", 1)


def test_load_cifar_c(tmp_path) -> None:
    with pytest.raises(PatError, match="--data-dir"):
        load_cifar_c(tmp_path, "contrast", 1)
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    x = np.arange(5 * 2 * 32 * 32 * 3, dtype=np.int64).reshape(10, 32, 32, 3) % 251
    np.save(folder / "contrast.npy", x.astype(np.uint8))
    np.save(folder / "labels.npy", np.arange(10) % 10)
    images, labels = load_cifar_c(tmp_path, "contrast", 2)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [2, 3]
    assert torch.equal(images[1], torch.from_numpy(x[3].astype(np.uint8)).permute(2, 0, 1))
