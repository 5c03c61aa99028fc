"""AdapterFusion (Pfeiffer et al., 2021): a trained attention over frozen bottleneck adapters.

``add_fusion(model, ["a", "b", "c"], "abc")`` adds, at every bottleneck layer
holding any of the three, a :class:`~adapterkit.methods.bottleneck.FusionAttention`
named ``abc``. The fusion is an adapter of its own: it becomes the active one
(``set_active(model, "abc")`` means ``Fuse("a", "b", "c", fusion="abc")``), its
parameters and its own copy of the task head are the trainable ones (the
member adapters stay frozen), and it saves and loads like any adapter -- onto
a model that already holds its members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.nn as nn

from adapterkit.core.config import AdapterConfig, ConfigError
from adapterkit.core.layers import adapter_layers
from adapterkit.core.registry import Method, get_method, register
from adapterkit.core.state import AdapterState
from adapterkit.core.targeting import TargetError
from adapterkit.errors import UnknownNameError
from adapterkit.methods.bottleneck import BottleneckLayer


@dataclass
class FusionConfig(AdapterConfig):
    """The bottleneck adapters a fusion attends over, in order."""

    adapters: list[str] = field(default_factory=list)

    def validate(self) -> None:
        names = self.adapters
        if (not isinstance(names, (list, tuple)) or len(names) < 2
                or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
            raise ConfigError(f"FusionConfig.adapters must list two or more distinct adapter names, got {names!r}")
        self.adapters = list(names)


@register
class FusionMethod(Method):
    """Registry entry for AdapterFusion; its weights live in the members' bottleneck layers."""

    name = "fusion"
    config_class = FusionConfig
    layer_class = None
    layer_method = "bottleneck"
    standalone = False
    not_mergeable_because = "it attends over adapter outputs per token, a computation no weight matrix can absorb"

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, state: AdapterState) -> None:
        assert isinstance(config, FusionConfig)
        for member in config.adapters:
            if member not in state.configs:
                raise UnknownNameError(
                    f"fusion {name!r} attends over {config.adapters}, but the model has no adapter {member!r}; "
                    "add or load the member adapters first"
                )
            method = get_method(state.configs[member])
            if not method.fusable:
                raise ConfigError(
                    f"fusion {name!r}: {member!r} is a {method.name} adapter; AdapterFusion attends over the "
                    "outputs of bottleneck adapters only"
                )
        layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, BottleneckLayer)
                  and any(layer.has_adapter(m) for m in config.adapters)]
        if not layers:
            raise TargetError(f"fusion {name!r}: no bottleneck layer holds any of {config.adapters}")
        for layer in layers:
            layer.add_fusion(name)
        state.fusions[name] = tuple(config.adapters)


def add_fusion(model: nn.Module, adapters: Sequence[str], name: str, train_head: bool = True) -> None:
    """Add an AdapterFusion ``name`` over the bottleneck adapters ``adapters`` and make it active.

    Training then updates only the fusion (and its copy of the task head);
    the member adapters stay as they are.
    """
    from adapterkit.core.lifecycle import add_adapter

    add_adapter(model, name, FusionConfig(adapters=list(adapters)), train_head=train_head)


__all__ = ["FusionConfig", "FusionMethod", "add_fusion"]
