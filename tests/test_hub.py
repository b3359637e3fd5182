"""Loading by name and by location: run folders, files, URLs with a sha256, hf-hub: (offline,
against a cache laid out as the hub lays it out), create_model(pretrained=) and hubconf.py."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lipnext
from lipnext.cli import main

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a, b) -> None:
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_create_model_pretrained_checks_the_name(tiny_run):
    model = lipnext.create_model("lipnext_l4w64", pretrained=str(tiny_run))
    _same(model, lipnext.load_model(tiny_run))
    assert not model.training
    assert lipnext.create_model("lipnext_l4w64", pretrained=tiny_run / "model.safetensors",
                                num_classes=10, in_chans=1, image_size=8).num_classes == 10
    with pytest.raises(ValueError, match="depth=4 .asked 8., width=64 .asked 128."):
        lipnext.create_model("lipnext_l8w128", pretrained=str(tiny_run))
    with pytest.raises(ValueError, match="num_classes=10 .asked 7."):
        lipnext.create_model("lipnext_l4w64", pretrained=str(tiny_run), num_classes=7)
    with pytest.raises(ValueError, match="holds a 'lipnext' model, not 'liresnet_l7w64'"):
        lipnext.create_model("liresnet_l7w64", pretrained=str(tiny_run))


def test_load_model_checks_a_given_sha256(tiny_run, tmp_path):
    weights = tiny_run / "model.safetensors"
    lipnext.load_model(weights, sha256=_sha(weights))
    with pytest.raises(ValueError, match="its sha256 is"):
        lipnext.load_model(tiny_run, sha256="0" * 64)
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        lipnext.load_model(tiny_run, sha256="abc")


def test_url_with_sha256_is_downloaded_once_and_verified(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(tiny_run / "model.safetensors", served / "tiny.safetensors")
    sha = _sha(served / "tiny.safetensors")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/tiny.safetensors"
        _same(lipnext.load_model(f"{url}#sha256={sha}"), lipnext.load_model(tiny_run))
        cached = tmp_path / "torch" / "hub" / "lipnext" / f"{sha}.safetensors"
        assert cached.is_file()
        with pytest.raises(ValueError, match="give the weights' sha256"):
            lipnext.load_model(url)
        with pytest.raises(ValueError, match="download's sha256 is not"):
            lipnext.load_model(url, sha256="1" * 64)
        assert not (tmp_path / "torch" / "hub" / "lipnext" / ("1" * 64 + ".safetensors")).exists()
        # the CLI takes the same locations
        assert main(["certify", f"{url}#sha256={sha}", "--data", "digits", "--limit", "20"]) == 0
    finally:
        server.shutdown()
    # the cached copy is verified at every load: a damaged one is refused
    data = bytearray(cached.read_bytes())
    data[-10] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged or not the one meant"):
        lipnext.load_model(f"{url}#sha256={sha}")


def _hub_cache(root: Path, weights: Path, card: Path | None = None) -> Path:
    """A Hugging Face cache holding ORG/NAME at COMMIT (main), laid out as huggingface_hub lays it
    out: blobs named by their hash (the sha256 for LFS files), snapshot links, refs/main."""
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    files = [("model.safetensors", weights, _sha(weights))]
    if card is not None:
        files.append(("model_card.json", card, hashlib.sha1(b"blob %d\0" % card.stat().st_size
                                                                + card.read_bytes()).hexdigest()))
    for name, src, key in files:
        shutil.copy(src, repo / "blobs" / key)
        os.symlink(f"../../blobs/{key}", snap / name)
    return repo


def _offline(cache: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_hf_hub_offline_from_a_hub_cache(tiny_run, tmp_path):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    repo = _hub_cache(cache, tiny_run / "model.safetensors", tiny_run / "model_card.json")
    code = f"""
import torch, lipnext
ref = lipnext.load_model({str(tiny_run)!r})
x = torch.rand(3, 1, 8, 8)
for name in ("hf-hub:org/tiny", "hf-hub:org/tiny@main", "hf-hub:org/tiny@{COMMIT}"):
    assert torch.equal(lipnext.load_model(name)(x), ref(x)), name
