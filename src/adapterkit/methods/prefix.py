"""Prefix tuning (Li & Liang, 2021): learned key/value prefixes for every attention layer.

The prefixes reach the model as a pre-filled KV cache (transformers' ``DynamicCache``,
or an ``EncoderDecoderCache`` whose self-attention part holds them), and the
attention mask grows by the prefix length, so no layer of the model is touched.

Weights: with ``projection`` on, a (P, hidden) embedding goes through an MLP
(hidden -> hidden -> layers*2*kv_hidden, tanh) while training. Whenever no
gradient is needed (``torch.no_grad()``, ``generate``, a frozen adapter) the MLP
output -- the *folded table* (P, layers*2*kv_hidden) -- is computed once and
reused until the weights change. Saving writes only the folded table, under
PEFT's name ``prompt_embeddings`` and in PEFT's layout; loading a table turns
the adapter into a plain table (as PEFT does in inference mode).

Layout of the table (PEFT's): row blocks of ``kv_hidden`` columns, block ``2l``
the keys and ``2l + 1`` the values of layer ``l``; each block is (heads, head_dim)
with the key/value heads (``num_key_value_heads`` under GQA). Encoder-decoder
models get prefixes on the decoder self-attention only (their encoders take no
cache); there PEFT's ``num_transformer_submodules=2`` layout applies: decoder
layer ``i`` reads blocks ``4i`` and ``4i + 1`` (mod ``2 * layers``).

Positions: the prefix occupies positions ``0..P-1``; explicit ``position_ids``
are shifted by P, as PEFT does. Generation with the cache injects the prefix
once, into the empty cache of the first step; later steps find it there and
only the mask grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

from adapterkit.core.config import AdapterConfig, ConfigError, check_positive
from adapterkit.core.layers import get_store
from adapterkit.core.registry import Method, register
from adapterkit.core.state import AdapterState
from adapterkit.errors import UsageError
from adapterkit.methods import _virtual as vt


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning settings: prefix length and whether an MLP reparametrises the prefix.

    ``projection`` is off by default, as in PEFT: on SST-2 with MiniLM the
    MLP-reparametrised prefix did not learn at all (loss flat at ln 2 for 100
    steps at lr 1e-3; chance accuracy after 625 steps at 5e-3) while the plain
    table trained, and the MLP makes 7.8% of that model's parameters trainable.
    """

    num_virtual_tokens: int = 20
    projection: bool = False

    def validate(self) -> None:
        check_positive(self, "num_virtual_tokens")
        if not isinstance(self.projection, bool):
            raise ConfigError(f"PrefixTuningConfig.projection must be True or False, got {self.projection!r}")


@dataclass(frozen=True)
class KVLayout:
    """Where the folded table's column blocks go in the model's cache."""

    table_layers: int  # PEFT's num_layers: the table has 2 * table_layers blocks
    kv_heads: int
    head_dim: int
    hidden: int
    blocks: tuple[tuple[int, int], ...]  # per cache layer: (key block, value block)
    encoder_decoder: bool

    @property
    def kv_hidden(self) -> int:
        """Columns of one block (PEFT's ``token_dim``)."""
        return self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of the folded table."""
        return self.table_layers * 2 * self.kv_hidden


def kv_layout(model: nn.Module) -> KVLayout:
    """The prefix layout of a Hugging Face model, read from ``model.config``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ConfigError(
            f"prefix tuning needs a Hugging Face model with a config (layers, heads); "
            f"{type(model).__name__} has none"
        )
    layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    if not enc_dec:
        blocks = tuple((2 * i, 2 * i + 1) for i in range(layers))
    else:
        dec_heads = getattr(config, "decoder_attention_heads", heads)
        dec_layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
        dec_layers = dec_layers or layers
        if dec_heads != heads or dec_layers > layers:
            raise ConfigError(
                f"prefix tuning on {type(model).__name__}: the decoder has {dec_layers} layers and {dec_heads} "
                f"heads but the encoder {layers} and {heads}; PEFT's prefix layout needs decoder <= encoder "
                "layers and equal head counts"
            )
        blocks = tuple((4 * i % (2 * layers), (4 * i + 1) % (2 * layers)) for i in range(dec_layers))
    return KVLayout(layers, kv_heads, head_dim, hidden, blocks, enc_dec)


