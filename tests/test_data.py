"""Dataset loaders on small files written here in the official formats, splits, errors."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from lipnext.data import Augment, get_dataset, load_digits, parse_spec, split_indices
from lipnext.data.cifar import restricted_load


# ---------------------------------------------------------------- npz
def _npz(path, n=50, classes=True, **over):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, (n, 8, 6, 3), dtype=np.uint8), "y": np.arange(n) % 4}
    if classes:
        arrays["classes"] = np.array(["a", "b", "c", "d"])
    arrays.update(over)
    np.savez(path, **arrays)
    return path, arrays


def test_npz_splits_holdout_and_layout(tmp_path):
    path, a = _npz(tmp_path / "d.npz")
    tr = get_dataset(str(path), "train", holdout=10, val_fraction=0.2)
    va = get_dataset(f"npz:{path}", "val", holdout=10, val_fraction=0.2)
    te = get_dataset(f"npz:{path}", "test", holdout=10, val_fraction=0.2)
    assert (len(tr), len(va), len(te)) == (32, 8, 10)
    assert te.num_classes == 4 and te.classes == ["a", "b", "c", "d"]
    assert te.in_chans == 3 and te.image_size == (8, 6)
    x, y = te.tensors()
    assert x.shape == (10, 3, 8, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    # test = the last 10 images, channels-first, scaled to [0, 1]
    np.testing.assert_allclose(x.numpy(), a["x"][-10:].transpose(0, 3, 1, 2) / 255.0, rtol=0, atol=1e-7)
    assert y.tolist() == list(a["y"][-10:])
    # train and val partition the first 40, disjointly; the mean is over those 40 only
    xt, _ = tr.tensors()
    xv, _ = va.tensors()
    rows = {tuple(r) for r in torch.cat([xt, xv]).flatten(1).tolist()}
    assert len(rows) == 40
    expect = a["x"][:40].reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(tr.mean, expect, atol=1e-4)
    assert tr.mean == te.mean


def test_split_indices_partition():
    tr, va, te = (split_indices(100, s, 20, 0.25) for s in ("train", "val", "test"))
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    assert te.tolist() == list(range(80, 100)) and len(va) == 20
    assert (split_indices(100, "val", 20, 0.25) == va).all()   # fixed, independent of any seed


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .npz file"):
        get_dataset(str(tmp_path / "missing.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match=r"not a valid .npz file \(not a zip archive\)"):
        get_dataset(str(bad))
    p, _ = _npz(tmp_path / "noy.npz")
    np.savez(p, x=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no array 'y'"):
        get_dataset(str(p))
    p, _ = _npz(tmp_path / "f.npz", x=np.zeros((50, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        get_dataset(str(p))
    p, _ = _npz(tmp_path / "lab.npz", y=np.arange(50) % 4 + 1)        # label 4 with 4 classes
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\].*\[1, 4\]"):
        get_dataset(str(p))
    p, _ = _npz(tmp_path / "neg.npz", classes=False, y=np.arange(50) % 4 - 1)
    with pytest.raises(ValueError, match="labels must lie"):
        get_dataset(str(p))
    p, _ = _npz(tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="no test split"):
        get_dataset(str(p), "test")
    with pytest.raises(ValueError, match="unknown split"):
        get_dataset(str(p), "training")
    with pytest.raises(TypeError, match="unknown option"):
        get_dataset(str(p), "train", image_size=3)


def test_spec_parsing():
    assert parse_spec("digits") == ("digits", "")
    assert parse_spec("cifar10:/a/b") == ("cifar10", "/a/b")
    assert parse_spec("x/y.npz") == ("npz", "x/y.npz")
    with pytest.raises(ValueError, match="unknown dataset spec"):
        parse_spec("mnist:/data")
    with pytest.raises(ValueError, match="holdout applies"):
        get_dataset("cifar10:/nowhere", holdout=3)


# ---------------------------------------------------------------- digits
def test_digits_default_and_load_digits():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    te = get_dataset("digits", "test")
    assert len(te) == 360 and te.num_classes == 10 and te.in_chans == 1
    assert torch.equal(te.tensors()[1], y[-360:])
    assert len(get_dataset("digits", "train")) + len(get_dataset("digits", "val")) == 1797 - 360


# ---------------------------------------------------------------- CIFAR (official pickles)
def _cifar_file(path, n, labels_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"x", labels_key: list(rng.integers(0, num_classes, n).tolist()),
         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"f"] * n}
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    return d


def test_cifar10_official_layout(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [_cifar_file(root / f"data_batch_{i}", 6, b"labels", 10, i) for i in range(1, 6)]
    test = _cifar_file(root / "test_batch", 7, b"labels", 10, 9)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh, protocol=2)
    te = get_dataset(f"cifar10:{tmp_path}", "test")           # the parent folder works too
    x, y = te.tensors()
    assert x.shape == (7, 3, 32, 32) and te.classes[3] == "c3" and te.num_classes == 10
    np.testing.assert_allclose(x.numpy().reshape(7, -1), test[b"data"] / 255.0, atol=1e-7)
    assert y.tolist() == test[b"labels"]
    tr = get_dataset(f"cifar10:{root}", "train", val_fraction=0.2)
    va = get_dataset(f"cifar10:{root}", "val", val_fraction=0.2)
    assert len(tr) + len(va) == 30 and len(va) == 6
    all_labels = sum((b[b"labels"] for b in batches), [])
    assert sorted(tr.tensors()[1].tolist() + va.tensors()[1].tolist()) == sorted(all_labels)


def test_cifar100_official_layout_and_label_check(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _cifar_file(root / "train", 10, b"fine_labels", 100, 1)
    with open(root / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [b"n"] * 100}, fh, protocol=2)
    d = _cifar_file(root / "test", 5, b"fine_labels", 100, 2)
    te = get_dataset(f"cifar100:{root}", "test")
    assert te.num_classes == 100 and te.tensors()[1].tolist() == d[b"fine_labels"]
    d[b"fine_labels"][0] = 100                                  # out of range
    with open(root / "test", "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 99\]"):
        get_dataset(f"cifar100:{root}", "test")


def test_cifar_errors_and_restricted_unpickler(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR folder"):
        get_dataset(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="official python version"):
        get_dataset(f"cifar10:{tmp_path}")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load global"):
        restricted_load(evil)
    assert not (tmp_path / "pwned").exists()
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not an official CIFAR"):
        restricted_load(junk)


# ---------------------------------------------------------------- image folders (Pillow)
def _jpeg(path, color, size=(8, 8)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=95)


def test_tiny_imagenet_official_layout(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish\nn02\tfrog\n")
    for k, w in enumerate(wnids):
        for i in range(5):
            _jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", (200 * k, 0, 0), (64, 64))
    _jpeg(root / "val" / "images" / "val_0.JPEG", (0, 0, 0), (64, 64))
    _jpeg(root / "val" / "images" / "val_1.JPEG", (200, 0, 0), (64, 64))
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t1\t1\nval_1.JPEG\tn02\t0\t0\t1\t1\n")
    te = get_dataset(f"tiny-imagenet:{tmp_path}", "test")
    x, y = te.tensors()
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 1] and te.classes == ["goldfish", "frog"]
    assert abs(x[1, 0].mean().item() - 200 / 255) < 0.02 and x[0].max() < 0.02
    tr = get_dataset(f"tiny-imagenet:{root}", "train", val_fraction=0.2)
    assert len(tr) == 8 and tr.num_classes == 2
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="not in wnids.txt"):
        get_dataset(f"tiny-imagenet:{root}", "test")
    with pytest.raises(FileNotFoundError, match="not the official Tiny-ImageNet"):
        get_dataset(f"tiny-imagenet:{tmp_path / 'tiny-imagenet-200' / 'train'}")


def test_imagenet_folders_stream(tmp_path):
    pytest.importorskip("PIL")
    for split, n in (("train", 4), ("val", 2)):
        for k, w in enumerate(["n1", "n2", "n3"]):
            for i in range(n):
                _jpeg(tmp_path / split / w / f"{i}.JPEG", (80 * k, 80 * k, 80 * k), (40, 30))
    te = get_dataset(f"imagenet:{tmp_path}", "test", image_size=16)
    assert te.streaming and len(te) == 6 and te.num_classes == 3 and te.image_size == (16, 16)
    img, label = te[5]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and int(label) == 2
    assert abs(img.float().mean().item() - 160) < 4
    loader = torch.utils.data.DataLoader(te, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 16, 16) and yb.tolist() == [0, 0, 1, 1]
    tr = get_dataset(f"imagenet:{tmp_path}", "train", val_fraction=0.25, image_size=16)
    assert len(tr) == 9
    with pytest.raises(FileNotFoundError, match="no ImageNet folder"):
        get_dataset(f"imagenet:{tmp_path / 'x'}")


def test_in_memory_and_streamed_datasets_are_the_same_batch_source(tmp_path):
    """batches(indices, device) and probe(n): float32 in [0, 1] and int64 labels, from memory
    or decoded by DataLoader workers; the same images give the same batches."""
    pytest.importorskip("PIL")
    for k, w in enumerate(["n1", "n2"]):
        for i in range(3):
            _jpeg(tmp_path / "train" / w / f"{i}.png", (90 * k + 30 * i, 40, 200 - 50 * k), (16, 16))
    streamed = get_dataset(f"imagenet:{tmp_path}", "train", val_fraction=0.0, image_size=16, num_workers=1)
    assert streamed.num_workers == 1
    items = [streamed[i] for i in range(len(streamed))]
    from lipnext.data import ArrayDataset
    memory = ArrayDataset(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]), 2, (0.5,) * 3)
    index = [torch.tensor([4, 0, 2]), torch.tensor([5]), torch.tensor([1, 3])]
    a, b = list(memory.batches(index, torch.device("cpu"))), list(streamed.batches(iter(index), "cpu"))
    assert len(a) == len(b) == 3
    x_all, y_all = memory.tensors()
    for idx, (xa, ya), (xb, yb) in zip(index, a, b):
        assert xa.dtype == xb.dtype == torch.float32 and ya.dtype == yb.dtype == torch.int64
        assert torch.equal(xa, x_all[idx]) and torch.equal(ya, y_all[idx])
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for ds in (memory, streamed):
        x, y = ds.probe(4)
        assert torch.equal(x, x_all[:4]) and torch.equal(y, y_all[:4])
        assert ds.probe(100)[0].shape[0] == 6
    assert (memory.streaming, streamed.streaming) == (False, True)
    with pytest.raises(TypeError, match="unknown option"):
        get_dataset("digits", "train", num_workers=2)


# ---------------------------------------------------------------- augmentation
def test_augment_crop_flip_cutout():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    aug = Augment(crop_padding=1, pad_mode="zeros", flip=True)
    p = {"crop": torch.tensor([[1, 1], [0, 2]]), "flip": torch.tensor([False, True])}
    out = aug.apply(x, p)
    assert torch.equal(out[0], x[0])                              # offset (p, p) = no shift
    # image 1: shifted down by 1 (zero row on top) and left by 1 (zero column right), then flipped
    expect = torch.zeros(4, 4)
    expect[1:, :3] = x[1, 0, :3, 1:]
    assert torch.equal(out[1, 0], expect.flip(-1))
    g = torch.Generator().manual_seed(0)
    p = Augment(crop_padding=2, cutout=2).sample(3, (4, 4), g)
    assert p["crop"].min() >= 0 and p["crop"].max() <= 4 and p["cutout"].shape == (3, 2)
    out = Augment(crop_padding=0, flip=False, cutout=2).apply(
        torch.ones(1, 2, 4, 4), {"cutout": torch.tensor([[1, 2]])}, mean=(0.25, 0.5))
    assert out[0, 0, 1:3, 2:4].eq(0.25).all() and out[0, 1, 1:3, 2:4].eq(0.5).all()
    assert out[0, :, 0].eq(1).all()
    with pytest.raises(ValueError, match="pad_mode"):
        Augment(pad_mode="circular")


def test_bad_holdout_and_unscaled_pixels(tmp_path):
    import warnings

    from lipnext.data import ArrayDataset
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((20, 8, 8, 3), np.uint8), y=np.arange(20) % 2)
    for bad in (-5, 1.5):
        with pytest.raises(ValueError, match=f"holdout is the number of images .* got {bad}"):
            get_dataset(str(path), "train", holdout=bad)
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 0, 0] = 255.0
    with pytest.warns(UserWarning, match=r"inputs lie far outside \[0, 1\] \(below -1 or above 2\).*divide"):
        ArrayDataset(x, torch.zeros(2, dtype=torch.long), 2, (0.5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ArrayDataset(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), 2, (0.5,))
