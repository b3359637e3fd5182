"""save_model / load_model: round trip, refusal of pickles and foreign files."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import lipnext


def make():
    return lipnext.create_model("lipnext_l4w64", num_classes=3, image_size=8, patch_size=2, alpha=1 / 16)


def test_round_trip_file_and_folder(tmp_path):
    m = make()
    x = torch.rand(4, 3, 8, 8)
    for target in (tmp_path / "w.safetensors", tmp_path / "run"):
        lipnext.save_model(m, target)
        m2 = lipnext.load_model(target)
        assert m2.config() == m.config()
        torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert not list(tmp_path.glob("**/*.tmp"))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_and_foreign_files_are_refused(tmp_path):
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"w": _Evil()}))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        lipnext.load_model(evil)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a lipnext model"):
        lipnext.load_model(plain)
    with pytest.raises(FileNotFoundError):
        lipnext.load_model(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("key,value", [("depth", 5), ("width", 32)])
def test_weights_of_another_model_are_refused(tmp_path, key, value):
    m = make()
    path = lipnext.save_model(m, tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    cfg = json.loads(meta["config"])
    cfg[key] = value
    meta["config"] = json.dumps(cfg)
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not match"):
        lipnext.load_model(tmp_path / "b.safetensors")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    """Weights, results and plots are readable by others on a shared machine (not mkstemp's 0600)."""
    import os
    from pathlib import Path

    from lipnext.engine import save_checkpoint
    from lipnext.io import atomic_write
    from lipnext.optim import build_optimizer
    model = make()
    old = os.umask(umask)
    try:
        files = [lipnext.save_model(model, tmp_path / "run"),
                 atomic_write(tmp_path / "r.json", lambda p: Path(p).write_text("{}"))]
        ckpt = save_checkpoint(tmp_path / "run", 1, model, build_optimizer(model).state_dict(), {})
    finally:
        os.umask(old)
    files += sorted(ckpt.iterdir())
    assert len(files) == 5 and [f.stat().st_mode & 0o777 for f in files] == [mode] * 5
