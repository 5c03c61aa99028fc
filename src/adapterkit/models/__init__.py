"""Finding and loading base models: aliases of packaged models and local folders."""

from adapterkit.models.adapters import (
    adapter_info,
    adapter_metadata,
    base_model_of,
    load_with_adapter,
)
from adapterkit.models.aliases import (
    ALIASES,
    ModelAlias,
    ModelNotFoundError,
    install_hint,
    package_dir,
    resolve_model_path,
)
from adapterkit.models.loading import (
    TASK_MODEL_CLASSES,
    ensure_pad_token,
    load_model,
    model_source,
)

__all__ = [
    "ALIASES",
    "ModelAlias",
    "ModelNotFoundError",
    "TASK_MODEL_CLASSES",
    "adapter_info",
    "adapter_metadata",
    "base_model_of",
    "ensure_pad_token",
    "install_hint",
    "load_model",
    "load_with_adapter",
    "model_source",
    "package_dir",
    "resolve_model_path",
]
