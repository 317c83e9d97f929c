"""`TextStream`: deltas from growing token lists join to exactly the refiner's answer text, on the tiny byte-level
tokenizer (random bytes: broken UTF-8, specials, whitespace) and on the real default model's tokenizer."""
import random

import pytest

from pipeline.decoding.streaming import StreamMismatch, TextStream


def final_text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True).strip()  # what Refiner.refine_items returns


def stream(tok, ids, rng: random.Random | None = None) -> list[str]:
    """Feed `ids` in growing prefixes (random steps, or one token at a time) and close; the pieces sent."""
    ts, pieces, n = TextStream(tok), [], 0
    while n < len(ids):
        n = min(len(ids), n + (rng.randint(1, 6) if rng else 1))
        pieces.append(ts.feed(ids[:n]))
    pieces.append(ts.close(final_text(tok, ids)))
    assert not ts.stalled, "the decoded text stopped extending what was sent"
    return pieces


@pytest.fixture(scope="module")
def tiny_tok():
    from tests.tiny import tiny_tokenizer

    return tiny_tokenizer()


def test_random_bytes_and_specials_join_to_the_final_text(tiny_tok):
    rng = random.Random(0)
    ws = [tiny_tok.convert_tokens_to_ids(t) for t in ("Ġ", "Ċ", "ĉ")]  # space, newline, tab bytes
    for case in range(300):
        ids = [rng.choice([rng.randrange(6, 262), rng.choice(ws), rng.randrange(0, 6)]) for _ in range(rng.randint(0, 40))]
        pieces = stream(tiny_tok, ids, rng if case % 2 else None)
        assert "".join(pieces) == final_text(tiny_tok, ids), ids


def test_text_is_sent_before_the_end_and_whitespace_is_held_back(tiny_tok):
    ids = tiny_tok.encode("Hello wide world \n", add_special_tokens=False)
    ts = TextStream(tiny_tok)
    out = [ts.feed(ids[:n]) for n in range(1, len(ids) + 1)]
    assert "".join(out) == "Hello wide world", "everything but the trailing whitespace streams before close"
    assert ts.close("Hello wide world") == ""
    euro = tiny_tok.encode("a €", add_special_tokens=False)  # 1 + 1 + 3 byte tokens
    ts = TextStream(tiny_tok)
    assert [ts.feed(euro[:n]) for n in range(1, 6)] == ["", "a", "", "", ""]  # no '\ufffd' half-character
    assert ts.close("a €") == " €"


def test_a_tokenizer_that_rewrites_earlier_text_fails_loudly():
    class Rewriting:  # decodes "ab" as "x" once a third token follows
        clean_up_tokenization_spaces = False

        def decode(self, ids, skip_special_tokens=True):
            return "x" + "c" * (len(ids) - 2) if len(ids) > 2 else "ab"[:len(ids)]

    ts = TextStream(Rewriting())
    assert ts.feed([1, 2, 3]) == "ab"
    assert ts.feed([1, 2, 3, 4]) == "" and ts.stalled
    with pytest.raises(StreamMismatch, match="not a prefix of the final answer"):
        ts.close("xcc")


class SpaceCleaning:
    """Tokens are strings; decoding joins them and, like transformers' cleanup, deletes spaces before
    punctuation and contractions."""

    def __init__(self, cleans: bool):
        self.clean_up_tokenization_spaces = cleans

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(ids)
        return text.replace(" .", ".").replace(" 's", "'s") if self.clean_up_tokenization_spaces else text


def test_space_cleanup_holds_back_the_last_word():
    toks = ["it", " '", "s", " a", " dog", " .", " Yes", " ."]
    tok = SpaceCleaning(True)
    final = final_text(tok, toks)
    assert final == "it's a dog. Yes."
    assert "".join(stream(tok, toks)) == final
    ts = TextStream(tok)
    assert "".join(ts.feed(toks[:n]) for n in range(1, 6)) == "it's", "words stream before the end"
    # without the hold-back the same stream would have sent "it '" and must refuse to join wrongly
    ts = TextStream(tok)
    ts.words_only = False
    for n in range(1, len(toks) + 1):
        ts.feed(toks[:n])
    with pytest.raises(StreamMismatch):
        ts.close(final)


REAL_TEXTS = [
    "Paris is the capital of France.",
    "  Leading spaces, trailing ones too.   ",
    "Zürich, São Paulo, Kraków — naïve café façade; Ελληνικά, Русский, 中文字符, 日本語のテキスト, 한국어.",
    "Emoji: 😀🎉👍🏽 🇫🇷 👨‍👩‍👧‍👦 and ✓ ✗ ★ ♥.",
    "Lines:\n\n1. first\n2. second\n\n```python\nprint('hi')\n```\n\tTabbed\r\nCRLF",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2; ≤ ≥ ≠ ∞ √2 ≈ 1.414",
    "it's, don't, we're . , ? ! -- quotes \"like this\" and 'this'",
]


def test_real_default_tokenizer_on_real_text():
    from pipeline.models import load_tokenizer

    tok = load_tokenizer("default")
    rng = random.Random(1)
    special = tok.convert_tokens_to_ids(tok.all_special_tokens)[0]
    for text in REAL_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for variant in (ids, ids[:len(ids) // 2] + [special] + ids[len(ids) // 2:]):
            for r in (None, rng):
                pieces = stream(tok, variant, r)
                assert "".join(pieces) == final_text(tok, variant)
        assert len([p for p in stream(tok, ids) if p]) > 3, "real text streams in several pieces"
    # random tokens from the whole vocabulary: partial characters, odd whitespace, anything
    for _ in range(100):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        assert "".join(stream(tok, ids, rng)) == final_text(tok, ids), ids


@pytest.mark.integration
def test_default_model_answers_stream_to_their_text(default_lm):
    """The real aligner end to end: the fast engine's reports through TextStream join to each answer's text."""
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.decoding.refiner import RefineRequest, Refiner

    refiner = Refiner(default_lm, RefineSettings(max_new_tokens=32, window=8), mode="fast")
    reqs = [RefineRequest([{"role": "user", "content": q}], d, key=q) for q, d in [
        ("Write two short lines about Zürich, with an emoji.", "Zürich liegt am See 🌊.\nIt is calm."),
        ("Translate 'good morning' to Japanese and Greek.", "おはようございます — Καλημέρα!"),
        ("List three fruits.", "1. Apple\n2. Banana\n3. Cherry"),
    ]]
    items = [refiner.encode(r) for r in reqs]
    streams = [TextStream(default_lm.tokenizer) for _ in items]
    pieces: list[list[str]] = [[] for _ in items]

    def on_final(i, ids):
        pieces[i].append(streams[i].feed(ids))

    results = refiner.refine_items(items, on_final=on_final)
    for res, ts, sent in zip(results, streams, pieces):
        before_end = "".join(sent)
        assert before_end + ts.close(res.text) == res.text and not ts.stalled
        assert len(before_end) >= len(res.text) // 2, "most of the text streams before the answer is complete"
