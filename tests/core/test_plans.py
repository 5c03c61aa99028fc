"""Plans as data, and plans per thread: round trips, errors, thread safety, torch.compile guards."""

from __future__ import annotations

import asyncio
import json
import pickle
import threading

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import UnknownNameError, UsageError
from tests.tiny_models import build_tiny, output_tensor, perturb

NESTED = ak.Stack("lang", ak.Average({"a": 0.7, "b": 0.3}), ak.Sum("c", ak.Average([(ak.Stack("a", "c"), 2.0),
                                                                                   ("b", -1.0)], normalize=False)))


@pytest.mark.parametrize("plan", [
    "a", ak.Sum(), ak.Sum("a", "b"), ak.Stack("a", "b"), ak.Average({"a": 1, "b": 3}), NESTED,
    ak.Fuse("a", "b", "c", fusion="abc"), ak.Fuse("a", "b"),
    ak.Route(["a", None, ak.Average({"a": 0.5, "b": 0.5}), ak.Stack("lang", "a")]),
])
def test_plan_round_trips_through_dict_json_and_pickle(plan: ak.Plan | str) -> None:
    data = plan if isinstance(plan, str) else plan.to_dict()
    again = ak.plan_from_dict(json.loads(json.dumps(data)))
    assert again == plan and hash(again) == hash(plan)
    assert ak.Plan.from_dict(data) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan
    if not isinstance(plan, str):
        assert eval(repr(plan), {**vars(ak)}) == plan  # it prints as the Python that builds it


def test_plans_are_immutable_values() -> None:
    plan = ak.Average({"a": 1.0, "b": 3.0})
    assert plan.weights == (0.25, 0.75) and plan.raw_weights == (1.0, 3.0)
    assert ak.Average({"a": 1.0, "b": 3.0}, normalize=False).weights == (1.0, 3.0)
    assert plan == ak.Average({"a": 1, "b": 3}) and plan != ak.Average({"a": 3, "b": 1})
    assert ak.Sum("a", "b") != ak.Stack("a", "b")
    with pytest.raises(AttributeError, match="immutable"):
        plan.items = ("c",)  # type: ignore[misc]
    assert NESTED.names() == ("lang", "a", "b", "c")
    assert repr(ak.Route(["a", None])) == "Route(['a', None])"


@pytest.mark.parametrize("build,message", [
    (lambda: ak.Average({}), "at least one"),
    (lambda: ak.Average({"a": 1, "b": -1}), "sum to 0"),
    (lambda: ak.Average({"a": "x"}), "must be a number"),
    (lambda: ak.Stack("a", None), "only as an entry of Route"),
    (lambda: ak.Fuse("a"), "two or more distinct"),
    (lambda: ak.Route("ab"), "one adapter name, plan or None per example"),
    (lambda: ak.Route([ak.Route(["a"])]), "cannot itself be a Route"),
    (lambda: ak.Sum("a", 3), "must be an adapter name"),
    (lambda: ak.plan_from_dict({"stack": ["a"], "sum": ["b"]}), "exactly one of"),
    (lambda: ak.plan_from_dict({"average": "a"}), "wrong shape"),
])
def test_bad_plans_say_what_was_expected(build, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build()


def _lora_model(kind: str = "bert") -> tuple[torch.nn.Module, dict]:
    model, inputs = build_tiny(kind)
    for seed, name in enumerate(("a", "b", "c"), start=1):
        ak.add_adapter(model, name, ak.LoraConfig(rank=2 + seed))
        perturb(model, name, seed=seed)
    return model, inputs


def test_plans_are_checked_against_the_model() -> None:
    model, _ = _lora_model()
    with pytest.raises(UnknownNameError, match="no adapter called 'zz'"):
        ak.set_active(model, ak.Stack("a", "zz"))
    with pytest.raises(ak.CompositionError, match="bottleneck"):
        ak.set_active(model, ak.Fuse("a", "b", fusion="x"))
    with pytest.raises(ak.CompositionError, match="whole plan"):
        ak.set_active(model, ak.Sum("a", ak.Route(["a", "b"])))
    assert ak.active_adapters(model) == ["c"]  # a refused plan changes nothing


def test_use_overrides_for_this_thread_only_and_nests() -> None:
    model, inputs = _lora_model()
    outputs = {}
    for name in ("a", "b", "c"):
        ak.set_active(model, name)
        outputs[name] = output_tensor(model, inputs)
    ak.set_active(model, "a")
    with ak.use(model, "b"):
        assert ak.active_plan(model) == "b"
        torch.testing.assert_close(output_tensor(model, inputs), outputs["b"], rtol=0, atol=0)
        with ak.use(model, "c"):
            torch.testing.assert_close(output_tensor(model, inputs), outputs["c"], rtol=0, atol=0)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(ak.active_plan(model)))
        thread.start()
        thread.join()
        assert seen == ["a"]  # another thread sees the default, not this block's plan
        torch.testing.assert_close(output_tensor(model, inputs), outputs["b"], rtol=0, atol=0)
    assert ak.active_plan(model) == "a"
    assert model.adapterkit.default == "a"  # nothing was written onto the model


def test_two_threads_with_different_plans_get_their_own_outputs() -> None:
    model, inputs = _lora_model()
    plans = {"left": ak.Average({"a": 0.6, "b": 0.4}), "right": ak.Route(["c", None])}
    expected = {}
    for key, plan in plans.items():
        with ak.use(model, plan):
            expected[key] = output_tensor(model, inputs)
    assert not torch.allclose(expected["left"], expected["right"])
    barrier = threading.Barrier(2)
    results: dict[str, list[torch.Tensor]] = {"left": [], "right": []}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            barrier.wait()
            for _ in range(100):  # 200 calls in all, interleaved by the two threads
                with ak.use(model, plans[key]):
                    results[key].append(output_tensor(model, inputs))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for key in plans:
        assert len(results[key]) == 100
        assert all(torch.equal(out, expected[key]) for out in results[key]), key


def test_asyncio_tasks_each_keep_their_plan() -> None:
    model, inputs = _lora_model()
    expected = {}
    for name in ("a", "b"):
        with ak.use(model, name):
            expected[name] = output_tensor(model, inputs)

    async def serve(name: str) -> list[torch.Tensor]:
        outs = []
        with ak.use(model, name):
            for _ in range(5):
                await asyncio.sleep(0)  # let the other task run inside its own block
                outs.append(output_tensor(model, inputs))
        return outs

    async def main() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return await asyncio.gather(serve("a"), serve("b"))

    outs_a, outs_b = asyncio.run(main())
    assert all(torch.equal(o, expected["a"]) for o in outs_a)
    assert all(torch.equal(o, expected["b"]) for o in outs_b)


def test_compiled_model_does_not_recompile_when_only_the_routing_changes() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, inputs = build_tiny("llama")
    ak.add_adapter(model, "a", ak.LoraConfig(rank=4))
    ak.add_adapter(model, "b", ak.LoraConfig(rank=2))  # another rank: the row stacks keep one shape anyway
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    frames = []
    for routes in (["a", "b"], ["b", "a"], ["a", None], [None, "b"], ["b", "b"], [None, None]):
        with ak.route(model, routes), torch.no_grad():
            eager = model(**inputs).logits
            out = compiled(**inputs).logits
        torch.testing.assert_close(out, eager)
        frames.append(counter.frame_count)
    assert frames[0] > 0
    assert frames == [frames[0]] * len(frames), f"recompiled: frames compiled after each call {frames}"
    torch._dynamo.reset()
