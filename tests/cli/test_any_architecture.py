"""``adapterkit train`` with no targets on every encoder task, for architectures other than BERT.

The default LoRA targets come from the architecture table (attention
projections and FFN), so GPT-2, Llama, DistilBERT and RoBERTa folders train
classification, NER and QA from the command line exactly as BERT does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModel,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from adapterkit.cli.main import main
from tests.tiny_ner import toy_ner
from tests.tiny_qa import toy_colours, write_squad
from tests.tiny_text import toy_sentiment

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def _vocabulary() -> list[str]:
    words: set[str] = set()
    for row in toy_sentiment(60):
        words.update(row["text"].lower().split())
    for row in toy_ner(60):
        words.update(t.lower() for t in row["tokens"])
    for row in toy_colours(60):
        words.update((row["question"] + " " + row["context"]).lower().split())
    return SPECIALS + sorted(words)


def _tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (offsets and word ids work) with [CLS] a [SEP] b [SEP] framing."""
    vocab = {w: i for i, w in enumerate(_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.save_pretrained(folder)
    return tokenizer


def _config(arch: str, vocab_size: int):
    small = dict(vocab_size=vocab_size, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **small)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **small)
    if arch == "distilbert":
        return DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=128,
                                **small)
    return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=130, type_vocab_size=1, **small)


@pytest.fixture(scope="module", params=["gpt2", "llama", "distilbert", "roberta"])
def model_folder(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    tokenizer = _tokenizer(folder)
    AutoModel.from_config(_config(request.param, len(tokenizer))).save_pretrained(folder)
    return folder


def _data(kind: str, folder: Path) -> tuple[str, Path]:
    if kind == "classification":
        path = folder / "reviews.csv"
        pd.DataFrame(toy_sentiment(48)).to_csv(path, index=False)
    elif kind == "token-classification":
        path = folder / "tags.conll"
        path.write_text("\n\n".join("\n".join(f"{t} {g}" for t, g in zip(r["tokens"], r["tags"]))
                                    for r in toy_ner(48)) + "\n")
    else:
        path = write_squad(folder / "squad.json", toy_colours(48))
    return kind, path


@pytest.mark.parametrize("task", ["classification", "token-classification", "question-answering"])
def test_cli_trains_every_encoder_task_with_default_targets(model_folder, task, tmp_path, capsys):
    _, data = _data(task, tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(
        {"train": {"progress": False, "num_threads": 1, "batch_size": 8}}))
    run = tmp_path / "run"
    code = main(["train", "--config", str(tmp_path / "run.yaml"), "--model", str(model_folder), "--task", task,
                 "--data", str(data), "--max-steps", "3", "--max-length", "64", "--output", str(run)])
    out, err = capsys.readouterr()
    assert code == 0, err
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    # PEFT's own matching of the saved targets picks attention and FFN modules of every block
    modules = [n for n, _ in AutoModel.from_pretrained(model_folder).named_modules()]
    matched = [n for n in modules if re.fullmatch(config["target_modules"], n)]
    blocks = {re.search(r"\.(\d+)\.", n).group(1) for n in matched}
    assert len(blocks) == 2 and len(matched) >= 2 * 4  # q/k/v(or fused)/out/FFN in both blocks
    assert "validation:" in out
