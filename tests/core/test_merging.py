"""merge_adapters: every method against a reference computation, against PEFT, and its refusals.

Algebra checks run the tiny models in float64, so tolerances derived from
float64's epsilon (tests/tolerances.py) are tight. The TIES / DARE / pruning
references are written here as loops over the entries of small matrices,
independently of adapterkit.core.merge_math.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import adapterkit as ak
from adapterkit.core.layers import MergeError, adapter_layers
from adapterkit.core.merging import MergeReport, merge_adapters
from adapterkit.errors import UnknownNameError, UsageError, UserError
from tests.tiny_models import build_tiny, output_tensor, perturb
from tests.tolerances import assert_close_scaled, forward_ops

peft = pytest.importorskip("peft")


# --- helpers ------------------------------------------------------------------------------
def lora_layers(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """Plain module path -> LoRA layer holding adapter ``name``."""
    return {p: layer for p, layer in adapter_layers(model)
            if getattr(layer, "method", "") == "lora" and layer.has_adapter(name)}


def exact_delta(layer: nn.Module, weights: dict[str, float]) -> torch.Tensor:
    """sum w_i dW_i at one layer, an adapter without weights there adding nothing."""
    parts = [w * layer.delta_weight(n).detach() for n, w in weights.items() if layer.has_adapter(n)]
    return sum(parts[1:], parts[0])


def two_loras(kind: str = "bert", dtype: torch.dtype = torch.float64) -> tuple[nn.Module, dict]:
    """Adapters a (rank 2, query+value) and b (rank 3, rsLoRA, query+key) with moved weights."""
    model, inputs = build_tiny(kind)
    model.to(dtype)
    targets = {"bert": (["query", "value"], ["query", "key"]),
               "llama": (["q_proj", "v_proj"], ["q_proj", "k_proj"])}[kind]
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2, alpha=4, targets=targets[0]))
    ak.add_adapter(model, "b", ak.LoraConfig(rank=3, alpha=5, targets=targets[1], use_rslora=True))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    return model, inputs


def mlp_with_loras(ranks: tuple[int, ...] = (2, 3), seed: int = 0) -> nn.Module:
    """A float64 Linear(6, 5) with one LoRA adapter per rank, named a, b, c..."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh()).double()
    for i, rank in enumerate(ranks):
        name = "abcdef"[i]
        ak.add_adapter(model, name, ak.LoraConfig(rank=rank, alpha=rank + 1, targets=["0"]))
        perturb(model, name, seed=10 + i, scale=0.7)
    return model


def truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def assert_delta(actual: torch.Tensor, expected: torch.Tensor, ops: int = 40, msg: str = "") -> None:
    scale = max(float(expected.abs().max()), float(actual.abs().max()), 1e-300)
    assert_close_scaled(actual, expected, ops=ops, scale=scale, msg=msg)


# --- LoRA: each method against its reference ---------------------------------------------------
def test_cat_is_the_exact_weighted_sum_over_the_union_of_targets() -> None:
    model, _ = two_loras()
    report = merge_adapters(model, {"a": 0.7, "b": -0.3}, "ab")
    assert report == MergeReport(name="ab", method="cat", rank=5, worst_error=None, mean_error=None, modules=6)
    merged = lora_layers(model, "ab")
    assert set(merged) == set(lora_layers(model, "a")) | set(lora_layers(model, "b"))  # query, key, value
    for path, layer in merged.items():
        assert_delta(layer.delta_weight("ab"), exact_delta(layer, {"a": 0.7, "b": -0.3}), msg=path)
    assert ak.get_adapter_config(model, "ab").rank == 5


def test_svd_is_the_truncated_svd_of_the_exact_sum() -> None:
    model, _ = two_loras()
    weights = {"a": 0.6, "b": 0.9}
    default = merge_adapters(model, weights, "d", method="svd")
    assert default.rank == 3  # the largest input rank
    low = merge_adapters(model, weights, "low", method="svd", rank=1)
    errors = []
    for path, layer in lora_layers(model, "low").items():
        exact = exact_delta(layer, weights)
        assert_delta(layer.delta_weight("d"), truncate(exact, 3), msg=path)
        assert_delta(layer.delta_weight("low"), truncate(exact, 1), msg=path)
        errors.append(float((truncate(exact, 1) - exact).norm() / exact.norm()))
    assert low.worst_error == pytest.approx(max(errors), rel=1e-9)
    assert low.mean_error == pytest.approx(sum(errors) / len(errors), rel=1e-9)
    assert 0 < low.mean_error < 1
    assert default.worst_error > 0  # at query, a rank-2 plus a rank-3 update does not fit rank 3
    full = merge_adapters(model, weights, "full", method="svd", rank=5)
    assert full.worst_error == pytest.approx(0.0, abs=1e-12)


