"""How each request's next token is chosen from the logits: greedy, or sampled with its own generator.

Greedy rows take ``argmax`` (the first of equal maxima, as ``generate`` does).
A sampled row draws from ``softmax(logits / temperature)``, cut to the
smallest set of tokens holding ``top_p`` of the mass, with a generator of its
own, so a seeded request gives the same text whatever shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


# Temperatures below this decode greedily (as in vLLM): dividing logits by them overflows to inf.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (OpenAI's names)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether the next token is always the most likely one."""
        return self.temperature < GREEDY_BELOW


def row_generator(params: SamplingParams, choice: int, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The random generator of one choice of a sampled request (``None`` for greedy ones).

    With a ``seed``, choice ``i`` draws from ``seed + i``; without, from fresh entropy.
    """
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed + choice)
    else:
        generator.seed()
    return generator


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token drawn from a row of float logits with temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        drop = before >= params.top_p
        drop[0] = False  # the most likely token stays, however small top_p (even one that is 0 in float32)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of every row of ``logits`` ``(rows, vocabulary)``, float32."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (setting, generator) in enumerate(zip(params, generators)):
        if generator is not None:
            chosen[row] = sample_row(logits[row], setting, generator)
    return chosen
