"""Where the server may load adapters from: inside ``--adapter-root`` only, when one is set."""

from __future__ import annotations

from pathlib import Path

from adapterkit.serve.errors import BadRequest, Forbidden, NotFound


def _reason(err: Exception) -> str:
    """What went wrong, without the (possibly very long) path the OS error repeats."""
    return getattr(err, "strerror", None) or str(err)


def allowed_adapter_path(path: str, root: Path | None) -> Path:
    """The resolved folder of a runtime ``load_lora_adapter`` request.

    Without an adapter root, runtime loading is refused (403): a server must
    not read any folder a client names. Symbolic links and ``..`` are
    resolved before the check, so neither escapes the root.
    """
    if not path or not isinstance(path, str):
        raise BadRequest("lora_path must be a folder path, got an empty value", param="lora_path")
    if root is None:
        raise Forbidden("loading adapters at runtime needs the server started with --adapter-root DIR; "
                        "this server has none", param="lora_path", code="adapter_root_not_set")
    root = root.resolve()
    candidate = Path(path)
    try:
        folder = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if folder != root and root not in folder.parents:
            raise Forbidden(f"lora_path {path!r} is outside the adapter root {str(root)!r}; "
                            "only folders inside it can be loaded", param="lora_path", code="adapter_path_forbidden")
        is_folder = folder.is_dir()
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte
        raise BadRequest(f"lora_path {path[:200]!r} is not a usable folder path: {_reason(err)}", param="lora_path",
                         code="invalid_adapter_path") from err
    if not is_folder:
        raise NotFound(f"lora_path {path!r} is not a folder under the adapter root {str(root)!r}",
                       param="lora_path", code="adapter_not_found")
    return folder
