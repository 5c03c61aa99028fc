"""The one operation through which merging changes a base module's weights.

Adapter layers never assign to a base weight themselves: ``merge``, ``unmerge``
and ``merge_and_unload`` call :func:`update_base_tensor` with a function of the
current value. A base whose weights are not plain tensors (a quantised linear
layer) registers a :class:`BaseTensorAccess` for its module type that
dequantises on read and requantises on write; nothing else has to change.
No copy of the original weight is kept: unmerging subtracts (or divides) what
merging added, which restores the weight to within float rounding.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn as nn

from adapterkit.errors import WrongTypeError

TensorName = Literal["weight", "bias"]


class BaseTensorAccess:
    """Read and write a base module's ``weight`` / ``bias`` as ordinary tensors."""

    def read(self, module: nn.Module, which: TensorName) -> torch.Tensor:
        """The current value, in the module's own layout and dtype."""
        tensor = getattr(module, which, None)
        if not isinstance(tensor, torch.Tensor):
            raise WrongTypeError(f"{type(module).__name__} has no {which} tensor to merge into")
        return tensor.detach()

    def write(self, module: nn.Module, which: TensorName, value: torch.Tensor) -> None:
        """Store ``value`` in place (the same Parameter object, so tied weights and optimisers follow)."""
        tensor = getattr(module, which)
        with torch.no_grad():
            tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))


_ACCESS: dict[type, BaseTensorAccess] = {}
_DEFAULT = BaseTensorAccess()


def register_base_access(module_type: type, access: BaseTensorAccess) -> None:
    """Use ``access`` for base modules of ``module_type`` (and its subclasses)."""
    _ACCESS[module_type] = access


def base_access(module: nn.Module) -> BaseTensorAccess:
    """The accessor for ``module``: the registered one for its type, or plain tensor access."""
    for klass in type(module).__mro__:
        if klass in _ACCESS:
            return _ACCESS[klass]
    return _DEFAULT


@torch.no_grad()
def update_base_tensor(module: nn.Module, which: TensorName,
                       change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Set ``module.<which>`` to ``change(current)``, computed in float32 (float64 stays float64)."""
    access = base_access(module)
    current = access.read(module, which)
    work = current if current.dtype == torch.float64 else current.to(torch.float32)
    access.write(module, which, change(work))


def read_base_tensor(module: nn.Module, which: TensorName = "weight") -> torch.Tensor:
    """``module.<which>`` as a plain tensor (dequantised where the base is quantised)."""
    return base_access(module).read(module, which)
