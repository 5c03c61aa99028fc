"""Training: the loop, its config, checkpoints and the end-to-end run recipe."""

from adapterkit.train.config import TrainConfig, TrainConfigError
from adapterkit.train.loop import train
from adapterkit.train.result import NonFiniteLossError, TrainResult

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainConfigError", "TrainResult", "train"]
