"""Where a model comes from: a run folder, a weights file, a URL with its sha256, or the
Hugging Face Hub. ``resolve(location)`` gives the local ``.safetensors`` file, verified:

* a run folder, checkpoint folder or ``.safetensors`` file: as it is (``load_model`` then
  checks the tensors' sha256 that the file's header records); with ``sha256=``, the file's
  sha256 must equal it;
* ``https://.../model.safetensors#sha256=HEX`` (or the URL and ``sha256=HEX``): downloaded
  once (``torch.hub.download_url_to_file``) into ``<torch.hub.get_dir()>/lipnext/<sha256>.safetensors``;
  the file's sha256 is checked after the download and again at every load; a URL without
  its sha256 is refused;
* ``hf-hub:ORG/NAME[@REV]``: ``model.safetensors`` of that Hugging Face repository and
  revision (``huggingface_hub.hf_hub_download``, extra ``hub``; ``HF_HUB_OFFLINE=1`` reads the
  local cache only). Its sha256 must equal the hub's LFS hash (the cached blob's name), the
  repository's ``model_card.json`` weights sha256 when it has one, and ``sha256=`` when given.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.error import URLError

__all__ = ["resolve", "file_sha256", "is_remote", "HF_PREFIX"]

HF_PREFIX = "hf-hub:"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_remote(location: str | os.PathLike) -> bool:
    """A URL or an ``hf-hub:`` name (not a local path)."""
    s = str(location)
    return s.startswith(HF_PREFIX) or "://" in s


def _checked_sha(sha256: str | None, what: str) -> str | None:
    if sha256 is None:
        return None
    s = str(sha256).strip().lower()
    if not _HEX64.match(s):
        raise ValueError(f"{what}: a sha256 is 64 hexadecimal digits, got {sha256!r}")
    return s


def _verify(path: Path, expected: str, source: str) -> Path:
    got = file_sha256(path)
    if got != expected:
        raise ValueError(f"{path}: its sha256 is {got}, but {source} says {expected}: the file is damaged "
                         "or not the one meant; do not use it (delete it to download it again)")
    return path


def _local(location: str | os.PathLike, sha256: str | None) -> Path:
    from .io import weights_path

    target = weights_path(location)
    if sha256 is not None and target.is_file():
        _verify(target, sha256, "sha256=")
    return target


def _url(url: str, sha256: str | None) -> Path:
    import torch.hub

    base, _, fragment = url.partition("#")
    given = _checked_sha(fragment[len("sha256="):], url) if fragment.startswith("sha256=") else None
    if fragment and given is None:
        raise ValueError(f"{url}: the only URL fragment read is #sha256=HEX")
    if given and sha256 and given != sha256:
        raise ValueError(f"{url}: the URL's sha256 and sha256= differ")
    expected = given or sha256
    if expected is None:
        raise ValueError(f"{url}: give the weights' sha256 (URL#sha256=HEX, or sha256=HEX): a download "
                         "is only used when its sha256 is known")
    target = Path(torch.hub.get_dir()) / "lipnext" / f"{expected}.safetensors"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(base, str(target), hash_prefix=expected, progress=False)
        except RuntimeError as e:                   # torch.hub's hash mismatch (its file is removed)
            raise ValueError(f"{base}: the download's sha256 is not {expected} ({e})") from None
        except (URLError, OSError) as e:
            raise ValueError(f"cannot download {base}: {getattr(e, 'reason', e)}") from None
    return _verify(target, expected, url)


def _hf(location: str, sha256: str | None) -> Path:
    from .extras import require

    require("huggingface_hub", "loading hf-hub: models")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    from .io import WEIGHTS_NAME

    repo, _, rev = location[len(HF_PREFIX):].partition("@")
    if not _REPO.match(repo):
        raise ValueError(f"{location}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    try:
        path = Path(hf_hub_download(repo, WEIGHTS_NAME, revision=rev or None))
    except (LocalEntryNotFoundError, EntryNotFoundError) as e:
        raise FileNotFoundError(f"{location}: no {WEIGHTS_NAME} (in the local cache when offline): "
                                f"{str(e).splitlines()[0]}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"{location}: {str(e).splitlines()[0]}") from None
    blob = path.resolve().name                       # the hub's LFS hash: the file's sha256
    if not _HEX64.match(blob):
        raise ValueError(f"{location}: {WEIGHTS_NAME} is not stored as an LFS file, so the hub gives no "
                         "sha256 to check it against")
    _verify(path, blob, f"{location} (the hub's LFS hash)")
    card = path.parent / "model_card.json"
    if not card.is_file():
        try:
            card = Path(hf_hub_download(repo, "model_card.json", revision=rev or None))
        except (LocalEntryNotFoundError, EntryNotFoundError):
            card = None
    if card is not None:
        from .card import read_card
        recorded = _checked_sha(read_card(card).get("weights", {}).get("sha256"), f"{location} model_card.json")
        if recorded:
            _verify(path, recorded, f"{location}'s model_card.json")
    if sha256:
        _verify(path, sha256, "sha256=")
    return path


def resolve(location: str | os.PathLike, sha256: str | None = None) -> Path:
    """The local weights file of ``location`` (module doc), its sha256 verified where one is known."""
    sha256 = _checked_sha(sha256, "sha256=")
    s = str(location)
    if s.startswith(HF_PREFIX):
        return _hf(s, sha256)
    if "://" in s:
        return _url(s, sha256)
    return _local(location, sha256)
