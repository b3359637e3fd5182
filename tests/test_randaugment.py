"""RandAugment on a batch (lipnext.data.randaugment) against PIL, the library torchvision's
RandAugment calls on the PIL images of the LiResNet++ recipe; its draws; its place in Augment."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lipnext.cli import main
from lipnext.config import load_config
from lipnext.data import Augment
from lipnext.data.randaugment import OPS, SIGNED, RandAugment, apply_op, op_values

Image = pytest.importorskip("PIL.Image")
from PIL import ImageEnhance, ImageOps  # noqa: E402


def _images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, C): smooth gradients plus noise, each in its own sub-range of
    0..255 (so autocontrast and equalize have work to do), and one constant image."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size] * (32 / size)
    out = []
    for i in range(n):
        base = rng.uniform(20, 120) + rng.uniform(0, 3) * u + rng.uniform(-2, 2) * v
        img = np.stack([base + rng.normal(0, 15, (size, size)) + rng.uniform(-30, 30)
                        for _ in range(channels)], -1)
        out.append(np.clip(img, 0, 255) if i else np.full_like(img, 77.0))
    return np.stack(out).astype(np.uint8)


def _pil(op: str, im, v: float):
    """What torchvision's RandAugment does to a PIL image for ``op`` at signed value v."""
    if op == "shear_x":     # F.affine(shear=[degrees(atan v), 0], center=[0, 0]): PIL gets the inverse map
        return im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0), Image.NEAREST, fillcolor=0)
    if op == "shear_y":
        return im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0), Image.NEAREST, fillcolor=0)
    if op == "translate_x":  # F.affine(translate=[int(v), 0])
        return im.rotate(0, Image.NEAREST, translate=(int(v), 0), fillcolor=0)
    if op == "translate_y":
        return im.rotate(0, Image.NEAREST, translate=(0, int(v)), fillcolor=0)
    if op == "rotate":
        return im.rotate(v, Image.NEAREST, fillcolor=0)
    enhance = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
               "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}
    if op in enhance:
        return enhance[op](im).enhance(1.0 + v)
    if op == "posterize":
        return ImageOps.posterize(im, int(v))
    if op == "solarize":
        return ImageOps.solarize(im, 255.0 * v)
    if op == "autocontrast":
        return ImageOps.autocontrast(im)
    if op == "equalize":
        return ImageOps.equalize(im)
    return im


def _bounds(op: str, v: float) -> tuple[float, float]:
    """Allowed range of 255 x ours - PIL, in grey levels. PIL computes each op in floating point
    and stores 8 bits, truncating (brightness, color, contrast, sharpness: Image.blend; autocontrast:
    int() in its LUT): ours is up to 1 level above. color and sharpness blend with a degenerate
    image PIL rounds to 8 bits (luma, smoothed image: +-1/2), contrast with the rounded mean of
    rounded luma (+-1): times |f - 1| = |v|. The other ops are exact on 8-bit inputs."""
    eps = 1e-3                                   # float32 x 255
    slack = {"color": 0.5, "sharpness": 0.5, "contrast": 1.0}.get(op, 0.0) * abs(v)
    if op in ("brightness", "color", "contrast", "sharpness", "autocontrast"):
        return -slack - eps, 1.0 + slack + eps
    return -eps, eps


@pytest.mark.parametrize("channels, size", [(3, 32), (3, 64), (1, 8), (1, 24)])
@pytest.mark.parametrize("magnitude", [9, 30])
def test_each_op_matches_pil(channels, size, magnitude):
    imgs = _images(12, size, channels)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    values = op_values(magnitude, 31, (size, size))
    for op in OPS:
        for sign in ((1.0, -1.0) if op in SIGNED else (1.0,)):
            v = values[op] * sign
            ours = 255.0 * apply_op(op, x, torch.full((len(imgs),), v)).permute(0, 2, 3, 1).numpy()
            ref = np.stack([np.asarray(_pil(op, Image.fromarray(im.squeeze(-1) if channels == 1 else im), v))
                            for im in imgs]).reshape(ours.shape).astype(np.float64)
            d = ours - ref
            lo, hi = _bounds(op, v)
            assert lo <= d.min() and d.max() <= hi, (op, v, d.min(), d.max())
            # it did something (except: grey images have no colour; PIL equalizes no image of < 256 pixels)
            if op != "identity" and not (op == "color" and channels == 1) and not (op == "equalize" and size < 16):
                assert not np.array_equal(ref, 255.0 * x.permute(0, 2, 3, 1).numpy()), op


