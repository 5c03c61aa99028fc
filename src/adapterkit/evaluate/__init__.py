"""Evaluation and prediction with a trained adapter.

``adapterkit.evaluate`` is both this package and the function ``evaluate``:
the package is callable, so ``ak.evaluate(model, tokenizer, data)`` works
however the package was imported.
"""

import inspect
import sys
import types

from adapterkit.evaluate.api import evaluate, model_labels, predict
from adapterkit.evaluate.plots import plot_confusion_matrix
from adapterkit.evaluate.report import format_adapter_info, format_metrics
from adapterkit.runtime.inference import run_inference

__all__ = ["evaluate", "format_adapter_info", "format_metrics", "model_labels", "plot_confusion_matrix",
           "predict", "run_inference"]


class _CallablePackage(types.ModuleType):
    """A package that, called, runs ``evaluate``."""

    def __call__(self, *args, **kwargs) -> dict:
        return evaluate(*args, **kwargs)


__signature__ = inspect.signature(evaluate)
sys.modules[__name__].__class__ = _CallablePackage
