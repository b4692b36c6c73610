"""BERT inference in plain torch, and its tokenizer, without importing transformers.

Serving needs a BERT encoder's forward pass and nothing else, but ``transformers`` costs a cold
start about 2.5 s before the first prediction (importing it and its model classes, then
``from_pretrained``) against about 0.1 s for this module and ``tokenizers``. So a model
directory this module can run (:func:`unsupported` says which) is served by it:

* :class:`BertModel`, :class:`BertForSequenceClassification`: the same modules, parameter names
  and arithmetic as transformers' classes in inference (no dropout, no caches, no heads besides
  the sequence classifier), loaded straight from ``model.safetensors``. Sub-module names match
  too, so :mod:`aifn.quantize` and :mod:`aifn.simplify` treat both alike.
* :class:`Tokenizer`: the directory's ``tokenizer.json`` run by ``tokenizers`` (the Rust library
  transformers' fast tokenizers wrap), truncation and padding fixed at load.

Anything else (another architecture, activation or position scheme, a directory with only a
``vocab.txt``) is loaded through transformers as before. ``tests/test_bert.py`` holds the two
paths to the same tokens and float32 scores; int8 scores differ a little in batches, since the
padding, which hidden states here skip (:class:`_Layout`), no longer enters the input scales.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional

CLASSIFIER_ARCHITECTURE = "BertForSequenceClassification"
ENCODER_ARCHITECTURE = "BertModel"


def unsupported(config: dict[str, Any], path: Path, *, classifier: bool) -> str | None:
    """Why this module cannot run the model in ``path``, or None when it can."""
    architectures = config.get("architectures") or []
    # An encoder's config may name no architecture; a classifier's names its head.
    allowed = [[CLASSIFIER_ARCHITECTURE]] if classifier else [[ENCODER_ARCHITECTURE], []]
    checks = [
        (config.get("model_type") == "bert", f"model_type {config.get('model_type')!r}"),
        (architectures in allowed, f"architectures {architectures}"),
        (
            config.get("position_embedding_type", "absolute") == "absolute",
            f"position_embedding_type {config.get('position_embedding_type')!r}",
        ),
        (config.get("hidden_act", "gelu") == "gelu", f"hidden_act {config.get('hidden_act')!r}"),
        (not config.get("is_decoder"), "a decoder"),
        ((path / "tokenizer.json").is_file(), "no tokenizer.json"),
    ]
    reasons = [reason for ok, reason in checks if not ok]
    return ", ".join(reasons) if reasons else None


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT ``config.json`` that inference uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    id2label: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BertConfig:
        id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
        names = cls.__dataclass_fields__.keys() - {"id2label"}
        return cls(**{k: config[k] for k in names if config.get(k) is not None}, id2label=id2label)


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = _embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = _embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = _embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        out: torch.Tensor = self.LayerNorm(x + self.position_embeddings(positions))
        return out


def _embedding(rows: int, width: int) -> nn.Embedding:
    """An embedding table without random initialisation (its weights are loaded after).

    ``nn.Embedding(rows, width)`` draws normal values, which on the meta device :func:`load`
    builds on goes through torch's reference ops and imports ``torch._dynamo``: a second.
    """
    table: nn.Embedding = nn.Embedding.from_pretrained(  # type: ignore[no-untyped-call]
        torch.empty(rows, width), freeze=False
    )
    return table


class _Layout:
    """Where a batch's real tokens sit among its padding.

    Hidden states travel *packed*, ``(tokens, width)`` with the padding left out, so the linear
    layers, layer norms and activations (nearly all the work) run on real tokens only; only
    attention, which mixes the tokens of a text, sees them padded as ``(texts, length, width)``.
    On texts of mixed lengths that skips the padding's share of the work (about a fifth of the
    tokens in batches of 8 short reviews), and a text's int8 input scales no longer depend on
    how much padding its batch-mates brought.
    """

    def __init__(self, attention_mask: torch.Tensor | None, batch: int, length: int) -> None:
        self.batch, self.length = batch, length
        self.index: torch.Tensor | None = None  # flat positions of the real tokens
        self.mask: torch.Tensor | None = None  # attention's key mask, None without padding
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            self.index = keep.flatten().nonzero().squeeze(1)
            self.mask = keep[:, None, None, :]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(texts, length, width)`` -> ``(tokens, width)``."""
        flat = x.reshape(self.batch * self.length, x.shape[-1])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(tokens, width)`` -> ``(texts, length, width)``, zeros where the padding is."""
        if self.index is None:
            return x.view(self.batch, self.length, x.shape[-1])
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        out.index_copy_(0, self.index, x)
        return out.view(self.batch, self.length, x.shape[-1])


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        width = x.shape[-1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            padded = layout.unpack(t).view(layout.batch, layout.length, self.heads, -1)
            return padded.transpose(1, 2)

        out = functional.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=layout.mask
        )
        return layout.pack(out.transpose(1, 2).reshape(layout.batch, layout.length, width))


class _ResidualOutput(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's attention output and feed-forward output."""

    def __init__(self, c: BertConfig, inputs: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(x) + residual)
        return out


