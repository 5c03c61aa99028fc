"""A merged model as a plain Hugging Face folder, loadable without adapterkit.

The adapters of a plan are folded into the base weights (``merge_and_unload``),
and what is left, the user's own transformers class, is written with
``save_pretrained`` beside its tokenizer: safetensors weights, ``config.json``
(its ``architectures`` entry tells ``AutoModelFor*`` which class to build, and
classification heads keep their ``id2label``), the generation config of
generative models and the tokenizer files. Any ``AutoModelFor*.from_pretrained``
or ``pipeline`` then loads it, as it would a checkout from the hub.

The folder is written beside its destination and swapped in only when every
file is on disk (``core/atomic.py``), so an error leaves either nothing or the
previous folder, untouched; an existing folder is replaced only when asked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterkit.core.atomic import atomic_folder
from adapterkit.core.lifecycle import list_adapters, use
from adapterkit.core.merged import merge_and_unload
from adapterkit.core.plan import Plan, PlanLike, plan_from_dict
from adapterkit.errors import UsageError, UserError


class OutputExistsError(UserError, FileExistsError):
    """The export's destination already holds something, and replacing it was not asked for."""


def export_merged(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    output: str | os.PathLike[str],
    plan: PlanLike | Plan = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Fold ``plan`` into ``model``'s weights and write it as a Hugging Face model folder.

    The folder loads with plain transformers (``AutoModelFor<Task>.from_pretrained``,
    ``pipeline``), no adapterkit needed, and computes what the adapted model
    computed under ``plan``, within float rounding. The weights keep the
    model's dtype.

    ``model`` is changed in place, as by :func:`adapterkit.merge_and_unload`:
    after the call it is the plain merged model. The checks come first, so a
    refused export (an existing output, a method that cannot be folded)
    leaves the model and the disk as they were.

    Args:
        model: A transformers model carrying adapters (or none: it is written as it is).
        tokenizer: Its tokenizer, written beside the weights; None writes the model alone.
        output: The folder to write.
        plan: The adapters to fold: a name, a plan such as ``Average({"a": .5, "b": .5})``, or
            None for the model's active plan.
        overwrite: Replace ``output`` if it exists (the old folder stays whole until the new one
            is complete).
        dtype: Write the merged weights in this float dtype (``torch.bfloat16``, ``torch.float32``)
            instead of the model's own (merging happens in float32 first).

    Returns:
        The folder written.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
        UsageError: ``output`` is a file or the model's own source folder, or a plan was given for a
            model without adapters.
        MergeError: A method in the plan cannot be folded into weights (bottleneck, prefix, prompt,
            fusion, a Route), or an adapter touches tied embeddings.
    """
    if not isinstance(model, PreTrainedModel):
        raise UsageError(f"export_merged writes transformers models (PreTrainedModel); got {type(model).__name__}")
    source = getattr(model, "adapterkit_source", None) or {}
    destination = check_output(output, overwrite, sources=[source["path"]] if source.get("path") else [])
    if plan is not None and not list_adapters(model):
        raise UsageError(f"a plan ({plan!r}) was given, but the model carries no adapters to fold")
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"cannot write a model folder to {destination}: it is a file; give a folder path")
    merged = merge_and_unload(model, plan)
    if dtype is not None:
        if not dtype.is_floating_point:
            raise UsageError(f"export dtype must be a float type (bfloat16, float32), got {dtype}")
        merged = merged.to(dtype)
    _write(merged, tokenizer, destination)
    return destination


def export_quantized(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output: str | os.PathLike[str],
    plan: PlanLike | Plan = None,
    overwrite: bool = False,
) -> tuple[Path, dict]:
    """Fold ``plan`` into a model whose base is quantised, requantise, and write a folder that stays quantised.

    The folder is in transformers' bitsandbytes format (``export/quantized_folder.py``):
    ``from_pretrained`` loads it quantised, no adapterkit needed. ``model`` is changed in
    place, as by :func:`adapterkit.merge_and_unload`.

    Returns:
        The folder written, and what merging cost: ``requantization`` (layers, mean and max
        relative error of the stored merged weights, see ``requantization_report``) and
        ``probe`` (the largest change of the outputs on a fixed probe batch between the adapter
        computed beside the quantised base and the requantised merged weights).

    Raises:
        UsageError: the base is not quantised, or as :func:`export_merged`.
        MergeError: as :func:`export_merged`.
    """
    from adapterkit.export.quantized_folder import output_change, probe_outputs, write_quantized
    from adapterkit.models.quantize import model_quantization, requantization_report

    if model_quantization(model) is None:
        raise UsageError("export_quantized needs a quantised base (load_model(..., quantize=...)); "
                         "export_merged writes a float folder")
    if tokenizer is None:
        raise UsageError("export_quantized needs the tokenizer (for its probe batch, and to write beside the model)")
    source = getattr(model, "adapterkit_source", None) or {}
    destination = check_output(output, overwrite, sources=[source["path"]] if source.get("path") else [])
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"cannot write a model folder to {destination}: it is a file; give a folder path")
    requantization_report(model)  # forget earlier writes: the report covers this merge only
    with contextlib.nullcontext() if plan is None else use(model, plan):  # None: the active adapters
        before = probe_outputs(model, tokenizer)
    merged = merge_and_unload(model, plan)
    report = {"requantization": requantization_report(model),
              "probe": output_change(before, probe_outputs(merged, tokenizer))}
    write_quantized(merged, tokenizer, destination)
    return destination, report


def _write(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, destination: Path) -> None:
    """``save_pretrained`` of the model and tokenizer into a fresh folder swapped in at ``destination``."""
    from adapterkit.models.loading import _quiet_transformers  # no progress bars for a few files

    with atomic_folder(destination) as folder, _quiet_transformers():
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


def check_output(output: str | os.PathLike[str], overwrite: bool,
                 sources: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """``output`` as a Path, if an export may write there; a one-line reason otherwise.

    Args:
        output: The folder (or file) to write.
        overwrite: Whether an existing ``output`` may be replaced.
        sources: Folders the export reads (the base model, the adapters), which a replaced
            ``output`` must neither be nor hold.

    Returns:
        ``output`` as a Path.
    """
    path = Path(output)
    if not path.exists():
        return path
    if not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output, or pass --overwrite "
                                "(overwrite=True) to replace it")
    resolved = path.resolve()
    for source in sources:
        source_path = Path(source).resolve()
        if source_path == resolved or resolved in source_path.parents:
            raise UsageError(f"cannot replace {path}: the export reads {source_path} from it; "
                             "write the export somewhere else")
    return path


def read_plan(path: str | os.PathLike[str]) -> Plan | str:
    """The plan in a YAML or JSON file, in :meth:`Plan.to_dict` form.

    Args:
        path: A file such as ``{"average": [["a", 0.5], ["b", 0.5]]}`` (JSON) or
            ``stack: [lang, task]`` (YAML).

    Returns:
        The plan it holds.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"cannot read the plan file {path}: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML or JSON: {err}") from err
    try:
        return plan_from_dict(data)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from err