def test_linear_is_peft_formula_with_signed_square_roots() -> None:
    model = mlp_with_loras((3, 3))
    layer = model[0]
    weights = {"a": 0.8, "b": -0.5}
    report = merge_adapters(model, weights, "lin", method="linear")
    roots = {n: math.sqrt(abs(w * layer.scaling[n])) for n, w in weights.items()}
    a = sum(math.copysign(roots[n], w) * layer.lora_A[n].weight for n, w in weights.items())
    b = sum(roots[n] * layer.lora_B[n].weight for n in weights)
    assert_delta(layer.delta_weight("lin"), (b @ a).detach())
    exact = exact_delta(layer, weights)
    assert report.rank == 3
    assert report.worst_error == pytest.approx(float(((b @ a).detach() - exact).norm() / exact.norm()), rel=1e-9)
    assert report.worst_error > 0.01  # documented as inexact for more than one adapter


# Independent references: plain loops over the entries.
def ref_keep_largest(m: torch.Tensor, density: float) -> torch.Tensor:
    flat = m.flatten().tolist()
    count = int(density * len(flat))
    order = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))
    keep = set(order[:count])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(flat)], dtype=m.dtype).reshape(m.shape)


def ref_ties_entry(values: list[float], weights: list[float], majority: str) -> float:
    """One entry of TIES: elect the sign from the unweighted values, average the agreeing weighted ones."""
    def sign(v: float) -> int:
        return (v > 0) - (v < 0)

    votes = sum(values) if majority == "total" else sum(sign(v) for v in values)
    elected = 1 if votes >= 0 else -1
    agreeing = [w * v for v, w in zip(values, weights) if sign(v) == elected]
    return sum(agreeing) / max(len(agreeing), 1)


def deltas_of(layer: nn.Module, names: list[str]) -> list[torch.Tensor]:
    return [layer.delta_weight(n).detach() for n in names]


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_against_an_entrywise_reference(majority: str) -> None:
    model = mlp_with_loras((2, 3, 1))
    weights = {"a": 0.9, "b": -0.4, "c": 0.6}
    report = merge_adapters(model, weights, "t", method="ties", density=0.5, majority_sign=majority, rank=5)
    layer = model[0]
    pruned = [ref_keep_largest(d, 0.5) for d in deltas_of(layer, list(weights))]
    expected = torch.zeros(5, 6, dtype=torch.float64)
    for i, j in itertools.product(range(5), range(6)):
        expected[i, j] = ref_ties_entry([float(p[i, j]) for p in pruned], list(weights.values()), majority)
    assert_delta(layer.delta_weight("t"), expected)  # rank 5 = full: the SVD gives the target back
    assert report.worst_error == pytest.approx(0.0, abs=1e-12)
    low = merge_adapters(model, weights, "t2", method="ties", density=0.5, majority_sign=majority)
    assert low.rank == 3
    assert_delta(layer.delta_weight("t2"), truncate(expected, 3))
    assert low.worst_error == pytest.approx(float((truncate(expected, 3) - expected).norm() / expected.norm()))


