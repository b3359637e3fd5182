"""Write a small generated-image set for `data.generated`, synthesised from the training split
(class-conditional mixtures of two real images; lipnext.data.synthetic says how).

    python examples/generated_mixtures.py --data npz:../shared/data/cifar10-subset.npz \
        --holdout 1000 --images 2000 --out runs/generated/cifar10-subset-mixtures.npz
    lipnext train --config configs/cifar10_subset_cpu.yaml \
        data.generated=npz:runs/generated/cifar10-subset-mixtures.npz data.generated_fraction=0.75

Only the train split is read (the val and test splits of the same --holdout and
--val-fraction never enter the set), so pass the values the training config uses.
"""
from __future__ import annotations

import argparse

from lipnext.data import get_dataset
from lipnext.data.synthetic import class_mixtures, save_generated


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset spec of the real images, e.g. npz:<file>")
    p.add_argument("--holdout", type=int, default=None, help="the last N images are the test split")
    p.add_argument("--val-fraction", type=float, default=None, help="share of the rest kept for validation")
    p.add_argument("--images", type=int, default=2000, help="number of images to synthesise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the .npz to write")
    a = p.parse_args()
    opts = {k: v for k, v in (("holdout", a.holdout), ("val_fraction", a.val_fraction)) if v is not None}
    train = get_dataset(a.data, "train", **opts)
    x, y, _ = class_mixtures(train, a.images, a.seed)
    path = save_generated(a.out, x, y, train.classes)
    print(f"{path}: {len(y)} images {x.shape[1:]} from {len(train)} training images of {a.data} (seed {a.seed})")


if __name__ == "__main__":
    main()
