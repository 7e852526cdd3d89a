#!/usr/bin/env python
"""Write the Fashion-MNIST subset committed for tests and `table3_mini.py --quick`: the first 3000 training and the
first 1000 test images with their labels (uint8), from the Debian package `dataset-fashion-mnist` (MIT, Zalando SE).

    python examples/experiments/make_fashion_mnist_subset.py      # writes tests/data/fashion_mnist_subset.npz
"""

import argparse
from pathlib import Path

import numpy as np
from table3_mini import DEBIAN_DATA, SUBSET_DATA, load_fashion_mnist


SIZES = {"train": 3000, "test": 1000}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEBIAN_DATA, help="folder with the Fashion-MNIST idx .gz files")
    parser.add_argument("--output", type=Path, default=SUBSET_DATA)
    return parser.parse_args(argv)


def main(args: argparse.Namespace):
    data = load_fashion_mnist(args.data)
    arrays = {}
    for split, size in SIZES.items():
        images, labels = data[split]
        arrays[f"{split}_images"] = images[:size]
        arrays[f"{split}_labels"] = labels[:size].astype(np.uint8)
    np.savez_compressed(args.output, **arrays)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(parse_args())