class PrefixEncoder(nn.Module):
    """The learned prefix of one adapter: an MLP-projected embedding, or a plain table."""

    def __init__(self, num_tokens: int, layout: KVLayout, projection: bool) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        if projection:
            self.embedding = nn.Parameter(torch.randn(num_tokens, layout.hidden))  # (P, hidden)
            self.transform = nn.Sequential(
                nn.Linear(layout.hidden, layout.hidden), nn.Tanh(), nn.Linear(layout.hidden, layout.width)
            )
        else:
            self.table = nn.Parameter(torch.randn(num_tokens, layout.width))  # (P, layers*2*kv_hidden)
        self._folded: torch.Tensor | None = None
        self._folded_key: tuple | None = None

    @property
    def projected(self) -> bool:
        """True while the prefix still comes from the MLP."""
        return hasattr(self, "transform")

    def forward(self) -> torch.Tensor:
        """The prefix table (P, layers*2*kv_hidden), through the MLP only when gradients need it."""
        if not self.projected:
            return self.table
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.transform(self.embedding)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._folded is None or key != self._folded_key:
            with torch.no_grad():
                self._folded = self.transform(self.embedding)
            self._folded_key = key
        return self._folded

    def folded(self) -> torch.Tensor:
        """The table as it would be saved: detached, whatever the mode."""
        with torch.no_grad():
            return self().detach()

    def fold(self) -> None:
        """Replace the MLP by the table it computes, for good (e.g. before deployment)."""
        if self.projected:
            self.load_table(self.folded())

    def load_table(self, table: torch.Tensor) -> None:
        """Replace the weights by a folded table (the MLP, if any, is dropped)."""
        reference = next(self.parameters())
        if table.shape[0] != self.num_tokens:
            raise UsageError(f"prefix table has {table.shape[0]} rows but the adapter {self.num_tokens} tokens")
        trainable = any(p.requires_grad for p in self.parameters())
        for attr in ("embedding", "transform", "table"):
            if hasattr(self, attr):
                delattr(self, attr)
        data = table.detach().to(device=reference.device, dtype=reference.dtype).clone()
        self.table = nn.Parameter(data, requires_grad=trainable)
        self._folded = None


def _self_attention_cache(cache: Cache) -> Cache:
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def _new_cache(model: nn.Module, layout: KVLayout) -> Cache:
    config = model.config
    if layout.encoder_decoder:
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    return DynamicCache(config=config)


def _fill(cache: Cache, table: torch.Tensor, layout: KVLayout, batch: int) -> None:
    """Write the prefix keys/values into an empty cache, layer by layer."""
    blocks = table.view(table.shape[0], 2 * layout.table_layers, layout.kv_heads, layout.head_dim)
    blocks = blocks.permute(1, 2, 0, 3)  # (2*layers, kv_heads, P, head_dim)
    target = _self_attention_cache(cache)
    for layer, (k, v) in enumerate(layout.blocks):
        keys = blocks[k].unsqueeze(0).expand(batch, -1, -1, -1)  # (batch, kv_heads, P, head_dim)
        values = blocks[v].unsqueeze(0).expand(batch, -1, -1, -1)
        target.update(keys, values, layer)


