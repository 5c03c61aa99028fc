"""LoRA (Hu et al., 2021): a low-rank update ``W + (alpha / r) * B @ A``.

Works on ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored as (in, out)) and
``nn.Embedding``. A starts Kaiming-uniform and B at zero (for embeddings the
other way round), so the model is unchanged at initialisation. rsLoRA scales
by ``alpha / sqrt(r)``; DoRA (Liu et al., 2024) adds a learned per-output
magnitude that rescales the column-normalised updated weight.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterkit.core.config import (
    AdapterConfig,
    ConfigError,
    check_layers,
    check_positive,
    check_targets,
    peft_layers,
)
from adapterkit.core.base_weight import read_base_tensor, update_base_tensor
from adapterkit.core.compose import cached_fold, route_groups
from adapterkit.core.layers import AdapterLayer, MergeError, Terms, WeightedTerms, apply_terms, routed_sum
from adapterkit.core.plan import Plan, Route
from adapterkit.core.registry import Method, register
from adapterkit.core.targeting import LINEAR_TYPES, has_fresh_output, keep_layers, resolve_targets

# What LoRA adapts when a config names no targets: the attention projections
# and the FFN of every layer, found through the architecture table's roles.
DEFAULT_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA settings; names follow the paper (rank r, alpha).

    ``targets``: PEFT-style list of module names / suffixes, a regular
    expression over the full path, ``"all-linear"``, or None for the
    attention projections and FFN layers of the architecture (``DEFAULT_ROLES``).
    ``layers``: the block numbers (0 = the first) that get the adapter, PEFT's ``layers_to_transform``; None: all.
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    layers: list[int] | None = None

    def validate(self) -> None:
        check_positive(self, "rank")
        check_layers(self)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        check_targets(self)

    @property
    def scaling(self) -> float:
        """The factor in front of ``B @ A``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoraLayer(AdapterLayer):
    """A linear, Conv1D or embedding layer with LoRA updates beside it."""

    method = "lora"
    containers = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                  "lora_magnitude_vector", "lora_dropout")

    def __init__(self, base_layer: nn.Module, state: Any) -> None:
        super().__init__(base_layer, state)
        self.is_embedding = isinstance(base_layer_core(base_layer), nn.Embedding)
        self.fan_in_fan_out = not isinstance(base_layer_core(base_layer), (nn.Linear, nn.Embedding))
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        # DoRA merged: the per-row norms of W + s BA, the one thing unmerge cannot recompute.
        self._dora_norms: dict[str, torch.Tensor] = {}
        self.algebra = WeightedTerms(self)

    # --- shapes -------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The wrapped weight as (out, in) for linear layers, (num, dim) for embeddings."""
        # read through the base accessor: a quantised base layer is dequantised (its weight is packed)
        weight = read_base_tensor(base_layer_core(self.base_layer))
        return weight.T if self.fan_in_fan_out else weight

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        assert isinstance(config, LoraConfig)
        device, dtype = self.adapter_device_dtype()
        weight = self.base_weight()
        rank = config.rank
        self.scaling[name] = config.scaling
        if self.is_embedding:
            if config.use_dora:
                raise ConfigError("DoRA is defined for linear layers only; drop embeddings from targets")
            num, dim = weight.shape
            a = torch.zeros(rank, num, device=device, dtype=dtype)
            b = torch.empty(dim, rank, device=device, dtype=dtype)
            nn.init.normal_(b)
            self.lora_embedding_A[name] = nn.Parameter(a)
            self.lora_embedding_B[name] = nn.Parameter(b)
            return
        out_features, in_features = weight.shape
        self.lora_A[name] = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.use_dora:
            norm = weight.detach().to(dtype).norm(p=2, dim=1)  # (out,)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.clone())

    # --- forward ------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's own layout."""
        if self.is_embedding:
            delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T
        else:
            delta = self.lora_B[name].weight @ self.lora_A[name].weight
        delta = delta * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to ``base_out`` for input ``x``."""
        scale = self.scaling[name]
        if self.is_embedding:
            core = base_layer_core(self.base_layer)
            hidden = F.embedding(x, self.lora_embedding_A[name].T, padding_idx=core.padding_idx)
            return (hidden @ self.lora_embedding_B[name].T) * scale
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropped = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        # Scale the (..., rank) intermediate rather than the (..., out) result: same
        # value, a fraction of the elementwise work.
        update = lora_b(lora_a(dropped) * scale)  # (..., out)
        if name not in self.lora_magnitude_vector:
            return update
        return self._dora_delta(name, dropped, base_out, update)

    def _dora_delta(self, name: str, dropped: torch.Tensor, base_out: torch.Tensor,
                    update: torch.Tensor) -> torch.Tensor:
        """DoRA: ``m * (W + s BA) x / ||W + s BA||`` minus the plain base output."""
        weight = self.base_weight().to(update.dtype)
        combined = weight + (self.lora_B[name].weight @ self.lora_A[name].weight).detach() * self.scaling[name]
        norm = combined.norm(p=2, dim=1).detach()  # (out,), treated as a constant as in the paper
        ratio = self.lora_magnitude_vector[name] / norm  # (out,)
        bias = getattr(base_layer_core(self.base_layer), "bias", None)
        if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
            plain = dropped @ weight.T  # the base term must see the same dropped input
        else:
            plain = base_out.to(update.dtype) - (bias if bias is not None else 0)
        return (ratio - 1) * plain + ratio * update

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Submodules are read from ``_modules`` directly: this runs once per layer
        # and call, where ``nn.Module.__getattr__`` is a measurable share at batch 1.
        modules = self._modules
        base = modules["base_layer"]
        result = base(x, *args, **kwargs)
        # Under torch.compile the plan is read outside the graph, so that a new
        # routing list reaches the graph as tensors, not as constants to guard on.
        step = _plan_step_opaque if torch.compiler.is_compiling() else _plan_step
        kind, payload = step(self, x.shape[0], x.device)
        if kind == "none":
            return result
        if kind == "rows":
            return self._add_rows(x, payload[0], payload[1], result)
        if kind == "grouped":
            return self._add_grouped(x, payload, result)
        if kind == "routed":
            return routed_sum(x, payload, self._plan_delta, result)
        return self._add_terms(x, payload, result)

    def _add_terms(self, x: torch.Tensor, terms: Terms, result: torch.Tensor) -> torch.Tensor:
        """``result + sum(w * delta)`` for the plan's (adapter, weight) terms."""
        modules = self._modules
        # The plain linear layers do not keep their output for backward, so the
        # deltas can be added in place (one (..., out) allocation fewer per adapter).
        dora = modules["lora_magnitude_vector"]
        in_place = has_fresh_output(modules["base_layer"]) and not any(n in dora for n, _ in terms)
        fused = in_place and not torch.is_grad_enabled() and not self.is_embedding and result.is_contiguous()
        for name, weight in terms:
            if fused and modules["lora_B"][name].weight.dtype == result.dtype:
                self._accumulate(name, x, result, weight)
                continue
            delta = self._delta(name, x, result).to(result.dtype)
            if weight != 1.0:
                delta = delta * weight
            result = result.add_(delta) if in_place else result + delta
        return result

    def _plan_delta(self, entry: "Plan | str", x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """What the plan ``entry`` adds to ``out`` (rows of a routed batch)."""
        terms = cached_fold(self, entry, self.algebra)
        if not terms:
            return None
        return apply_terms(terms, lambda name: self._delta(name, x, out), torch.zeros_like(out))

    def _accumulate(self, name: str, x: torch.Tensor, result: torch.Tensor, weight: float = 1.0) -> None:
        """Inference: ``result += scale * (x A^T) B^T`` as one multiply-accumulate into ``result``.

        ``A x^T`` is taken in the (rank, tokens) layout, which runs several times
        faster on CPU than ``x A^T`` for small ranks, and the scale rides on the
        second product, so no (tokens, out) temporary is made.
        """
        modules = self._modules
        a, b = modules["lora_A"][name].weight, modules["lora_B"][name].weight
        dropout = modules["lora_dropout"][name]
        rows = x.to(a.dtype) if isinstance(dropout, nn.Identity) else dropout(x.to(a.dtype))
        rows = rows.reshape(-1, a.shape[1])
        hidden = torch.mm(a, rows.t()).t().contiguous()  # (tokens, rank); contiguous is faster below
        scale = self.scaling[name] if weight == 1.0 else self.scaling[name] * weight
        result.view(-1, b.shape[0]).addmm_(hidden, b.t(), alpha=scale)

    def _add_rows(self, x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor,
                  result: torch.Tensor) -> torch.Tensor:
        """Add per-example LoRA deltas of a routed batch to ``result`` in two batched matmuls.

        Every row has its own adapter's A and pre-scaled B (an all-zero pair
        for rows routed to the base model), so the cost does not grow with the
        number of distinct adapters in the batch. The first product is taken as
        ``A @ x^T``: with a rank of 8-64 that layout runs about 3x faster on CPU
        than ``x @ A^T``.
        """
        # a_rows (batch, rank, in), b_rows (batch, rank, out)
        batch, out_features = x.shape[0], b_rows.shape[-1]
        rows = x.reshape(batch, -1, x.shape[-1]).to(a_rows.dtype)  # (batch, tokens, in)
        hidden = torch.bmm(a_rows, rows.transpose(1, 2)).transpose(1, 2)  # (batch, tokens, rank)
        if (has_fresh_output(self.base_layer) and result.is_contiguous()
                and result.dtype == b_rows.dtype):
            # the plain layers keep nothing of their output for backward: add in place
            result.view(batch, -1, out_features).baddbmm_(hidden, b_rows)
            return result
        delta = torch.bmm(hidden, b_rows).reshape(*x.shape[:-1], out_features)
        return result + delta.to(result.dtype)

    def _add_grouped(self, x: torch.Tensor, groups: "_Groups", result: torch.Tensor) -> torch.Tensor:
        """Add a routed batch's LoRA deltas with the rows grouped by adapter (no per-row weight copies).

        Each adapter's rows are placed in its slot of a zero-padded
        ``(adapters, rows per adapter, tokens, in)`` block, multiplied with the
        stacked A and scaled B^T in two batched matmuls, and the results are
        added back to their rows. A routing list that changes by rows joining
        or leaving (every few decoding steps in a server) then costs a few
        index tensors, not a new copy of one A and B per row.
        """
        a, b, width = groups.a, groups.b, groups.width
        count, rank, in_features = a.shape
        batch, out_features = x.shape[0], b.shape[-1]
        rows = x.reshape(batch, -1, in_features).to(a.dtype)  # (batch, tokens, in)
        tokens = rows.shape[1]
        picked = rows if groups.rows is None else rows.index_select(0, groups.rows)
        block = rows.new_zeros(count * width, tokens, in_features).index_copy_(0, groups.pos, picked)
        hidden = torch.bmm(a, block.view(count, width * tokens, in_features).transpose(1, 2))  # (count, rank, w*t)
        delta = torch.bmm(hidden.transpose(1, 2), b).view(count * width, tokens, out_features)
        delta = delta.index_select(0, groups.pos).to(result.dtype)  # (adapted rows, tokens, out)
        in_place = has_fresh_output(self.base_layer) and result.is_contiguous()
        target = result.view(batch, tokens, out_features) if in_place else result.reshape(batch, tokens, out_features)
        if groups.rows is None:
            summed = target.add_(delta) if in_place else target + delta
        else:
            summed = target.index_add_(0, groups.rows, delta) if in_place else target.index_add(0, groups.rows, delta)
        return summed.view(result.shape)

    def _stacked(self, routes: tuple[str | None, ...], device: torch.device,
                 weights_fixed: bool = False, grouped: bool = True) -> "tuple[str, Any]":
        """How to add a routing list's deltas: ("rows", per-row A and scaled B^T) or ("grouped", row groups).

        While gradients are off, every adapter's A and B of this layer are kept
        stacked (:class:`_RowStacks`) until the adapters change, their weights
        are written or their scales move, and the row groups (or per-row
        gathers) are kept per routing list: a decoding step that routes as the last one did costs a
        dictionary lookup, not a pass over the adapters. Checking that no
        weight was written reads every adapter's A and B, which after a step
        has streamed the base weights through the cache costs ~0.2 ms a layer
        with 64 adapters; ``weights_fixed`` (the caller's promise) skips it.
        """
        if torch.is_grad_enabled():  # training through a route: the weights move every step, keep nothing
            names = [n for n in dict.fromkeys(routes) if n is not None and n in self._modules["lora_A"]]
            return "rows", _RowStacks(self, names).rows(routes, device)
        stacks = self.__dict__.get("_row_stacks")
        if stacks is None or not stacks.current(self, weights_fixed):
            stacks = _RowStacks(self, list(self._modules["lora_A"].keys()))
            self.__dict__["_row_stacks"] = stacks
        groups = stacks.groups(self, routes, device) if grouped else None
        if groups is not None:
            return ("grouped", groups) if groups.pos.numel() else ("none", None)
        return "rows", stacks.rows(routes, device)

    def _apply(self, fn: Any, recurse: bool = True) -> "LoraLayer":
        """``nn.Module._apply`` (``to``, ``half``, ``cuda``, ...), then drop the routing stacks:
        a move keeps the parameter objects and their versions, so only this tells them apart."""
        moved = super()._apply(fn, recurse)
        self.__dict__.pop("_row_stacks", None)
        return moved

    # --- merging --------------------------------------------------------------
    def merged_weight(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The base weight (or ``weight``, in the base's layout) with adapter ``name`` folded in."""
        if weight is None:
            weight = read_base_tensor(base_layer_core(self.base_layer))
        merged = weight + self.delta_weight(name).detach().to(weight.dtype)
        if name in self.lora_magnitude_vector:
            merged, _ = self._dora_rescale(name, merged)
        return merged

    def _dora_rescale(self, name: str, combined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DoRA's merged weight ``m * (W + s BA) / ||W + s BA||`` and those row norms."""
        oriented = combined.T if self.fan_in_fan_out else combined
        norms = oriented.norm(p=2, dim=1)  # (out,)
        ratio = self.lora_magnitude_vector[name].detach().to(oriented.dtype) / norms
        oriented = oriented * ratio.unsqueeze(1)
        return (oriented.T if self.fan_in_fan_out else oriented), norms

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is already merged")
        if name in self.lora_magnitude_vector and self.merged_adapters:
            raise MergeError(
                f"DoRA adapter {name!r} rescales the whole merged weight, so it can only be merged into "
                f"an unmerged layer; unmerge {self.merged_adapters} first"
            )

        def fold(weight: torch.Tensor) -> torch.Tensor:
            combined = weight + self.delta_weight(name).detach().to(weight.dtype)
            if name not in self.lora_magnitude_vector:
                return combined
            merged, norms = self._dora_rescale(name, combined)
            self._dora_norms[name] = norms
            return merged

        update_base_tensor(base_layer_core(self.base_layer), "weight", fold)
        self.merged_adapters.append(name)
        self.state.changed()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is not merged")
        if name in self.lora_magnitude_vector and self.merged_adapters[-1] != name:
            raise MergeError("unmerge DoRA adapters in the reverse order of merging")

        def unfold(weight: torch.Tensor) -> torch.Tensor:
            if name in self.lora_magnitude_vector:
                # merged rows are m * c / n with c = W + s BA, so c = merged * n / m
                norms = self._dora_norms.pop(name).to(weight.dtype)
                oriented = weight.T if self.fan_in_fan_out else weight
                ratio = norms / self.lora_magnitude_vector[name].detach().to(weight.dtype)
                oriented = oriented * ratio.unsqueeze(1)
                weight = oriented.T if self.fan_in_fan_out else oriented
            return weight - self.delta_weight(name).detach().to(weight.dtype)

        update_base_tensor(base_layer_core(self.base_layer), "weight", unfold)
        self.merged_adapters.remove(name)
        self.state.changed()

    @torch.no_grad()
    def fold_into_base(self, plan: "Plan | str", apply: bool = True) -> nn.Module:
        """Add ``sum(w * delta)`` of the plan to the wrapped weight (DoRA: one adapter at weight 1 only)."""
        terms = self.effect(plan) or ()
        dora = [n for n, _ in terms if n in self.lora_magnitude_vector]
        if dora and (len(terms) > 1 or terms[0][1] != 1.0):
            raise MergeError(
                f"DoRA adapter {dora[0]!r} rescales the whole weight, so it folds into the base only alone "
                f"and at weight 1; the plan combines {[n for n, _ in terms]}"
            )
        core = base_layer_core(self.base_layer)
        if not apply:
            return self.base_layer
        if dora:
            update_base_tensor(core, "weight", lambda w: self.merged_weight(dora[0], w))
        elif terms:
            update_base_tensor(core, "weight", lambda w: w + sum(
                self.delta_weight(n).detach().to(w.dtype) * c for n, c in terms))
        return self.base_layer


class _RowStacks:
    """A layer's LoRA weights stacked along a new first dim, one slot per adapter plus an all-zero one.

    ``rows(routes)`` gathers the slots of a routing list (base-model rows get
    the zero slot). The stacks pad every adapter to the largest rank the layer
    holds, so their shape does not depend on the routing list and a compiled
    graph never sees a new one. They cost one more copy of the layer's LoRA
    weights, the price of routing without a pass over the adapters per call.
    """

    def __init__(self, layer: LoraLayer, names: list[str]) -> None:
        lora_a, lora_b = layer._modules["lora_A"], layer._modules["lora_B"]
        self.version = layer.state.version
        self.weights = [w for n in names for w in (lora_a[n].weight, lora_b[n].weight)]
        self.marks = [(w.data_ptr(), w._version) for w in self.weights]
        self.scales = [layer.scaling[n] for n in names]
        self.names = tuple(names)
        self.slot = {n: i for i, n in enumerate(names)}
        self.gathered: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per routing list: per-row weights
        self.present: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per set of adapters in a batch
        rank = max(module.weight.shape[0] for module in lora_a.values())
        ref = next(iter(lora_a.values())).weight
        out_features, in_features = layer.base_weight().shape
        self.a = ref.new_zeros(len(names) + 1, rank, in_features)
        self.b = ref.new_zeros(len(names) + 1, rank, out_features)
        for slot, name in enumerate(names):  # ranks may differ: pad with zeros
            r = lora_a[name].weight.shape[0]
            self.a[slot, :r] = lora_a[name].weight
            self.b[slot, :r] = (lora_b[name].weight * layer.scaling[name]).T

    def current(self, layer: LoraLayer, weights_fixed: bool = False) -> bool:
        """True while no adapter was added, removed or merged, no weight written or moved, no scale changed.

        ``weights_fixed``: only the adapterkit calls are checked (the state's
        version; a move of the layer drops the stacks, see ``LoraLayer._apply``).
        """
        if self.version != layer.state.version:
            return False
        return weights_fixed or (self.marks == [(w.data_ptr(), w._version) for w in self.weights]
                                 and self.scales == [layer.scaling[n] for n in self.slot])

    def groups(self, layer: LoraLayer, routes: Any, device: torch.device) -> "_Groups | None":
        """The rows of ``routes`` grouped by adapter (see :func:`_layout`); None where grouping pads too much.

        The weights are the whole stacks when most adapters are in the batch
        (read in place, nothing copied), else the present adapters' slots,
        gathered once per *set* of adapters: rows joining or leaving a batch
        rarely change that set. Grouping pads every adapter to the rows of the
        busiest one; past twice the batch's rows the per-row kernel is used.
        """
        layout = _layout(layer.state, self.names, routes, device)
        if layout is None:
            return None
        a, b = (self.a, self.b) if layout.whole else self._present(layout.present, device)
        return _Groups(a, b, layout.width, layout.pos, layout.rows)

    def _present(self, present: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacks' slots ``present`` (a copy), kept per set of slots."""
        key = (present, device)
        hit = self.present.get(key)
        if hit is None:
            index = torch.tensor(present, dtype=torch.long, device=device)
            hit = _remember(self.present, key, (self.a[index], self.b[index]), 2)  # the current set and the last
        return hit

    def rows(self, routes: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (A, scaled B^T) for ``routes`` (a tuple of adapter names or None), kept per routing list."""
        key = (routes, device)
        hit = self.gathered.get(key)
        if hit is not None:
            return hit
        zero = len(self.slot)
        index = torch.tensor([self.slot.get(n, zero) if n is not None else zero for n in routes], device=device)
        gathered = (self.a[index], self.b[index])
        if not torch.is_grad_enabled():
            # one gather costs (batch x the layer's LoRA size): keep the current routing list and the last
            _remember(self.gathered, key, gathered, 2)
        return gathered


class _Layout(NamedTuple):
    """Where a routing list's rows go in the grouped kernel, for layers holding the same adapters."""

    width: int
    pos: torch.Tensor
    rows: torch.Tensor | None
    present: tuple[int, ...]
    whole: bool


_NO_LAYOUT = object()


def _layout(state: Any, names: tuple[str, ...], routes: tuple, device: torch.device) -> _Layout | None:
    """The grouped kernel's layout of ``routes`` over a layer's adapter slots ``names`` (None: it pads too much).

    It depends only on the routing list and the layer's adapters, so it is
    worked out once per decoding step for all layers, not once per layer, and
    kept (a few lists) until the adapters change.
    """
    cache = state.derive("lora-route-layouts", dict)
    key = (routes, names, device)
    hit = cache.get(key, _NO_LAYOUT)
    if hit is not _NO_LAYOUT:
        return hit
    zero = len(names)
    slot = {n: i for i, n in enumerate(names)}
    slots = [slot.get(n, zero) if n is not None else zero for n in routes]
    sizes = Counter(s for s in slots if s != zero)
    found: _Layout | None
    if not sizes:  # every row on the base model
        found = _Layout(1, torch.zeros(0, dtype=torch.long, device=device), None, (), True)
    else:
        width = max(sizes.values())
        whole = 2 * len(sizes) >= zero  # most adapters present: use the stacks as they are
        if (zero + 1 if whole else len(sizes)) * width > 2 * len(routes):
            found = None
        else:
            present = tuple(sorted(sizes))
            group = {s: s for s in present} if whole else {s: g for g, s in enumerate(present)}
            seen: Counter = Counter()
            order, pos = [], []
            for row, s in enumerate(slots):
                if s != zero:
                    order.append(row)
                    pos.append(group[s] * width + seen[s])
                    seen[s] += 1
            rows = None if len(order) == len(routes) else torch.tensor(order, dtype=torch.long, device=device)
            found = _Layout(width, torch.tensor(pos, dtype=torch.long, device=device), rows, present, whole)
    return _remember(cache, key, found, 8)


def _remember(cache: dict, key: Any, value: Any, limit: int) -> Any:
    """``cache[key] = value`` in a cache of at most ``limit`` entries (the oldest goes first); returns ``value``."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


class _Groups(NamedTuple):
    """A routed batch's rows grouped by adapter: weights ``a`` (groups, rank, in) and ``b``
    (groups, rank, out), ``width`` rows per group, each adapted row's place ``pos`` in the
    (groups x width) block, and which rows those are (``rows``; None: every row, in order)."""

    a: torch.Tensor
    b: torch.Tensor
    width: int
    pos: torch.Tensor
    rows: torch.Tensor | None


def _plan_step(layer: LoraLayer, batch: int, device: torch.device, compiled: bool = False) -> tuple[str, Any]:
    """What ``layer`` must do for the current plan: ("none"), ("terms", terms), ("rows", (A, B)),
    ("grouped", groups), ("routed", route).

    ``rows`` / ``grouped``: a Route whose entries are adapter names (or None),
    served by the batched kernels (rows grouped by adapter where that pads
    little, else one A and B per row); ``routed``: any other Route (plans per
    example, DoRA, embeddings), evaluated group by group. ``compiled``: a
    compiled graph runs the per-row kernel only, whose shapes do not depend on
    the routing list (the grouped one's do, and would recompile it).
    """
    plan = layer.plan()
    if isinstance(plan, Route):
        if layer.is_embedding or len(layer._modules["lora_magnitude_vector"]) or not plan.names_only:
            return "routed", plan
        if len(plan.entries) != batch:
            route_groups(plan, batch)  # raises the batch-size error
        return layer._stacked(plan.entries, device, plan.weights_fixed, grouped=not compiled)
    terms = cached_fold(layer, plan, layer.algebra)
    return ("terms", terms) if terms else ("none", None)


# The same function, opaque to torch.compile (see LoraLayer.forward).
_plan_step_opaque = torch.compiler.disable(functools.partial(_plan_step, compiled=True))


def base_layer_core(module: nn.Module) -> nn.Module:
    """The innermost original module (LoRA may wrap another method's wrapper)."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


@register
class LoraMethod(Method):
    """Registry entry for LoRA / rsLoRA / DoRA."""

    name = "lora"
    config_class = LoraConfig
    layer_class = LoraLayer
    peft_type = "LORA"
    mergeable = True

    def target_paths(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        assert isinstance(config, LoraConfig)
        paths = resolve_targets(model, config.targets, LINEAR_TYPES + (nn.Embedding,),
                                default_roles=DEFAULT_ROLES, method="LoRA")
        return keep_layers(model, paths, config.layers, "LoRA")

    # --- PEFT interchange -------------------------------------------------------
    # PEFT LoraConfig fields that change the computation in ways LoraConfig cannot express
    peft_unsupported = ("rank_pattern", "alpha_pattern", "bias", "lora_bias",
                        "exclude_modules", "target_parameters", "trainable_token_indices",
                        "layer_replication", "alora_invocation_tokens", "use_qalora", "use_bdlora",
                        "arrow_config", "megatron_config")

    def peft_config(self, config: AdapterConfig, model: nn.Module) -> dict[str, Any]:
        """PEFT's ``LoraConfig`` fields for ``config`` on ``model``.

        Targets: the user's list or regex as given; for None the architecture's
        default names; for ``"all-linear"`` the resolved module paths (PEFT's
        own all-linear picks a different set). Targets None become a regular
        expression over the default roles, which PEFT matches to the same modules. ``fan_in_fan_out`` is on when a
        target is GPT-2's ``Conv1D`` (PEFT switches it off for plain Linear layers).
        """
        assert isinstance(config, LoraConfig)
        from adapterkit.core.architectures import arch_spec, roles_regex

        paths = self.target_paths(model, config)
        if config.targets is None:
            spec = arch_spec(model)
            assert spec is not None  # target_paths raised otherwise
            targets: list[str] | str = roles_regex(spec, DEFAULT_ROLES)
        elif config.targets == "all-linear":
            targets = paths
        else:
            targets = config.targets
        cores = [base_layer_core(model.get_submodule(p)) for p in paths]
        return {
            "peft_type": "LORA", "task_type": None, "inference_mode": True,
            "base_model_name_or_path": None, "revision": None,
            "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": targets, "exclude_modules": None,
            "fan_in_fan_out": any(not isinstance(c, (nn.Linear, nn.Embedding)) for c in cores),
            "use_rslora": config.use_rslora, "use_dora": config.use_dora,
            "bias": "none", "lora_bias": False, "init_lora_weights": True, "modules_to_save": None,
            "layers_to_transform": config.layers, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        }

    def config_from_peft(self, data: dict[str, Any]) -> LoraConfig:
        """Our config for a PEFT LoRA ``adapter_config.json``; refuses PEFT features we lack."""
        if data.get("peft_type") != "LORA":
            raise ConfigError(f"expected a PEFT config with peft_type 'LORA', got {data.get('peft_type')!r}")
        unsupported = {key: data[key] for key in self.peft_unsupported
                       if data.get(key) not in (None, False, {}, [], "none", "")}
        if unsupported:
            raise ConfigError(
                f"PEFT LoRA config uses {unsupported}, which adapterkit's LoraConfig does not support "
                "(it has one rank, alpha and dropout for all targets and trains no biases)"
            )
        targets = data.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        return LoraConfig(rank=int(data.get("r", 8)), alpha=data.get("lora_alpha", 8),
                          dropout=float(data.get("lora_dropout", 0.0)), targets=targets,
                          use_rslora=bool(data.get("use_rslora", False)),
                          use_dora=bool(data.get("use_dora", False)), layers=peft_layers(data))

