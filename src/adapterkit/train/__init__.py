"""Training: the loop, its config, checkpoints and the end-to-end run recipe.

``adapterkit.train`` is both this package and the function ``train``: the
package is callable, so ``ak.train(model, tokenizer, ...)`` works however the
package was imported.
"""

import inspect
import sys
import types

from adapterkit.train.config import TrainConfig, TrainConfigError
from adapterkit.train.loop import train
from adapterkit.train.result import NonFiniteLossError, TrainResult

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainConfigError", "TrainResult", "train"]


class _CallablePackage(types.ModuleType):
    """A package that, called, runs ``train``."""

    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


__signature__ = inspect.signature(train)
sys.modules[__name__].__class__ = _CallablePackage
