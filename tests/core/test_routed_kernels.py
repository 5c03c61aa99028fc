"""The two kernels behind routed LoRA batches: one A and B per row, and rows grouped by adapter.

Which one a routing list gets depends on how its rows spread over the adapters
(grouping pads every adapter to the rows of the busiest one); both must give
every row exactly what its adapter alone gives, in float64 to a tolerance
derived from float64's epsilon.
"""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.lora import LoraLayer, _plan_step
from tests.tiny_models import build_tiny, output_tensor, perturb
from tests.tolerances import assert_close_scaled, forward_ops

NAMES = ["a", "b", "c", "d", "e", "f"]


@pytest.fixture(scope="module")
def routed_model() -> tuple[torch.nn.Module, dict]:
    model, inputs = build_tiny("llama")
    model.double()
    for i, name in enumerate(NAMES):
        ak.add_adapter(model, name, ak.LoraConfig(rank=2 + 2 * (i % 2)))  # ranks 2 and 4: padded stacks
        perturb(model, name, seed=i + 1)
    batch = {k: v[torch.arange(6) % v.shape[0]] for k, v in inputs.items()}  # six rows
    return model, batch


def _kind(model: torch.nn.Module, routes: list[str | None]) -> str:
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with torch.no_grad(), ak.route(model, routes):
        return _plan_step(layer, len(routes), torch.device("cpu"))[0]


def _alone(model: torch.nn.Module, batch: dict, row: int, name: str | None) -> torch.Tensor:
    single = {k: v[row:row + 1] for k, v in batch.items()}
    with ak.use(model, name if name is not None else ak.Sum()):  # an empty sum: the base model
        return output_tensor(model, single)[0]


@pytest.mark.parametrize(("routes", "kind"), [
    (["a", "b", "c", "d", "e", "f"], "grouped"),     # every adapter once: the stacks as they are
    (["a", "a", "b", "b", None, "a"], "grouped"),    # two adapters: their slots gathered, a base row skipped
    (["c", "c", "c", "c", "c", "d"], "grouped"),     # one busy adapter, padded within twice the rows
    (["a", "b", "c", "d", "e", "e"], "rows"),        # grouping would pad 7 x 2 slots for 6 rows
    ([None] * 6, "none"),
])
@pytest.mark.parametrize("tokens", [None, 1])
def test_each_row_gets_what_its_adapter_gives_alone(routed_model: tuple, routes: list, kind: str,
                                                    tokens: int | None) -> None:
    model, batch = routed_model
    if tokens is not None:  # a one-token step, as in decoding
        batch = {k: v[:, :tokens] for k, v in batch.items()}
    assert _kind(model, routes) == kind
    with torch.no_grad(), ak.route(model, routes):
        routed = output_tensor(model, batch)
    mask = batch["attention_mask"].bool()
    for row, name in enumerate(routes):
        expected = _alone(model, batch, row, name)
        assert_close_scaled(routed[row][mask[row]], expected[mask[row]], ops=forward_ops(model),
                            msg=f"row {row} ({name})")


def test_grouped_kernel_keeps_one_gather_per_set_of_adapters(routed_model: tuple) -> None:
    """Rows leaving a batch (as in a server) change the routing list but not the adapters' gathered slots."""
    model, batch = routed_model
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    layer.__dict__.pop("_row_stacks", None)  # start from new stacks
    first, second = ["a", "a", "b", "b", "a", "b"], ["a", "b", "b", "a"]
    with torch.no_grad():
        for routes in (first, second):
            with ak.route(model, routes):
                output_tensor(model, {k: v[:len(routes)] for k, v in batch.items()})
    stacks = layer.__dict__["_row_stacks"]
    assert len(stacks.present) == 1  # {a, b}: gathered once for both lists
