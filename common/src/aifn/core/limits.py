"""How much work one request may ask of the model: a character cap per text and a token budget.

Text Embeddings Inference bounds a request by ``max_input_length`` (tokens per text) and
``max_batch_tokens``; here ``MAX_TOKENS`` truncates each text, ``MAX_TEXT_CHARS`` cuts a text
before it is tokenized at all (tokenizing is linear in characters: a 1 MiB text took 0.4 s
whatever ``MAX_TOKENS`` is), and ``MAX_REQUEST_TOKENS`` refuses a request whose texts and new
label prompts would make the model read more tokens than that. Counting uses the model's own
``tokenizer.json`` with the model's truncation, so a count is what the model will run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aifn.core.errors import ConfigError, TooManyTokens
from aifn.core.model import Prediction

if TYPE_CHECKING:
    from aifn.settings import Settings


class WorkLimits:
    """The character cap and the token budget of one service.

    Args:
        tokenizer_file: The model's ``tokenizer.json``.
        max_text_chars: ``MAX_TEXT_CHARS``.
        max_tokens: The model's truncation (``MAX_TOKENS``, capped by the model).
        max_request_tokens: ``MAX_REQUEST_TOKENS``.
    """

    def __init__(
        self,
        tokenizer_file: Path,
        *,
        max_text_chars: int,
        max_tokens: int,
        max_request_tokens: int,
    ) -> None:
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise ConfigError(f"could not load the tokenizer {tokenizer_file}: {exc}") from exc
        # Fixed here and never changed: safe to call from several threads at once.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_tokens)
        self.max_text_chars = max_text_chars
        self.max_tokens = max_tokens
        self.max_request_tokens = max_request_tokens

    @classmethod
    def from_settings(cls, settings: Settings, *, max_tokens: int) -> WorkLimits:
        return cls(
            settings.model_dir / "tokenizer.json",
            max_text_chars=settings.max_text_chars,
            max_tokens=max_tokens,
            max_request_tokens=settings.max_request_tokens,
        )

    def cut(self, texts: Sequence[str]) -> tuple[list[str], list[bool]]:
        """Each text cut to ``MAX_TEXT_CHARS`` characters, and whether it was."""
        limit = self.max_text_chars
        return [t[:limit] for t in texts], [len(t) > limit for t in texts]

    def tokens(self, texts: Sequence[str]) -> list[int]:
        """The tokens the model reads for each text (after the cut; special tokens included)."""
        if not texts:
            return []
        cut, _ = self.cut(texts)
        return [len(e.ids) for e in self._tokenizer.encode_batch(cut)]

    def check(self, texts: Sequence[str], prompts: Sequence[str] = ()) -> None:
        """Refuse a request whose texts and new label prompts come to more than the budget.

        A text is at most ``max_tokens`` tokens (the truncation, special tokens included), so a
        request that could not pass the budget even if every text were that long is not
        tokenized at all: with the defaults (64 texts of at most 256 tokens, a budget of 16,384)
        no sentiment request is, which keeps the tokenizer's ~30 us a text off every request.

        Raises:
            TooManyTokens: Over ``MAX_REQUEST_TOKENS``; the message names the limit.
        """
        if (len(texts) + len(prompts)) * self.max_tokens <= self.max_request_tokens:
            return
        text_tokens = sum(self.tokens(texts))
        prompt_tokens = sum(self.tokens(prompts))
        total = text_tokens + prompt_tokens
        if total > self.max_request_tokens:
            parts = f"{text_tokens} for {len(texts)} text(s)"
            if prompts:
                parts += f" + {prompt_tokens} for {len(prompts)} new label prompt(s)"
            raise TooManyTokens(
                f"this request needs {total} tokens of model work ({parts}); the limit is "
                f"{self.max_request_tokens} (MAX_REQUEST_TOKENS): send fewer or shorter texts"
                + (", or fewer new labels" if prompts else "")
            )


def mark_cut(predictions: list[Prediction], cut: Sequence[bool]) -> list[Prediction]:
    """Predictions of texts :meth:`WorkLimits.cut` shortened say ``truncated: true``."""
    return [
        dataclasses.replace(p, truncated=True) if was_cut and not p.truncated else p
        for p, was_cut in zip(predictions, cut, strict=True)
    ]


def count_texts(body: Any, max_texts: int) -> int:
    """Texts in a ``text``/``texts`` body, at least 1; never raises, whatever ``body`` is.

    A list over ``max_texts`` counts 1: it is refused (422 ``too_many_texts``) before any model
    work, so charging its length would lock its caller out for work never done.
    """
    if isinstance(body, dict) and isinstance(body.get("texts"), list):
        n = len(body["texts"])
        return max(1, n) if n <= max_texts else 1
    return 1
