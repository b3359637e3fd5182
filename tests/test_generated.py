"""Generated-image mixing (data.generated, data.generated_fraction) with a real generated set:
class mixtures of the digits' training images (lipnext.data.synthetic). The batch composition,
per-source augmentation (RandAugment on the real images only), resume, DDP sharding, the test
split, and what results.json records."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lipnext.config import load_config
from lipnext.data import Augment, get_dataset
from lipnext.data.synthetic import class_mixtures, save_generated
from lipnext.engine import read_metrics, train
from lipnext.engine.batches import BatchPlan, additional_data, step_generator
from lipnext.engine.distributed import setup
from lipnext.engine.trainer import Trainer

N_GEN = 200
BASE = ["data.name=digits", "model.name=lipnext_l4w64", "model.kwargs={depth: 2, width: 32, patch_size: 2}",
        "train.batch_size=64", "train.epochs=1", "optim.warmup_epochs=0.25", "optim.lookahead_k=3",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.eval_every=0",
        "certify.radii=[36]", "data.generated_fraction=0.25", "augment.crop_padding=1",
        "augment.randaugment=true"]
B_REAL, B_GEN = 48, 16                   # round(0.25 x 64) generated images per batch of 64


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """(npz path, x (N, 8, 8, 1) uint8, y, source pairs) from the digits' train split."""
    x, y, pairs = class_mixtures(get_dataset("digits", "train"), N_GEN, seed=0)
    return save_generated(tmp_path_factory.mktemp("gen") / "gen.npz", x, y), x, y, pairs


def _cfg(tmp_path, generated, name, *extra):
    return load_config(None, BASE + [f"data.generated=npz:{generated[0]}", f"run_dir={tmp_path / name}", *extra])


def _trainer(tmp_path, generated, name, *extra) -> Trainer:
    info, device = setup("none", "auto", "cpu")
    return Trainer(_cfg(tmp_path, generated, name, *extra), info, device)


def test_synthetic_set_mixes_two_training_images_of_its_class(generated):
    _, x, y, pairs = generated
    train = get_dataset("digits", "train")
    tx, ty = train.tensors()
    assert x.shape == (N_GEN, 8, 8, 1) and x.dtype == np.uint8 and np.array_equal(y, np.arange(N_GEN) % 10)
    assert (ty[pairs[:, 0]].numpy() == y).all() and (ty[pairs[:, 1]].numpy() == y).all()
    assert (pairs[:, 0] != pairs[:, 1]).all()
    a, b = (255 * tx[pairs[:, k]].permute(0, 2, 3, 1).numpy() for k in (0, 1))
    lo, hi = np.minimum(a, b), np.maximum(a, b)       # a convex mixture lies between its two sources
    assert (x >= np.floor(lo) - 0.5).all() and (x <= np.ceil(hi) + 0.5).all()
    again = class_mixtures(train, N_GEN, seed=0)
    assert np.array_equal(again[0], x) and not np.array_equal(class_mixtures(train, N_GEN, seed=1)[0], x)
    with pytest.raises(ValueError, match="from the train split only"):
        class_mixtures(get_dataset("digits", "test"), 10)


def test_every_batch_has_exactly_its_real_and_generated_images(tmp_path, generated):
    t = _trainer(tmp_path, generated, "plain", "augment.crop_padding=0", "augment.flip=false",
                 "augment.randaugment=false")
    real_x, real_y = t.train_ds.tensors()
    gen_x = torch.from_numpy(generated[1]).permute(0, 3, 1, 2).float() / 255.0
    key = lambda img: img.numpy().tobytes()  # noqa: E731
    real_keys, gen_keys = {key(i) for i in real_x}, {key(i) for i in gen_x}
    assert not real_keys & gen_keys and t.steps_per_epoch == len(real_x) // B_REAL
    for step in range(t.steps_per_epoch + 2):          # into the second epoch
        x, y = t._batch(step)
        real, gen = t.plan.global_indices(step)
        assert [key(i) in real_keys for i in x] == [True] * B_REAL + [False] * B_GEN
        assert all(key(i) in gen_keys for i in x[B_REAL:])
        assert torch.equal(x[:B_REAL], real_x[real]) and torch.equal(y[:B_REAL], real_y[real])
        assert torch.equal(x[B_REAL:], gen_x[gen]) and torch.equal(y[B_REAL:], torch.from_numpy(generated[2])[gen])


