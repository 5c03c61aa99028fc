"""A batch of decoding rows that share one KV cache, rows joining and leaving between steps.

Every row's tokens are right-aligned: ``[padding..., prompt..., generated...]``,
all rows of the same width, so a decoding step appends one column for all.
A row that joins is left-padded (or the batch is, if the newcomer is longer);
a row that leaves is dropped and the columns that are padding in every
remaining row are cut. Only caches made of plain growing layers
(transformers' ``DynamicLayer``) can be joined this way; ``joinable`` says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def joinable(cache: DynamicCache) -> bool:
    """Whether rows of this cache can be padded, joined and dropped (plain full-attention layers only)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``(batch, heads, length, dim)`` padded with zeros on the left of ``length`` up to ``width``."""
    missing = width - tensor.shape[-2]
    return F.pad(tensor, (0, 0, missing, 0)) if missing else tensor


class RowBatch:
    """The KV cache, attention mask and next position of each row being decoded together."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)  # position id of each row's next token

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def width(self) -> int:
        """Columns of the cache (padding included)."""
        return self.mask.shape[1]

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the rows of a freshly prefilled ``cache`` whose prompt mask is ``mask``."""
        positions = mask.sum(dim=1)
        if self.cache is None or not len(self):
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        width = max(self.width, mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(mask, (width - mask.shape[1], 0))])
        self.positions = torch.cat([self.positions, positions])

    def grow(self) -> None:
        """After a decoding step (which appended to the cache in place): every row gained one real column."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        self.positions = self.positions + 1

    def keep(self, rows: list[int]) -> None:
        """Go on with these rows only (in this order), cutting columns that became padding in all of them."""
        if len(rows) == len(self):
            return
        if not rows:
            self.__init__()  # type: ignore[misc]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        real = self.mask.bool().any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[..., start:, :]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[..., start:, :]
        self.mask = self.mask[:, start:]
