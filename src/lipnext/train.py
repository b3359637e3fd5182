"""Training entry points (the engine lives in ``lipnext.engine``).

``train(cfg)`` runs one training (single process, or one rank under torchrun);
``load_config(path, overrides)`` builds the validated config.
"""
from .config import Config, load_config
from .engine import TrainingDiverged, train

__all__ = ["train", "load_config", "Config", "TrainingDiverged"]