def test_magnitude_prune_against_an_entrywise_reference() -> None:
    model = mlp_with_loras((2, 3))
    weights = {"a": 0.7, "b": 1.3}
    merge_adapters(model, weights, "m", method="magnitude_prune", density=0.3, rank=5)
    layer = model[0]
    expected = sum(w * ref_keep_largest(d, 0.3) for w, d in zip(weights.values(), deltas_of(layer, ["a", "b"])))
    assert_delta(layer.delta_weight("m"), expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_entries_are_a_kept_subset_rescaled_and_seeded(method: str) -> None:
    model = mlp_with_loras((2, 3))
    weights = {"a": 0.7, "b": -0.4}
    density = 0.5
    merge_adapters(model, weights, "d", method=method, density=density, rank=5, seed=3)
    merge_adapters(model, weights, "again", method=method, density=density, rank=5, seed=3)
    merge_adapters(model, weights, "other", method=method, density=density, rank=5, seed=4)
    layer = model[0]
    got, deltas = layer.delta_weight("d").detach(), deltas_of(layer, ["a", "b"])
    assert_delta(layer.delta_weight("again"), got)  # the same seed, the same drops
    assert (layer.delta_weight("other") - got).abs().max() > 1e-3
    patterns = set()
    for i, j in itertools.product(range(5), range(6)):
        # Each entry must be what some keep/drop pattern of the two adapters gives.
        candidates = {}
        for keep in itertools.product([0, 1], repeat=2):
            values = [k * float(d[i, j]) / density for k, d in zip(keep, deltas)]
            if method == "dare_linear":
                candidates[keep] = sum(w * v for w, v in zip(weights.values(), values))
            else:
                candidates[keep] = ref_ties_entry(values, list(weights.values()), "total")
        scale = sum(abs(float(d[i, j])) for d in deltas) / density
        hits = [k for k, v in candidates.items() if abs(v - float(got[i, j])) <= 1e-10 * max(scale, 1e-30)]
        assert hits, f"entry {(i, j)}: {float(got[i, j])} is none of {candidates}"
        patterns.update(hits)
    assert len(patterns) >= 3  # drops really happen, and not all alike


def test_density_one_prunes_nothing() -> None:
    model = mlp_with_loras((2, 3))
    weights = {"a": 0.5, "b": 0.5}
    for method in ("dare_linear", "magnitude_prune"):
        merge_adapters(model, weights, method, method=method, density=1.0, rank=5)
        assert_delta(model[0].delta_weight(method), exact_delta(model[0], weights), msg=method)


# --- LoRA: against PEFT ----------------------------------------------------------------------
def peft_pair(model: nn.Module, tmp_path: Path, kind: str) -> nn.Module:
    """PEFT's model holding our adapters a and b, loaded from our saved files."""
    ak.save_adapter(model, "a", tmp_path / "a")
    ak.save_adapter(model, "b", tmp_path / "b")
    base, _ = build_tiny(kind)
    wrapped = peft.PeftModel.from_pretrained(base.double(), str(tmp_path / "a"), adapter_name="a")
    wrapped.load_adapter(str(tmp_path / "b"), adapter_name="b")
    return wrapped


def peft_delta(wrapped: nn.Module, path: str, name: str) -> torch.Tensor:
    layer = wrapped.base_model.model.get_submodule(path)
    return layer.get_delta_weight(name).detach()


def test_cat_svd_and_ties_match_peft(tmp_path: Path) -> None:
    model, _ = two_loras("llama")  # no task head: PEFT refuses to merge adapters with modules_to_save
    wrapped = peft_pair(model, tmp_path, "llama")
    weights = {"a": 0.75, "b": -0.25}  # exact in float32, the dtype PEFT holds the weights in for svd/ties
    cases = {"cat": ("cat", {}), "svd": ("svd", {"svd_rank": 2}),
             "ties": ("ties_svd", {"svd_rank": 2, "density": 0.6, "majority_sign_method": "frequency"})}
    ours = {"cat": {}, "svd": {"rank": 2}, "ties": {"rank": 2, "density": 0.6, "majority_sign": "frequency"}}
    for method, (combination, options) in cases.items():
        wrapped.add_weighted_adapter(list(weights), list(weights.values()), f"p_{method}",
                                     combination_type=combination, **options)
        merge_adapters(model, weights, f"o_{method}", method=method, **ours[method])  # type: ignore[arg-type]
        layers = lora_layers(model, f"o_{method}")
        assert len(layers) == 6
        for path, layer in layers.items():
            assert_delta(layer.delta_weight(f"o_{method}"), peft_delta(wrapped, path, f"p_{method}"),
                         msg=f"{method} {path}: ")


# --- LoRA: identities ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,options", [
    ("cat", {}), ("svd", {}), ("linear", {}), ("ties", {"density": 1.0}),
    ("magnitude_prune", {"density": 1.0}), ("dare_ties", {"density": 1.0}),
])
def test_one_adapter_at_weight_one_gives_it_back(method: str, options: dict) -> None:
    model, inputs = two_loras()
    with torch.no_grad():  # a head of its own, so that the head's average is checked too
        for param in ak.head_parameters(model, "a").values():
            param.add_(0.5)
    ak.set_active(model, "a")
    expected = output_tensor(model, inputs)
    merge_adapters(model, {"a": 1.0}, "copy", method=method, **options)  # type: ignore[arg-type]
    assert ak.active_adapters(model) == ["a"]  # the active set is kept
    ak.set_active(model, "copy")
    assert_close_scaled(output_tensor(model, inputs), expected, ops=forward_ops(model))


