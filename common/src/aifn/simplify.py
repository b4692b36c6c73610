"""Exact shortcuts for linear layers whose weights make them trivial.

The sentiment model's frozen mean-pooling layer (:func:`aifn.training.append_mean_pooling_layer`)
is a standard BERT layer built from constants: zero queries and keys, scaled-identity values, an
identity attention output and an all-zero feed-forward output. Run as written it costs as much
as any other layer, about a seventh of the encoder, to multiply by zeros and identities. At load
time :func:`simplify` swaps such linear layers for what they compute:

* weight and bias all zero -> zeros of the output's shape (the matrix product is skipped);
* weight ``c * I`` and bias zero -> ``c * x``;
* a feed-forward block whose output projection is all zero -> its input projection is skipped too,
  since nothing it computes reaches the result.

The results are the same as the full computation for any finite input (``0 * x`` is 0 and
``c * x`` is rounded once either way). The weights on disk and the model's identity are untouched.
"""

from __future__ import annotations

from typing import Any


def simplify(model: Any) -> list[str]:
    """Give trivial float linear layers of ``model`` their shortcut; returns the names changed.

    Each module changed keeps its parameters, its name and its place (only its class changes,
    to a subclass that computes the shortcut), so ``state_dict``, ``named_modules`` and
    :mod:`aifn.quantize`'s checks see the model as before.
    """
    import torch

    class ZeroLinear(torch.nn.Linear):
        """A linear layer with all-zero weight and bias: its output is zeros."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(*x.shape[:-1], self.out_features)

    class ScaleLinear(torch.nn.Linear):
        """A linear layer with weight ``factor * I`` and zero bias: its output is ``factor * x``."""

        factor: float

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if self.factor == 1.0 else x * self.factor

    class Skipped(torch.nn.Module):
        """A block whose output only feeds a :class:`ZeroLinear`, which ignores it."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def shortcut(linear: torch.nn.Module) -> bool:
        if type(linear) is not torch.nn.Linear:  # quantized, custom or done already
            return False
        weight, bias = linear.weight, linear.bias
        if bias is not None and bias.any():
            return False
        if not weight.any():
            linear.__class__ = ZeroLinear
            return True
        if weight.shape[0] == weight.shape[1]:
            factor = weight[0, 0].item()
            if torch.equal(weight, torch.eye(weight.shape[0], dtype=weight.dtype) * factor):
                scaled: Any = linear
                scaled.__class__ = ScaleLinear
                scaled.factor = factor
                return True
        return False

    changed: list[str] = []
    with torch.no_grad():
        for name, layer in list(model.named_modules()):
            inner: Any = getattr(getattr(layer, "attention", None), "self", None)
            query, key = getattr(inner, "query", None), getattr(inner, "key", None)
            # Only mean-pooling layers (zero queries and keys): never a trained layer whose
            # weights happen to be sparse.
            if type(query) is not torch.nn.Linear or type(key) is not torch.nn.Linear:
                continue
            if query.weight.any() or key.weight.any():
                continue
            targets = {
                "attention.self.query": query,
                "attention.self.key": key,
                "attention.self.value": inner.value,
                "attention.output.dense": layer.attention.output.dense,
                "output.dense": layer.output.dense,
            }
            for path, linear in targets.items():
                if shortcut(linear):
                    changed.append(f"{name}.{path}")
            if isinstance(layer.output.dense, ZeroLinear):
                layer.intermediate.__class__ = Skipped
                changed.append(f"{name}.intermediate")
    return changed