def test_op_values_are_torchvisions_bins():
    v = op_values(9, 31, (32, 32))
    assert v["shear_x"] == pytest.approx(0.09) and v["rotate"] == pytest.approx(9.0)
    assert v["translate_x"] == 4 and op_values(9, 31, (64, 64))["translate_x"] == 8   # int(150/331 * W * 0.3)
    assert v["brightness"] == pytest.approx(0.27) and v["posterize"] == 7 and v["solarize"] == pytest.approx(0.7)
    assert op_values(30, 31, (32, 32))["posterize"] == 4 and op_values(0, 31, (32, 32))["posterize"] == 8
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        apply_op("blur", torch.zeros(1, 1, 4, 4), torch.zeros(1))


def test_batch_is_each_image_through_its_own_ops():
    """The batched apply = each image through its drawn ops in turn, one at a time, bit for bit
    (an image's result does not depend on the batch it is in: the same on any number of ranks)."""
    ra = RandAugment(num_ops=3, magnitude=12, p=0.5)
    x = torch.from_numpy(_images(40, 32, 3, seed=1)).permute(0, 3, 1, 2).float() / 255.0
    params = ra.sample(40, torch.Generator().manual_seed(3), n_augmented=32)
    out = ra.apply(x, params)
    values = op_values(12, 31, (32, 32))
    for i in range(40):
        ref = x[i:i + 1]
        if params["randaugment"][i]:
            for k in range(3):
                op = OPS[int(params["randaugment_ops"][i, k])]
                sign = -1.0 if op in SIGNED and params["randaugment_negative"][i, k] else 1.0
                ref = apply_op(op, ref, torch.tensor([sign * values[op]]))
        assert torch.equal(out[i:i + 1], ref), i
    assert not params["randaugment"][32:].any()                       # rows from n_augmented on: never
    assert torch.equal(out[~params["randaugment"]], x[~params["randaugment"]])


def test_draws_are_uniform_and_reproducible():
    ra = RandAugment(num_ops=2, magnitude=9, p=0.5)
    p = ra.sample(28000, torch.Generator().manual_seed(0))
    assert abs(p["randaugment"].float().mean() - 0.5) < 0.015
    counts = torch.bincount(p["randaugment_ops"].flatten(), minlength=len(OPS)).float() / p["randaugment_ops"].numel()
    assert (counts - 1 / len(OPS)).abs().max() < 0.01
    assert abs(p["randaugment_negative"].float().mean() - 0.5) < 0.015
    again = ra.sample(28000, torch.Generator().manual_seed(0))
    assert all(torch.equal(p[k], again[k]) for k in p)
    assert RandAugment(p=0.0).sample(100, torch.Generator())["randaugment"].sum() == 0
    assert RandAugment(p=1.0).sample(100, torch.Generator())["randaugment"].all()


