"""Evaluation and prediction with a trained adapter."""

from adapterkit.evaluate.api import evaluate, model_labels, predict
from adapterkit.evaluate.plots import plot_confusion_matrix
from adapterkit.evaluate.report import format_adapter_info, format_metrics
from adapterkit.evaluate.runner import run_inference

__all__ = ["evaluate", "format_adapter_info", "format_metrics", "model_labels", "plot_confusion_matrix", "predict", "run_inference"]