def _make_hooks(model: nn.Module, name: str, state: AdapterState, layout: KVLayout) -> tuple[Any, Any]:
    """The pre-hook that injects the prefix and the post-hook that hides a cache nobody asked for."""
    names = vt.forward_parameters(model)
    cache_key = vt.cache_argument(names, vt.accepts_var_kwargs(model))
    prefix = "decoder_" if layout.encoder_decoder else ""
    # One entry per call in flight: the cache we created for a call made without
    # use_cache, which must not leak into the output (generate would feed it back).
    unrequested = vt.PerThreadStack()

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        unrequested.items.append(None)
        if not vt.hook_applies(state, name):
            return None
        if module.training and vt.checkpointing(module):
            raise RuntimeError(
                "prefix tuning passes its prefixes as a KV cache, which transformers' own gradient "
                "checkpointing drops; call model.gradient_checkpointing_disable() and use adapterkit's "
                "(--gradient-checkpointing, or adapterkit.train.memory.enable_gradient_checkpointing), "
                "which keeps the cache"
            )
        kw = vt.bind_arguments(names, args, kwargs)
        if cache_key == "cache" and "past_key_values" in kw:
            kw["cache"] = kw.pop("past_key_values")
        encoder: PrefixEncoder = get_store(module).adapters[name]
        cache = kw.get(cache_key)
        if cache is None:
            cache = _new_cache(module, layout)
            if not vt.wants_cache(module, kw):
                unrequested.items[-1] = cache
        if _self_attention_cache(cache).get_seq_length() == 0:
            table = encoder().to(vt.model_dtype(module, torch.float32))
            _fill(cache, table, layout, vt.batch_size(kw))
        kw[cache_key] = cache
        mask_key, pos_key = f"{prefix}attention_mask", f"{prefix}position_ids"
        kw[mask_key] = vt.prepend(kw.get(mask_key), encoder.num_tokens, 1)
        if kw.get(pos_key) is not None:
            kw[pos_key] = kw[pos_key] + encoder.num_tokens
        return (), kw

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        cache = unrequested.items.pop() if unrequested.items else None
        return None if cache is None else vt.without(output, cache)

    return pre_hook, post_hook


@register
class PrefixTuningMethod(Method):
    """Registry entry for prefix tuning; weights live in the model's adapter store."""

    name = "prefix_tuning"
    aliases = ("prefix",)
    default_lr = 0.01
    config_class = PrefixTuningConfig
    layer_class = None
    input_side = True
    refuses = vt.INPUT_SIDE_REFUSALS
    peft_type = "PREFIX_TUNING"

    def attach(self, model: nn.Module, name: str, config: AdapterConfig, state: AdapterState) -> None:
        assert isinstance(config, PrefixTuningConfig)
        layout = kv_layout(model)
        encoder = PrefixEncoder(config.num_virtual_tokens, layout, config.projection)
        store = get_store(model, create=True)
        ref = next(model.parameters(), None)
        store.adapters[name] = encoder.to(ref.device) if ref is not None else encoder
        vt.install_hooks(model, name, state, *_make_hooks(model, name, state, layout))

    # --- files ------------------------------------------------------------------
    def export_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The folded table under PEFT's name: ``{"prompt_embeddings": (P, layers*2*kv_hidden)}``."""
        return {"prompt_embeddings": vt.stored(model, name, PrefixEncoder).folded()}

    def import_tensors(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Load a folded table (ours or PEFT's); a projected adapter becomes a plain table."""
        encoder = vt.stored(model, name, PrefixEncoder)
        table = vt.single_tensor(tensors, name)
        width = kv_layout(model).width
        if tuple(table.shape) != (encoder.num_tokens, width):
            raise UsageError(
                f"adapter {name!r}: prefix table has shape {tuple(table.shape)} in the file but the model needs "
                f"({encoder.num_tokens}, {width}) = (virtual tokens, layers*2*kv_hidden); "
                "was it trained on another base model?"
            )
        encoder.load_table(table)

    def peft_config(self, config: AdapterConfig, model: nn.Module) -> dict[str, Any]:
        """PEFT ``adapter_config.json`` content for ``config`` on ``model``."""
        assert isinstance(config, PrefixTuningConfig)
        layout = kv_layout(model)
        return {
            **vt.peft_common("PREFIX_TUNING", config.num_virtual_tokens),
            "token_dim": layout.kv_hidden,
            "num_layers": layout.table_layers,
            "num_attention_heads": layout.kv_heads,
            "num_transformer_submodules": 2 if layout.encoder_decoder else 1,
            # The file holds the folded table, which PEFT reads as a plain (unprojected) prefix.
            "prefix_projection": False,
            "encoder_hidden_size": layout.hidden,
            "init_weights": None,
        }

    def config_from_peft(self, data: dict[str, Any]) -> PrefixTuningConfig:
        """Our config for a PEFT prefix-tuning ``adapter_config.json`` (files hold folded tables)."""
        vt.check_peft_type(data, "PREFIX_TUNING")
        return PrefixTuningConfig(num_virtual_tokens=int(data["num_virtual_tokens"]), projection=False)

