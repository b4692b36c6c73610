"""The mean-pooling layer's shortcuts: same scores, less work, nothing else touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aifn import model as model_module
from aifn.model import TextClassifier
from aifn.simplify import simplify

TEXTS = [
    "I love this, it works perfectly!",
    "Terrible, it broke after a day.",
    "Meh.",
    "The hotel room was clean and quiet, the breakfast was average and the staff were "
    "friendly, but the wifi kept dropping every evening.",
]


def _load(path: Path, quantize: str) -> TextClassifier:
    return TextClassifier.load(path, max_tokens=256, batch_size=32, threads=1, quantize=quantize)


@pytest.mark.parametrize("quantize", ["off", "auto"])
def test_served_scores_are_exactly_the_full_computations(
    sentiment_model_dir: Path, quantize: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _load(sentiment_model_dir, quantize)
    monkeypatch.setattr(model_module, "simplify", lambda _model: [])
    full = _load(sentiment_model_dir, quantize)

    # Mixed lengths in one batch, so padding goes through the pooling layer's mask too.
    fast_scores, _ = fast.probabilities(TEXTS)
    full_scores, _ = full.probabilities(TEXTS)
    assert fast_scores == full_scores
    # The shortcut is really there: the pooling layer no longer multiplies by its constants.
    pooling = fast.module.base_model.encoder.layer[-1]
    assert type(pooling.attention.self.query) is not torch.nn.Linear
    assert type(pooling.output.dense) is not torch.nn.Linear
    assert type(full.module.base_model.encoder.layer[-1].output.dense) is torch.nn.Linear
    # ... while keeping every parameter under its name, so the model looks the same from outside.
    assert fast.module.state_dict().keys() == full.module.state_dict().keys()


def test_only_pooling_layers_with_constant_matrices_are_touched() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from aifn.training import append_mean_pooling_layer

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    # A trained layer with a zero bias or a sparse weight is not a constant layer.
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.value.bias.zero_()
        model.bert.encoder.layer[1].output.dense.weight[:, :8] = 0
    assert simplify(model) == []

    append_mean_pooling_layer(model)
    ids = torch.tensor([[1, 5, 7, 9, 2], [1, 4, 2, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        replaced = simplify(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert replaced == [
        f"bert.encoder.layer.2.{name}"
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "output.dense",
            "intermediate",
        )
    ]
    assert torch.equal(before, after)
    # The trained layers are untouched.
    assert type(model.bert.encoder.layer[1].output.dense) is torch.nn.Linear
