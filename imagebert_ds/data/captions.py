"""Caption token ids: the HF fast tokenizer, with BERT's normalizer done in Python where that is
exact.

A BERT tokenizer's ``BertNormalizer`` (clean control characters, pad CJK characters, strip
accents, lowercase) costs about a third of ``encode_batch`` on short captions: the Rust
``NormalizedString`` tracks the alignment of every character. On a caption that is ASCII and
printable it can only lowercase (nothing to clean, pad or strip; ``str.lower`` and Rust's
``char::to_lowercase`` agree on ASCII), so ``CaptionEncoder`` gives such captions, lowercased,
to a copy of the tokenizer without the normalizer -- the same ids -- and the rest to the
tokenizer itself. Captions that spell out an added token (``[MASK]``...) in any case also take
the full path: added tokens that skip normalization are matched on the original text.
Tokenizers with another normalizer always take the full path.
"""
from __future__ import annotations

import json


class CaptionEncoder:
    """``encoder(captions)`` -> each caption's token ids (what ``tokenizer.encode_batch`` gives,
    special tokens and truncation included), in one or two calls of the Rust tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self._bare = self._lower = None
        self._literals: tuple[str, ...] = ()
        spec = json.loads(tokenizer.to_str())
        norm = spec.get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":
            from tokenizers import Tokenizer

            bare = Tokenizer.from_str(tokenizer.to_str())
            bare.normalizer = None
            self._bare = getattr(bare, "encode_batch_fast", bare.encode_batch)
            self._lower = bool(norm.get("lowercase", True))
            self._literals = tuple(t["content"].lower() for t in spec.get("added_tokens", ())
                                   if not t.get("normalized", False))

    def _plain(self, caption: str) -> bool:
        """Whether BERT's normalizer leaves ``caption`` as ``str.lower`` would (lowercasing
        tokenizers) or as it is."""
        if not (caption.isascii() and caption.isprintable()):
            return False
        low = caption.lower()
        return not any(t in low for t in self._literals)

    def __call__(self, captions: list[str]) -> list[list[int]]:
        if not captions:
            return []
        if self._bare is None:
            return [e.ids for e in self._encode(captions)]
        plain = [self._plain(c) for c in captions]
        fast = [c.lower() if self._lower else c for c, p in zip(captions, plain) if p]
        out = iter([e.ids for e in self._bare(fast)] if fast else ())
        if len(fast) == len(captions):
            return list(out)
        rest = iter([e.ids for e in self._encode([c for c, p in zip(captions, plain) if not p])])
        return [next(out) if p else next(rest) for p in plain]
