"""lipnext: certifiably robust 1-Lipschitz image classifiers (LipNeXt, ICLR 2026)."""
from .certify import Certificate, certify
from .io import load_model, save_model
from .models import LipNeXt, create_model, list_models

__version__ = "0.1.0"

__all__ = ["Certificate", "LipNeXt", "certify", "create_model", "list_models", "load_model",
           "save_model", "__version__"]