class _Attention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _ResidualOutput(c, c.hidden_size)

    def forward(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        out: torch.Tensor = self.output(self.self(x, layout), x)
        return out


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _ResidualOutput(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        attended = self.attention(x, layout)
        out: torch.Tensor = self.output(self.intermediate(attended), attended)
        return out


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, layout)
        return x


class _Pooler(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(states[:, 0]))


class BertModel(nn.Module):
    """A BERT encoder: token ids in, the last layer's token states out (no pooler)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    @property
    def base_model(self) -> BertModel:
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        return EncoderOutput(self._states(input_ids, attention_mask, token_type_ids))

    def _states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The last layer's token states, ``(texts, length, width)``, zeros at the padding."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # Padded keys are never attended to; with no padding in the batch, no mask at all
        # (scaled_dot_product_attention's fastest kernel).
        layout = _Layout(attention_mask, *input_ids.shape)
        embedded = layout.pack(self.embeddings(input_ids, token_type_ids))
        return layout.unpack(self.encoder(embedded, layout))


class _BertBody(BertModel):
    """The encoder inside a classifier, which also has BERT's pooler."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.pooler = _Pooler(config)


class BertForSequenceClassification(nn.Module):
    """A BERT encoder, its pooler (the first token's state) and a linear classifier."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = _BertBody(config)
        self.classifier = nn.Linear(config.hidden_size, len(config.id2label))

    @property
    def base_model(self) -> BertModel:
        return self.bert

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        states = self.bert._states(input_ids, attention_mask, token_type_ids)
        return ClassifierOutput(self.classifier(self.bert.pooler(states)))


def load(
    path: Path, config: dict[str, Any], *, classifier: bool
) -> tuple[nn.Module, dict[str, list[Any]]]:
    """Build the model ``config`` describes with the weights in ``path/model.safetensors``.

    Returns the model (in eval mode, float32) and a loading report in transformers' shape
    (``missing_keys``, ``mismatched_keys``) for :func:`aifn.model.check_weights`; parameters
    named there keep no value, so the caller must refuse such a model.

    Raises:
        Exception: Whatever ``safetensors`` raises for an unreadable file.
    """
    from safetensors.torch import load_file

    cfg = BertConfig.from_dict(config)
    # Built on the meta device: no memory and no random initialisation for weights about to be
    # replaced by the file's.
    with torch.device("meta"):
        model: nn.Module = BertForSequenceClassification(cfg) if classifier else BertModel(cfg)
    tensors = load_file(path / "model.safetensors")
    if not classifier:
        # A classifier's encoder saved as an encoder's checkpoint, or the reverse (as transformers
        # does): the ``bert.`` prefix is optional.
        tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    wanted = model.state_dict()
    missing = [name for name in wanted if name not in tensors]
    mismatched = [
        (name, tuple(tensors[name].shape), tuple(wanted[name].shape))
        for name in wanted
        if name in tensors and tensors[name].shape != wanted[name].shape
    ]
    if not missing and not mismatched:
        model.load_state_dict(
            {name: tensors[name].float().contiguous() for name in wanted}, assign=True
        )
    return model.eval(), {"missing_keys": missing, "mismatched_keys": mismatched}


class Tokenizer:
    """A model directory's ``tokenizer.json``, truncating at ``max_tokens``, padding a batch.

    Its settings are fixed here and never changed afterwards, so it is safe to call from
    several threads at once.
    """

    def __init__(self, path: Path, max_tokens: int) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tokenizer = RustTokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=max_tokens)
        pad = _pad_token(path)
        pad_id = self._tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"its padding token {pad!r} is not in the vocabulary")
        self._tokenizer.enable_padding(pad_id=pad_id, pad_token=pad)

    def model_inputs(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Model inputs for ``texts`` (padded to the longest) and whether each was truncated."""
        encodings = self._tokenizer.encode_batch(texts)
        inputs = {
            "input_ids": torch.tensor([e.ids for e in encodings]),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings]),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings]),
        }
        return inputs, [bool(e.overflowing) for e in encodings]


def _tokenizer_config(path: Path) -> dict[str, Any]:
    """``tokenizer_config.json``, or nothing if there is none (or it is not a JSON object)."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _pad_token(path: Path) -> str:
    """The padding token ``tokenizer_config.json`` names, else BERT's."""
    pad = _tokenizer_config(path).get("pad_token")
    if isinstance(pad, dict):  # an AddedToken written out
        pad = pad.get("content")
    return pad if isinstance(pad, str) and pad else "[PAD]"


def model_max_length(path: Path) -> int | None:
    """The longest input ``tokenizer_config.json`` allows, if it says."""
    value = _tokenizer_config(path).get("model_max_length")
    return value if isinstance(value, int) and value > 0 else None
