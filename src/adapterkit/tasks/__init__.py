"""Tasks: how examples become model inputs and model outputs become predictions and metrics."""

from adapterkit.tasks import causal_lm as _causal_lm  # noqa: F401  (registers the task)
from adapterkit.tasks import classification as _classification  # noqa: F401  (registers the task)
from adapterkit.tasks import question_answering as _question_answering  # noqa: F401  (registers the task)
from adapterkit.tasks import seq2seq as _seq2seq  # noqa: F401  (registers the task)
from adapterkit.tasks import token_classification as _token_classification  # noqa: F401  (registers the task)
from adapterkit.tasks.base import LOWER_IS_BETTER, Feature, Task, pad_features
from adapterkit.tasks.classification import ClassificationTask, LabelPrediction
from adapterkit.tasks.registry import (
    TASKS,
    get_task,
    register_task,
    task_name_for_model,
)

__all__ = [
    "ClassificationTask",
    "Feature",
    "LOWER_IS_BETTER",
    "LabelPrediction",
    "TASKS",
    "Task",
    "get_task",
    "pad_features",
    "register_task",
    "task_name_for_model",
]