def test_randaugment_touches_the_real_images_only(tmp_path, generated):
    t = _trainer(tmp_path, generated, "aug", "augment.randaugment_p=1.0")
    real_x = t.train_ds.tensors()[0]
    gen_x = torch.from_numpy(generated[1]).permute(0, 3, 1, 2).float() / 255.0
    crop_flip = Augment(crop_padding=1)
    changed = 0
    for step in (0, 5, t.steps_per_epoch + 1):
        x, _ = t._batch(step)
        real, gen = t.plan.global_indices(step)
        params = crop_flip.sample(64, (8, 8), step_generator(t.cfg.train.seed, step, 3))
        plain = crop_flip.apply(torch.cat([real_x[real], gen_x[gen]]), params)
        assert torch.equal(x[B_REAL:], plain[B_REAL:])           # generated: crop and flip only
        changed += sum(not torch.equal(x[i], plain[i]) for i in range(B_REAL))
    assert changed > 0.8 * 3 * B_REAL                            # real: RandAugment on top


def test_batches_after_a_restart_are_bit_identical(tmp_path, generated):
    first = _trainer(tmp_path, generated, "first")
    steps = range(first.steps_per_epoch - 3, first.steps_per_epoch + 3)   # across an epoch's end
    for s in range(steps[0]):
        first._batch(s)                                                   # a run that got here
    before = [first._batch(s) for s in steps]
    after = [_trainer(tmp_path, generated, f"restart{s}")._batch(s) for s in steps[::2]]
    for (xa, ya), (xb, yb) in zip(before[::2], after):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_resumed_mixed_run_repeats_the_uninterrupted_one(tmp_path, generated):
    train(_cfg(tmp_path, generated, "full"))
    assert train(_cfg(tmp_path, generated, "cut", "train.stop_at_step=11")) == {"interrupted": True, "step": 11}
    train(_cfg(tmp_path, generated, "cut", "resume=true"))
    losses = [[r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"]
              for run in ("full", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 26
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_test_split_is_real_and_results_record_the_mix(tmp_path, generated):
    res = train(_cfg(tmp_path, generated, "run", "data.generated_fraction=0.3"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    # round(0.3 x 64) = 19 generated + 45 real images per batch
    assert saved["additional_data"] == res["additional_data"] == {
        "generator": f"npz:{generated[0]}", "images": N_GEN, "real_to_generated": "45:19"}
    assert saved["split"] == "test" and saved["n"] == 360
    t = _trainer(tmp_path, generated, "check")
    test_x, test_y = t._dataset("test").tensors()
    ref_x, ref_y = get_dataset("digits", "test").tensors()
    assert torch.equal(test_x, ref_x) and torch.equal(test_y, ref_y)
    gen_keys = {(255 * i).round().to(torch.uint8).numpy().tobytes()
                for i in torch.from_numpy(generated[1]).permute(0, 3, 1, 2).float() / 255.0}
    assert not gen_keys & {(255 * i).round().to(torch.uint8).numpy().tobytes() for i in test_x}
    assert additional_data(BatchPlan(100, 32, 0), None) is None
    assert additional_data(BatchPlan(100, 32, 0, n_generated=50, generated_fraction=0.75), "g")["real_to_generated"] == "1:3"


RANK_SCRIPT = """
import sys
from safetensors.torch import save_file
from lipnext.config import load_config
from lipnext.engine.distributed import setup, teardown
from lipnext.engine.trainer import Trainer

info, device = setup("ddp", "gloo", "cpu")
t = Trainer(load_config(None, sys.argv[2:]), info, device)
out = {}
for s in (0, 1, t.steps_per_epoch, t.steps_per_epoch + 1):
    out[f"x{s}"], out[f"y{s}"] = t._batch(s)
save_file(out, f"{sys.argv[1]}/rank{info.rank}.safetensors")
teardown(info, True)
"""


@pytest.mark.distributed
def test_two_ranks_get_the_single_process_batch(tmp_path, generated):
    """DDP over 2 processes (gloo): rank r's rows are rows [32 r, 32 r + 32) of the one-process
    batch; rank 1's rows hold all 16 generated images."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = BASE + [f"data.generated=npz:{generated[0]}", f"run_dir={tmp_path / 'two'}", "dist.strategy=ddp"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), str(tmp_path),
                           *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _trainer(tmp_path, generated, "one")
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for s in (0, 1, one.steps_per_epoch, one.steps_per_epoch + 1):
        x, y = one._batch(s)
        assert torch.equal(torch.cat([ranks[0][f"x{s}"], ranks[1][f"x{s}"]]), x)
        assert torch.equal(torch.cat([ranks[0][f"y{s}"], ranks[1][f"y{s}"]]), y)
