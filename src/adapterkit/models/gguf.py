"""GGUF models: converted once into a Hugging Face folder in a user cache.

transformers reads a GGUF file with ``from_pretrained(..., gguf_file=...)``
and dequantises it to float32. That takes tens of seconds, so the first load
of an alias writes the result as an ordinary Hugging Face folder under the
cache directory, and later loads read that folder with a plain
``from_pretrained``.

The cache directory is ``~/.cache/adapterkit`` unless the ``ADAPTERKIT_CACHE``
environment variable names another. A conversion is written into a temporary
folder beside its destination and renamed into place, so a folder that exists
is always complete, and two processes converting at once both end up reading
the same finished folder.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_ENV = "ADAPTERKIT_CACHE"
DEFAULT_CACHE = "~/.cache/adapterkit"
# Written last into a converted folder: which GGUF file it came from.
SOURCE_FILE = "adapterkit_gguf_source.json"
# What converting needs besides transformers, and the line that installs it.
GGUF_REQUIREMENTS = ("gguf", "accelerate")


def cache_dir() -> Path:
    """The folder that holds converted models (``$ADAPTERKIT_CACHE`` or ``~/.cache/adapterkit``)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _gguf_identity(gguf_path: Path) -> dict[str, object]:
    """What identifies a GGUF file cheaply: its name and size."""
    return {"file": gguf_path.name, "size": gguf_path.stat().st_size}


def _check_requirements() -> None:
    missing = [name for name in GGUF_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"loading a GGUF model needs the package(s) {missing}, which are not installed. "
            f"Install them with: pip install {' '.join(GGUF_REQUIREMENTS)}"
        )


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """Reuse one parse of the GGUF file (and one tensor-name table) while loading.

    transformers parses the file's metadata separately for the tokenizer,
    the config and the weights (each parse walks ~50k vocabulary strings in
    pure Python, ~10-30 s on a small CPU), and rebuilds gguf's tensor-name
    table for every tensor. Both are read-only, so within one conversion the
    first result serves every later call; the originals are restored after.
    """
    import gguf as gguf_package

    names = ("GGUFReader", "get_tensor_name_map")
    originals = {name: getattr(gguf_package, name) for name in names}
    try:
        for name, original in originals.items():
            setattr(gguf_package, name, functools.lru_cache(maxsize=4)(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf_package, name, original)


def load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file with transformers, dequantised to float32, ready to save.

    ``save_pretrained`` refuses a model that still holds its GGUF quantizer,
    and a ``quantization_config`` left in the config would make a later
    ``from_pretrained`` try to dequantise again; both are removed.
    """
    _check_requirements()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    return model, tokenizer


def convert_gguf(gguf_path: Path, destination: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Convert ``gguf_path`` into the Hugging Face folder ``destination``, atomically.

    Returns the model and tokenizer as loaded from the GGUF file. When another
    process finished the same folder first, its folder is kept.
    """
    model, tokenizer = load_gguf(gguf_path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(json.dumps(_gguf_identity(gguf_path)) + "\n")
        if destination.exists() and not is_converted(destination, gguf_path):
            # A stale or broken conversion (e.g. another package version): replace it.
            shutil.rmtree(destination)
        try:
            os.rename(staging, destination)
        except OSError:
            if not is_converted(destination, gguf_path):
                raise
            log.info("another process converted %s first; using its folder", gguf_path.name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return model, tokenizer


def is_converted(folder: Path, gguf_path: Path) -> bool:
    """Whether ``folder`` is a finished conversion of this very GGUF file."""
    marker = folder / SOURCE_FILE
    if not (folder / "config.json").is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == _gguf_identity(gguf_path)
    except (OSError, ValueError):
        return False


def cached_gguf_folder(alias: str, gguf_path: Path) -> Path:
    """The Hugging Face folder for a GGUF alias, converting it on first use.

    The folder is ``cache_dir() / alias``; it is rebuilt when the GGUF file
    it came from has changed (a different package version).
    """
    folder = cache_dir() / alias
    if is_converted(folder, gguf_path):
        return folder
    log.warning("converting %s into %s once (about a minute); later loads read that folder",
                gguf_path.name, folder)
    convert_gguf(gguf_path, folder)
    return folder