def test_negative_weight_cancels_the_adapter() -> None:
    model, inputs = two_loras("llama")
    with ak.adapters_disabled(model):
        base = output_tensor(model, inputs)
    merge_adapters(model, {"a": -1.0}, "minus_a")
    ak.set_active(model, "a")
    with_a = output_tensor(model, inputs)
    ak.set_active(model, ["a", "minus_a"])  # LoRA deltas add up: dW_a - dW_a
    tolerance = assert_close_scaled(output_tensor(model, inputs), base, ops=forward_ops(model))
    assert (with_a - base).abs().max() > 100 * tolerance
    for layer in lora_layers(model, "minus_a").values():
        assert_delta(layer.delta_weight("minus_a"), -layer.delta_weight("a").detach())


def test_embedding_and_conv1d_loras_merge() -> None:
    model, _ = build_tiny("gpt2")
    model.double()
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2, targets=["wte", "c_attn"]))
    ak.add_adapter(model, "b", ak.LoraConfig(rank=2, alpha=3, targets=["wte", "c_fc"]))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    weights = {"a": 0.5, "b": 1.5}
    merge_adapters(model, weights, "cat")
    merge_adapters(model, weights, "svd", method="svd", rank=4)
    merge_adapters(model, weights, "lin", method="linear")
    for path, layer in lora_layers(model, "cat").items():
        exact = exact_delta(layer, weights)
        assert_delta(layer.delta_weight("cat"), exact, msg=path)
        assert_delta(layer.delta_weight("svd"), exact, msg=path)  # rank 4 holds the rank <= 4 sum
    assert "transformer.wte" in lora_layers(model, "lin")


@pytest.mark.parametrize("kind,method", [("bert", "cat"), ("gpt2", "svd")])
def test_merged_adapter_saves_and_peft_loads_it_with_the_same_outputs(kind: str, method: str,
                                                                     tmp_path: Path) -> None:
    model, inputs = build_tiny(kind)
    targets = {"bert": (["query", "value"], ["key", "output.dense"]), "gpt2": (["wte", "c_attn"], ["c_proj"])}[kind]
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2, targets=targets[0]))
    ak.add_adapter(model, "b", ak.LoraConfig(rank=3, targets=targets[1]))
    for name, seed in (("a", 1), ("b", 2)):
        perturb(model, name, seed=seed)
        with torch.no_grad():
            for param in ak.head_parameters(model, name).values():
                param.add_(0.3 * seed)
    merge_adapters(model, {"a": 0.8, "b": 0.6}, "ab", method=method)  # type: ignore[arg-type]
    ak.set_active(model, "ab")
    expected = output_tensor(model, inputs)
    ak.save_adapter(model, "ab", tmp_path)
    base, _ = build_tiny(kind)
    base_out = output_tensor(base, inputs)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    tolerance = assert_close_scaled(output_tensor(loaded, inputs), expected, ops=forward_ops(base))
    assert (base_out - expected).abs().max() > 10 * tolerance
    fresh, _ = build_tiny(kind)  # and we load it back too
    ak.load_adapter(fresh, tmp_path, name="ab")
    assert_close_scaled(output_tensor(fresh, inputs), expected, ops=forward_ops(base))


def test_heads_are_the_weighted_average() -> None:
    model, _ = two_loras()
    heads = {}
    for name, shift in (("a", 1.0), ("b", -2.0)):
        with torch.no_grad():
            for key, param in ak.head_parameters(model, name).items():
                param.add_(shift)
        heads[name] = {k.replace(f".{name}.", "."): p.detach().clone()
                       for k, p in ak.head_parameters(model, name).items()}
    merge_adapters(model, {"a": 3.0, "b": 1.0}, "ab")
    merged = {k.replace(".ab.", "."): p for k, p in ak.head_parameters(model, "ab").items()}
    assert set(merged) == set(heads["a"]) == {"classifier.copies.weight", "classifier.copies.bias"}
    for key, value in merged.items():
        assert_delta(value, 0.75 * heads["a"][key] + 0.25 * heads["b"][key], ops=4)
    with pytest.raises(UsageError, match=r"sum to 0.*'classifier'.*non-zero sum"):
        merge_adapters(model, {"a": 1.0, "b": -1.0}, "diff")
    assert "diff" not in ak.list_adapters(model)


