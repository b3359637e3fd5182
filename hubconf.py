"""torch.hub entry points: one per named lipnext model.

    torch.hub.list(REPO_DIR, source="local")                       # every registered name
    model = torch.hub.load(REPO_DIR, "lipnext_l8w128", source="local", pretrained="runs/demo",
                           num_classes=10, in_chans=1, image_size=8)   # options only without pretrained

``pretrained``: a run folder, a .safetensors file, a URL#sha256=HEX or hf-hub:ORG/NAME[@REV]
(lipnext.hub; the weights' sha256 is verified); without it a freshly initialised model.
"""
import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "numpy", "safetensors", "omegaconf", "yaml", "tqdm"]

_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

import lipnext as _lipnext  # noqa: E402


def _entry(name: str):
    arch, _, description = _lipnext.models.model_entry(name)

    def entry(pretrained=None, **kwargs):
        return _lipnext.create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{description} (architecture {arch}).\n\n``pretrained``: a run folder, weights file, "
                     "URL#sha256=HEX or hf-hub:ORG/NAME[@REV]; other keywords go to lipnext.create_model.")
    return entry


for _name in _lipnext.list_models():
    globals()[_name] = _entry(_name)