def plan_for(names: Sequence[str], plan: Plan | str | None) -> Plan | str:
    """The plan to fold: ``plan`` if given, the one adapter if there is one, else a request for a plan.

    Args:
        names: The adapters loaded, in order.
        plan: The plan the user gave, or None.

    Returns:
        What to pass to :func:`export_merged`.
    """
    if plan is not None:
        return plan
    if len(names) == 1:
        return names[0]
    example = {"average": [[name, round(1 / len(names), 4)] for name in names]}
    raise UsageError(f"{len(names)} adapters ({', '.join(names)}) were given, and there are several ways to "
                     f"combine them; say how in a plan file (--plan FILE), e.g. {example}")


def load_adapters(
    folders: Sequence[str | os.PathLike[str]],
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[str]]:
    """Load the base model of the first adapter folder (quantised in ``quantize`` if given), then every adapter.

    The adapters must share the base model (each load checks its fingerprint),
    the task, and for classification tasks the label names, because one folder
    will hold one head.

    Args:
        folders: Adapter folders (``save_adapter``'s, or PEFT's), at least one.

    Returns:
        ``(model, tokenizer, names)``, with ``names`` the adapters' saved names in the order given.
    """
    from adapterkit.core.serialization import load_adapter
    from adapterkit.models import adapter_metadata, load_with_adapter
    from adapterkit.models.adapters import adapter_task

    if not folders:
        raise UsageError("give at least one adapter folder (--adapter DIR)")
    model, tokenizer, first = load_with_adapter(folders[0], quantize=quantize)
    names = list_adapters(model)
    for folder in folders[1:]:
        metadata = adapter_metadata(folder)
        name = metadata.get("name") or "default"
        if name in names:
            raise UsageError(f"two adapters are called {name!r} (the second is {folder}); a plan could not tell "
                             "them apart: save one under another name")
        task = adapter_task(metadata, folder)
        if task != first["task"]:
            raise UsageError(f"{folders[0]} is a {first['task']} adapter but {folder} is a {task} one; "
                             "an exported folder has one task head")
        if first.get("labels") and metadata.get("labels") and metadata["labels"] != first["labels"]:
            raise UsageError(f"{folders[0]} has labels {first['labels']} but {folder} has {metadata['labels']}; "
                             "an exported classifier has one set of labels")
        names.append(load_adapter(model, str(folder)))
    model.eval()
    return model, tokenizer, names


__all__ = ["OutputExistsError", "check_output", "export_merged", "load_adapters", "plan_for", "read_plan"]
