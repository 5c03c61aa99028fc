"""adapterkit: adapter fine-tuning for pretrained transformer language models."""

from adapterkit import _quiet_imports  # noqa: F401  (before anything imports transformers)
from adapterkit.core import *  # noqa: F401,F403
from adapterkit.core import __all__ as _core_all
from adapterkit.methods import *  # noqa: F401,F403
from adapterkit.methods import __all__ as _methods_all

# The workflows. ``train`` and ``evaluate`` are callable packages, so
# ``ak.train(...)`` and ``ak.evaluate(...)`` run the functions of those names.
from adapterkit import evaluate, train  # noqa: E402
from adapterkit.data import load_data  # noqa: E402
from adapterkit.evaluate import predict  # noqa: E402
from adapterkit.analysis import analyze  # noqa: E402
from adapterkit.models import load_model  # noqa: E402
from adapterkit.train import TrainConfig, TrainResult  # noqa: E402

_workflow_all = ["load_model", "load_data", "train", "TrainConfig", "TrainResult", "evaluate", "predict", "analyze"]

__version__ = "0.1.0"
__all__ = [*_core_all, *_methods_all, *_workflow_all]
