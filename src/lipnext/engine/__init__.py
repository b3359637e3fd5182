"""The training engine: schedules, batches, checkpoints, distributed set-up, the step, the loop."""
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .metrics import read_metrics
from .schedule import lr_factor
from .step import TrainStep
from .trainer import RunWriteError, Trainer, TrainingDiverged, train

__all__ = ["train", "Trainer", "TrainStep", "TrainingDiverged", "RunWriteError", "lr_factor", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "list_checkpoints", "read_metrics"]
