"""adapterkit: adapter fine-tuning for pretrained transformer language models."""

from adapterkit.core import *  # noqa: F401,F403
from adapterkit.core import __all__ as _core_all
from adapterkit.methods import *  # noqa: F401,F403
from adapterkit.methods import __all__ as _methods_all

__version__ = "0.1.0"
__all__ = [*_core_all, *_methods_all]