def test_augment_keeps_its_crop_and_flip_draws_and_spares_generated_rows():
    """Turning RandAugment on leaves crop and flip as they were (its draws come after theirs);
    the draws without it are the ones of earlier lipnext (crop, then flip: bit-identical runs)."""
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    plain = Augment(crop_padding=4).sample(64, (32, 32), g())
    gen = g()
    assert torch.equal(plain["crop"], torch.randint(0, 9, (64, 2), generator=gen))
    assert torch.equal(plain["flip"], torch.rand(64, generator=gen) < 0.5) and set(plain) == {"crop", "flip"}
    aug = Augment(crop_padding=4, randaugment=True, randaugment_p=1.0)
    ra = aug.sample(64, (32, 32), g(), n_real=48)
    assert torch.equal(ra["crop"], plain["crop"]) and torch.equal(ra["flip"], plain["flip"])
    assert ra["randaugment"][:48].all() and not ra["randaugment"][48:].any()
    x = torch.from_numpy(_images(64, 32, 3, seed=2)).permute(0, 3, 1, 2).float() / 255.0
    out, crop_flip = aug.apply(x, ra), Augment(crop_padding=4).apply(x, ra)
    assert torch.equal(out[48:], crop_flip[48:])                       # generated: crop and flip only
    assert sum(not torch.equal(out[i], crop_flip[i]) for i in range(48)) > 40
    # generated rows with their own, smaller crop padding: offsets in {p - q, ..., p + q}
    q = Augment(crop_padding=4, generated_crop_padding=2).sample(4000, (32, 32), g(), n_real=1000)["crop"]
    assert set(q[1000:].flatten().tolist()) == {2, 3, 4, 5, 6} and set(q[:1000].flatten().tolist()) == set(range(9))


def test_config_keys_and_errors():
    cfg = load_config(None, ["augment.randaugment=true"])
    assert (cfg.augment.randaugment_ops, cfg.augment.randaugment_magnitude, cfg.augment.randaugment_p) == (2, 9, 0.5)
    assert not load_config(None).augment.randaugment
    for bad, msg in [("augment.randaugment_magnitude=31", r"randaugment_magnitude must lie in \[0, 30\]"),
                     ("augment.randaugment_p=1.5", "randaugment_p is a probability"),
                     ("augment.randaugment_ops=0", "randaugment_ops must be >= 1"),
                     ("augment.generated_crop_padding=5", "generated_crop_padding must lie in")]:
        with pytest.raises(ValueError, match=msg):
            load_config(None, [bad])
    with pytest.raises(ValueError, match="grey or RGB"):
        RandAugment().apply(torch.zeros(2, 4, 8, 8), RandAugment().sample(2, torch.Generator()))


def test_paper_configs_carry_the_recipes_augmentation():
    """CIFAR and Tiny-ImageNet: LiResNet++'s RandomCrop (zero fill) + flip + RandAugment(2, 9) with
    p = 1/2, generated images cropped with half the padding; ImageNet: RandAugment on every real
    image; the small CPU configs: off."""
    for name, pad, gen_pad, p in [("cifar10_l32w1024", 4, 2, 0.5), ("cifar10_l32w2048", 4, 2, 0.5),
                                  ("cifar100_l32w2048", 4, 2, 0.5), ("tinyimagenet_l32w2048", 8, 4, 0.5),
                                  ("imagenet_1b", 16, None, 1.0), ("imagenet_2b", 16, None, 1.0)]:
        a = load_config(name).augment
        assert (a.randaugment, a.randaugment_ops, a.randaugment_magnitude, a.randaugment_p) == (True, 2, 9, p), name
        assert (a.crop_padding, a.generated_crop_padding, a.flip) == (pad, gen_pad, True), name
        assert a.pad_mode == ("zeros" if gen_pad else "reflect"), name
    assert not load_config("cifar10_subset_cpu").augment.randaugment and not load_config("demo").augment.randaugment


@pytest.mark.parametrize("study", ["studies/randaugment.yaml", "studies/paper/randaugment.yaml"])
def test_the_randaugment_studies_load(study, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])       # their base configs are relative paths
    extra = []
    if "paper" in study:       # every cell is checked against its data: a small CIFAR-shaped stand-in
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "cifar_like.npz", x=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(60) % 10)
        extra = [f"data.name=npz:{tmp_path / 'cifar_like.npz'}", "data.holdout=10"]
    assert main(["study", study, *extra, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and {line.split()[-1] for line in lines} == {"augment.randaugment=true",
                                                                         "augment.randaugment=false"}