assert torch.equal(lipnext.create_model("lipnext_l4w64", pretrained="hf-hub:org/tiny")(x), ref(x))
print("ok")
"""
    p = _offline(cache, code)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
    # through the CLI
    p = _offline(cache, "import sys; from lipnext.cli import main; sys.exit(main(['certify', 'hf-hub:org/tiny', "
                        "'--data', 'digits', '--limit', '30']))")
    assert p.returncode == 0 and "clean accuracy" in p.stdout, p.stderr[-3000:]
    # not in the cache (offline): a one-line error
    p = _offline(cache, "import sys; from lipnext.cli import main; sys.exit(main(['certify', 'hf-hub:org/other', "
                        "'--data', 'digits']))")
    assert p.returncode == 2 and "hf-hub:org/other: no model.safetensors" in p.stderr
    assert "Traceback" not in p.stderr
    # a blob that is not what the hub's hash says is refused
    blob = repo / "blobs" / _sha(tiny_run / "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    p = _offline(cache, "import lipnext; lipnext.load_model('hf-hub:org/tiny')")
    assert p.returncode != 0 and "the hub's LFS hash" in p.stderr


def test_hf_hub_checks_the_repositorys_model_card(tiny_run, tmp_path):
    pytest.importorskip("huggingface_hub")
    card = json.loads((tiny_run / "model_card.json").read_text())
    card["weights"]["sha256"] = "2" * 64
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    cache = tmp_path / "hub"
    _hub_cache(cache, tiny_run / "model.safetensors", tmp_path / "model_card.json")
    p = _offline(cache, "import lipnext; lipnext.load_model('hf-hub:org/tiny')")
    assert p.returncode != 0 and "model_card.json says 2222" in p.stderr


@pytest.mark.skipif(not hasattr(lipnext.io, "tensors_sha256"), reason="needs the run-folder issue's "
                    "tensors_sha256 (lipnext.io) in the weights header")
def test_hf_hub_weights_whose_tensors_do_not_match_their_header(tiny_run, tmp_path):
    """The file is what the hub says (its sha256 matches), but its tensors are not what its own
    header records: load_model's tensors_sha256 check refuses it."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(tiny_run / "model.safetensors"), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(tiny_run / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    cache = tmp_path / "hub"
    _hub_cache(cache, tmp_path / "model.safetensors")
    p = _offline(cache, "import lipnext; lipnext.load_model('hf-hub:org/tiny')")
    assert p.returncode != 0 and "ValueError" in p.stderr


def test_hf_hub_bad_names(tmp_path):
    pytest.importorskip("huggingface_hub")
    with pytest.raises(ValueError, match="expected hf-hub:ORG/NAME"):
        lipnext.load_model("hf-hub:no-slash")


@pytest.mark.slow
def test_hubconf_load_and_list(tiny_run, tmp_path):
    """torch.hub.load(REPO_DIR, name, source="local", pretrained=...) and torch.hub.list for every
    registered name (torch.hub.list reads GitHub repositories: here from its cache, offline)."""
    hub = tmp_path / "torch" / "hub"
    hub.mkdir(parents=True)
    os.symlink(REPO, hub / "someone_lipnext_main")
    code = f"""
import torch, lipnext
torch.hub.set_dir({str(hub)!r})
names = torch.hub.list("someone/lipnext:main", trust_repo=True, skip_validation=True, verbose=False)
assert names == lipnext.list_models(), names
m = torch.hub.load({str(REPO)!r}, "lipnext_l4w64", source="local", pretrained={str(tiny_run)!r})
x = torch.rand(2, 1, 8, 8)
assert torch.equal(m(x), lipnext.load_model({str(tiny_run)!r})(x))
fresh = torch.hub.load({str(REPO)!r}, "liresnet_l7w64", source="local", num_classes=5)
assert fresh.num_classes == 5
assert "LipNeXt L4 W64" in torch.hub.help("someone/lipnext:main", "lipnext_l4w64", trust_repo=True,
                                         skip_validation=True)
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
