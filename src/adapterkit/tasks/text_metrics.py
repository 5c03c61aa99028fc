"""Metrics of generated text: perplexity, exact match of short answers, BLEU and chrF.

BLEU and chrF are sacrebleu's corpus scores with its defaults (13a
tokenisation, chrF with character n-grams up to 6 and beta 2), so the
numbers compare with published ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def perplexity(total_nll: float, total_tokens: int) -> float:
    """``exp`` of the mean negative log-likelihood per token (``inf`` with no tokens)."""
    if total_tokens == 0:
        return float("inf")
    mean = total_nll / total_tokens
    return math.exp(mean) if mean < 700 else float("inf")


def extract_answer(generated: str, numeric: bool) -> str:
    """The final answer a generation gives.

    After a GSM8K-style ``####`` marker, the text that follows it (first line);
    else, for a numeric reference, the last number in the text; else the
    first line of the text.
    """
    if "####" in generated:
        tail = generated.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0] if tail else ""
    if numeric:
        numbers = NUMBER.findall(generated)
        return numbers[-1] if numbers else ""
    stripped = generated.strip()
    return stripped.splitlines()[0] if stripped else ""


def normalize_answer(answer: str) -> str:
    """Case, surrounding punctuation, ``$``/``%`` and thousands separators removed; numbers canonical."""
    text = answer.strip().lower().replace("$", "").replace("%", "")
    text = re.sub(r"\s+", " ", text).strip(" .!?;:\"'")
    candidate = text.replace(",", "")
    try:
        value = float(candidate)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def is_numeric(answer: str) -> bool:
    """Whether a reference answer is a number (then the last number generated is compared)."""
    try:
        float(answer.strip().replace(",", "").replace("$", ""))
    except ValueError:
        return False
    return True


def exact_match(generated: str, answer: str) -> bool:
    """Whether the generation's final answer equals the reference answer after normalisation."""
    return normalize_answer(extract_answer(generated, is_numeric(answer))) == normalize_answer(answer)


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacrebleu corpus BLEU and chrF (both 0-100) of hypotheses against one reference each."""
    import sacrebleu

    hypotheses, references = list(hypotheses), [list(references)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, references).score),
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, references).score),
    }
