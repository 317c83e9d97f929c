"""Incremental detokenization: an answer's growing final tokens -> text deltas that join to its final text.

The refiner's answer text is ``tokenizer.decode(ids, skip_special_tokens=True).strip()``. `TextStream` is fed
the answer's final token ids as they grow (`Refiner.refine_items(on_final=...)`) and sends only text that later
tokens cannot change:

* the last token's text is held back: a token can change how the ones before it decode (a byte-level BPE
  tokenizer shows an incomplete UTF-8 character as '\\ufffd'; SentencePiece's leading space depends on what
  comes first);
* trailing whitespace and '\\ufffd' are held back (the final text is stripped; a character may still complete);
  leading whitespace is never sent;
* a tokenizer that cleans up tokenization spaces (" ." -> ".", " 's" -> "'s") may still delete a space once text
  follows it, so everything from the last space on is held back too.

Every feed checks that what was sent is still a prefix of the decoded text (otherwise it sends nothing more),
and `close(final_text)` returns the rest, or raises `StreamMismatch` if what was sent is not a prefix of the
final text: a tokenizer that breaks these rules fails loudly instead of joining to a wrong answer.
"""
from __future__ import annotations

import os

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


class StreamMismatch(RuntimeError):
    """Text already streamed is not a prefix of the final text."""


def _held_back_end(text: str) -> int:
    """Length of `text` without its trailing whitespace and replacement characters."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] == REPLACEMENT):
        end -= 1
    return end


class TextStream:
    """One answer's text, sent in pieces as its tokens become final.

    ``feed(ids) -> delta`` with the answer's final ids so far (each list extends the previous one);
    ``close(final_text) -> rest``. The deltas and the rest join to exactly `final_text`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.words_only = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.sent = ""
        self.stalled = False  # a feed found the decoded text no longer starts with what was sent

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()

    def feed(self, ids: list[int]) -> str:
        """The new text that the final ids `ids` settle (possibly "")."""
        if len(ids) < 2:
            return ""
        text = self._decode(ids[:-1])
        if not text.startswith(self.sent):
            self.stalled = True
            return ""
        end = _held_back_end(text)
        if self.words_only:  # the last space may still be cleaned away
            end = _held_back_end(text[:max(0, text.rfind(" ", 0, end))])
        if end <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):end], text[:end]
        return delta

    def close(self, final_text: str) -> str:
        """The rest of `final_text` after what was sent; StreamMismatch if what was sent is not its prefix."""
        if not final_text.startswith(self.sent):
            k = len(os.path.commonprefix([self.sent, final_text]))
            raise StreamMismatch(
                f"streamed text is not a prefix of the final answer: they differ at character {k} "
                f"(sent ...{self.sent[max(0, k - 20):k + 20]!r}, final ...{final_text[max(0, k - 20):k + 20]!r}); "
                f"this tokenizer ({type(self.tokenizer).__name__}) decodes a token differently depending on what "
                f"follows it")
        rest, self.sent = final_text[len(self.sent):], final_text
        return rest