# --- other methods ----------------------------------------------------------------------------
def test_ia3_linear_is_the_weighted_sum_of_the_vectors() -> None:
    model, _ = build_tiny("bert")
    model.double()
    ak.add_adapter(model, "a", ak.IA3Config())
    ak.add_adapter(model, "b", ak.IA3Config())
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    report = merge_adapters(model, {"a": 0.25, "b": 0.75}, "ab", method="linear")
    assert report.rank is None and report.worst_error is None and report.modules == 6
    layers = [layer for _, layer in adapter_layers(model) if getattr(layer, "method", "") == "ia3"]
    assert len(layers) == 6
    for layer in layers:
        expected = 0.25 * layer.ia3_l["a"] + 0.75 * layer.ia3_l["b"]
        assert_delta(layer.ia3_l["ab"], expected.detach(), ops=2)
        assert layer.is_feedforward["ab"] == layer.is_feedforward["a"]
    with pytest.raises(MergeError, match="only with 'linear': IA3 vectors rescale activations"):
        merge_adapters(model, {"a": 0.5, "b": 0.5}, "x", method="cat")
    ak.add_adapter(model, "c", ak.IA3Config(targets=["key", "value"], feedforward=[]))
    with pytest.raises(MergeError, match="different layouts"):
        merge_adapters(model, {"a": 0.5, "c": 0.5}, "x", method="linear")


