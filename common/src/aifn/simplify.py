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
    """Replace trivial float linear layers of ``model`` in place; returns the names replaced."""
    import torch

    class _Zeros(torch.nn.Module):
        """What a linear layer with all-zero weight and bias computes: zeros."""

        def __init__(self, out_features: int) -> None:
            super().__init__()
            self.out_features = out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(*x.shape[:-1], self.out_features)

    class _Scale(torch.nn.Module):
        """What a linear layer with weight ``c * I`` and zero bias computes: ``c * x``."""

        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if self.factor == 1.0 else x * self.factor

    class _Unused(torch.nn.Module):
        """A block whose output only feeds a layer that ignores it: pass the input through."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def trivial(linear: torch.nn.Module) -> torch.nn.Module | None:
        if type(linear) is not torch.nn.Linear:  # quantized or custom: leave alone
            return None
        weight, bias = linear.weight, linear.bias
        if bias is not None and bias.any():
            return None
        if not weight.any():
            return _Zeros(linear.out_features)
        if weight.shape[0] == weight.shape[1]:
            factor = weight[0, 0].item()
            if torch.equal(weight, torch.eye(weight.shape[0], dtype=weight.dtype) * factor):
                return _Scale(factor)
        return None

    replaced: list[str] = []
    with torch.no_grad():
        for name, layer in list(model.named_modules()):
            inner: Any = getattr(getattr(layer, "attention", None), "self", None)
            query, key = getattr(inner, "query", None), getattr(inner, "key", None)
            # Only mean-pooling layers (zero queries and keys): never a trained layer whose
            # weights happen to be sparse.
            if not (isinstance(query, torch.nn.Linear) and isinstance(key, torch.nn.Linear)):
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
                shortcut = trivial(linear)
                if shortcut is None:
                    continue
                parent, _, attr = f"{name}.{path}".rpartition(".")
                setattr(model.get_submodule(parent), attr, shortcut)
                replaced.append(f"{name}.{path}")
                if path == "output.dense" and isinstance(shortcut, _Zeros):
                    layer.intermediate = _Unused()
                    replaced.append(f"{name}.intermediate")
    return replaced
