"""``CaptionEncoder`` gives exactly the tokenizer's ids, on the path that skips the Rust
normalizer (ASCII printable captions) and on the full one (the rest)."""
import functools
import json

import pytest

from imagebert_ds.data.captions import CaptionEncoder
from imagebert_ds.data.config import load_tokenizer

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

# ASCII words and punctuation, added tokens spelled in any case, and what the normalizer has to
# clean, pad, strip or lowercase: tabs, control and zero-width characters, accents, CJK
PIECES = list("abcXYZ .,!?'-[]()0123") + [
    "[MASK]", "[mask]", "[Sep]", "[UNK]", "[PAD]", "\t", "\x00", "\x07", "\u200b", "\u00e9",
    "E\u0301", "\u4e2d", "\u00c5ngstr\u00f6m", "\ufffd", "  "]


@functools.lru_cache(maxsize=None)
def tokenizer_and_encoder():
    tokenizer = load_tokenizer(None, 16)  # short: truncation is exercised too
    return tokenizer, CaptionEncoder(tokenizer)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_and_encoder()[0]


def ids(tokenizer, captions):
    return [e.ids for e in tokenizer.encode_batch(captions)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=30).map("".join),
                min_size=1, max_size=6))
def test_same_ids_as_the_tokenizer_on_either_path(captions):
    tokenizer, encoder = tokenizer_and_encoder()
    assert encoder(captions) == ids(tokenizer, captions)


def test_plain_captions_skip_the_normalizer_and_the_rest_do_not(tok):
    enc = CaptionEncoder(tok)
    assert enc._bare is not None and enc._lower
    assert enc._plain("A man riding a wave, on a surfboard.")
    for caption in ("caf\u00e9", "tab\there", "a [MASK] dog", "a [mask] dog", "\u4e2d"):
        assert not enc._plain(caption), caption
    mixed = ["A Dog.", "caf\u00e9 au lait", "", "a [MASK] of " * 5, "Two CATS"]
    assert enc(mixed) == ids(tok, mixed)
    assert enc([]) == []


def test_other_normalizers_take_the_full_path(tok):
    from tokenizers import Tokenizer, normalizers

    other = Tokenizer.from_str(tok.to_str())
    other.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    enc = CaptionEncoder(other)
    assert enc._bare is None
    captions = ["\ufb01ne Dogs", "A cat."]  # NFKC turns the ligature into "fi"
    assert enc(captions) == ids(other, captions)


def test_a_cased_bert_normalizer_keeps_the_case(tok):
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    spec["normalizer"]["lowercase"] = False
    cased = Tokenizer.from_str(json.dumps(spec))
    enc = CaptionEncoder(cased)
    assert enc._bare is not None and not enc._lower
    captions = ["A Dog", "the CAT sat", "caf\u00e9"]
    assert enc(captions) == ids(cased, captions)