def test_bottleneck_cat_adds_the_weighted_outputs_exactly() -> None:
    model, _ = build_tiny("bert")
    model.double()
    for name, factor in (("a", 8), ("b", 16), ("c", 32)):  # 4 + 2 + 1 = 7 units: one zero unit pads to 8
        ak.add_adapter(model, name, ak.BottleneckConfig(reduction_factor=factor, non_linearity="tanh"))
        perturb(model, name, seed=ord(name))
    weights = {"a": 0.5, "b": -1.5, "c": 2.0}
    merge_adapters(model, weights, "abc", method="cat")
    assert ak.get_adapter_config(model, "abc").reduction_factor == 4
    gen = torch.Generator().manual_seed(0)
    layers = {p: layer for p, layer in adapter_layers(model) if getattr(layer, "method", "") == "bottleneck"}
    assert len(layers) == 4
    for path, layer in layers.items():
        x = torch.randn(3, 5, layer.base_layer.in_features, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            base = layer.base_layer(x)
            added = {}
            for name in ["a", "b", "c", "abc"]:
                ak.set_active(model, name)
                added[name] = layer(x) - base
        expected = sum(w * added[n] for n, w in weights.items())
        assert_delta(added["abc"], expected, ops=80, msg=path)
        assert expected.abs().max() > 1e-3
    with pytest.raises(MergeError, match="only with 'cat': a bottleneck's output passes through its non-linearity"):
        merge_adapters(model, weights, "x", method="linear")
    ak.add_adapter(model, "relu", ak.BottleneckConfig(non_linearity="relu"))
    with pytest.raises(MergeError, match="share placement and non-linearity"):
        merge_adapters(model, {"a": 1.0, "relu": 1.0}, "x")


def test_bitfit_offsets_add_up() -> None:
    model, inputs = build_tiny("bert")
    model.double()
    ak.add_adapter(model, "a", ak.BitFitConfig(), train_head=False)
    ak.add_adapter(model, "b", ak.BitFitConfig(), train_head=False)
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    ak.set_active(model, ["a", "b"])  # offsets add: the same as merging at weights 1, 1
    expected = output_tensor(model, inputs)
    merge_adapters(model, {"a": 1.0, "b": 1.0}, "ab", method="linear")
    merge_adapters(model, {"a": 2.0, "b": -1.0}, "lin")
    ak.set_active(model, "ab")
    assert_close_scaled(output_tensor(model, inputs), expected, ops=forward_ops(model))
    for _, layer in adapter_layers(model):
        if getattr(layer, "method", "") == "bitfit":
            assert_delta(layer.bitfit["lin"].bias, (2 * layer.bitfit["a"].bias - layer.bitfit["b"].bias).detach(),
                         ops=2)
    with pytest.raises(MergeError, match="only with 'linear' or 'cat'"):
        merge_adapters(model, {"a": 1.0}, "x", method="svd")


# --- refusals -----------------------------------------------------------------------------------
def test_bad_arguments_are_refused_with_what_was_expected() -> None:
    model, _ = two_loras()
    cases = [
        (UnknownNameError, r"no adapter called 'zz' to merge; the model has \['a', 'b'\]", ({"zz": 1.0}, "m"), {}),
        (UsageError, "weights is empty", ({}, "m"), {}),
        (UsageError, "already has an adapter called 'b'", ({"a": 1.0}, "b"), {}),
        (UsageError, "without dots", ({"a": 1.0}, "m.x"), {}),
        (UsageError, r"method must be one of \['cat', 'svd'.*got 'mean'", ({"a": 1.0}, "m"), {"method": "mean"}),
        (UsageError, "rank must be a positive integer, got 0", ({"a": 1.0}, "m"), {"method": "svd", "rank": 0}),
        (UsageError, "rank applies to the SVD-based methods", ({"a": 1.0}, "m"), {"rank": 2}),
        (UsageError, r"'ties' needs density=", ({"a": 1.0}, "m"), {"method": "ties"}),
        (UsageError, r"density must be a number in \(0, 1\], got 0", ({"a": 1.0}, "m"),
         {"method": "dare_linear", "density": 0}),
        (UsageError, r"density must be a number in \(0, 1\], got 1.5", ({"a": 1.0}, "m"),
         {"method": "ties", "density": 1.5}),
        (UsageError, "density applies to", ({"a": 1.0}, "m"), {"density": 0.5}),
        (UsageError, "majority_sign must be one of", ({"a": 1.0}, "m"),
         {"method": "ties", "density": 0.5, "majority_sign": "mean"}),
        (UsageError, "weight of 'a' must be a finite number", ({"a": float("nan")}, "m"), {}),
        (UsageError, r"'linear' .* needs adapters of one rank; found ranks \{'a': 2, 'b': 3\}",
         ({"a": 1.0, "b": 1.0}, "m"), {"method": "linear"}),
    ]
    for error, message, args, kwargs in cases:
        with pytest.raises(error, match=message):
            merge_adapters(model, *args, **kwargs)
        assert issubclass(error, UserError)
    assert ak.list_adapters(model) == ["a", "b"] and ak.active_adapters(model) == ["b"]


def test_methods_without_a_merge_rule_are_refused() -> None:
    model, _ = build_tiny("bert")
    ak.add_adapter(model, "dora", ak.LoraConfig(rank=2, targets=["query"], use_dora=True))
    ak.add_adapter(model, "lora", ak.LoraConfig(rank=2, targets=["query"]))
    ak.add_adapter(model, "ia3", ak.IA3Config())
    ak.add_adapter(model, "prefix", ak.PrefixTuningConfig(num_virtual_tokens=3))
    ak.add_adapter(model, "prompt", ak.PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(MergeError, match=r"DoRA adapters \['dora'\] cannot be merged.*magnitude"):
        merge_adapters(model, {"dora": 1.0, "lora": 1.0}, "m")
    with pytest.raises(MergeError, match=r"different methods \(\{'lora': 'lora', 'ia3': 'ia3'\}\)"):
        merge_adapters(model, {"lora": 1.0, "ia3": 1.0}, "m")
    with pytest.raises(MergeError, match="prefix_tuning adapters cannot be merged into one: .*softmax attention"):
        merge_adapters(model, {"prefix": 1.0}, "m")
    with pytest.raises(MergeError, match="prompt_tuning adapters cannot be merged into one: .*virtual tokens"):
        merge_adapters(model, {"prompt": 0.5}, "m")
    assert ak.list_adapters(model) == ["dora", "lora", "ia3", "prefix", "prompt"]


def test_the_default_plan_survives_a_merge() -> None:
    import adapterkit as ak
    from tests.tiny_models import build_tiny

    model, _ = build_tiny("bert")
    ak.add_adapter(model, "a", ak.LoraConfig(rank=2))
    ak.add_adapter(model, "b", ak.LoraConfig(rank=2))
    plan = ak.Average({"a": 0.3, "b": 0.7})
    ak.set_active(model, plan)
    ak.merge_adapters(model, {"a": 0.5, "b": 0.5}, "ab")
    assert ak.active_plan(model) == plan
