"""Ranked answer states for consistency training of the aligner: parsing, filters, scoring, ranking, split.

A prompt with several answers of different quality becomes the states y(0) ... y(T), worst to best by
score; y(T), the target, is the best answer or (``target="reference"``) the reference answer, with every
model answer ranked below it. `jobs/build_states.py` wires these functions into Ray Data; nothing here
knows about Ray or the job's config, so all of it is testable with plain values.

Rows are Arrow rows with explicit types (lists and structs, never JSON text): `ROW_SCHEMA` while a prompt's
answers are filtered and scored, `STATES_SCHEMA` for the ranked rows of train/dev/heldout.parquet. An answer
travels through the stages as a struct (`ANSWER`), in Python a dict::

    {"generator": str, "text": str, "score": float | None, "raw_score": str | None, "drop": str | None,
     "detail": str}

``raw_score`` is the input's score field as text (a number or a string holding one); `column_scores` parses it.

``drop`` is the reason key of an answer that is filtered out (kept in the row, so the summary can count it):

    empty        no text, or only whitespace
    repetition   repeated word n-gram fraction above the threshold (see `repeated_ngram_fraction`)
    too_long     prompt (chat template) + answer + EOS longer than max_tokens aligner tokens
    no_score     the score column is missing or not a number
    score_error  the reward model or the judge failed, or the judge's verdict names no rating
    draft_error  a configured base model could not produce the answer
    duplicate    the same text (stripped) as a better-ranked answer or as the reference target
"""
from __future__ import annotations

import hashlib
import math
import re

import pyarrow as pa

from pipeline.records import MESSAGE
from pipeline.training.trajectories import TRAJECTORY

DROP_REASONS = ("empty", "repetition", "too_long", "no_score", "score_error", "draft_error", "duplicate")
TARGETS = ("best", "reference")
REFERENCE = "reference"  # generator name of the reference answer in the output

ANSWER = pa.struct([("generator", pa.string()), ("text", pa.string()), ("score", pa.float64()),
                    ("raw_score", pa.string()), ("drop", pa.string()), ("detail", pa.string())])
META = pa.map_(pa.string(), pa.string())  # the record's other scalar fields, as text
DROPPED = pa.struct([("generator", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
# one prompt and its candidate answers, from `normalize_record` / `error_row` through the filter and score stages
ROW_SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.list_(MESSAGE)), ("reference", pa.string()),
                        ("answers", pa.list_(ANSWER)), ("meta", META), ("error", pa.string()),
                        ("error_kind", pa.string())])
# one ranked prompt: the rows of train.parquet, dev.parquet and heldout.parquet
STATES_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("messages", pa.list_(MESSAGE)),
    ("states", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())), ("generators", pa.list_(pa.string())),
    ("target", pa.string()), ("num_states", pa.int64()), ("split", pa.string()), ("dropped", pa.list_(DROPPED)),
    ("meta", META), ("trajectories", pa.list_(TRAJECTORY))])


class RowError(ValueError):
    """A row that cannot become a training example; `kind` is the summary key, the message the reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# ---- input records ---------------------------------------------------------------------------------
def _messages_of(prompt) -> list[dict]:
    """A prompt string, or a chat (list of {role, content}) ending with the user's turn, as messages."""
    from pipeline.prompts import check_messages

    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("input", "empty prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        try:
            check_messages(prompt)
        except ValueError as e:
            raise RowError("input", f"bad messages: {e}") from None
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise RowError("input", f"prompt must be a string or a list of messages, not {type(prompt).__name__}")


def _answer(rec: dict, text_field: str, score_field: str | None, generator_field: str | None, n: int) -> dict:
    text = rec.get(text_field)
    gen = rec.get(generator_field) if generator_field else None
    raw = rec.get(score_field) if score_field else None
    return {"generator": str(gen) if gen is not None else f"answer{n}",
            "text": text if isinstance(text, str) else "", "score": None,
            "raw_score": raw if raw is None or isinstance(raw, str) else str(raw), "drop": None, "detail": ""}


def normalize_record(rec, fallback_id: str, fields: dict, layout: str = "nested") -> dict:
    """One input record -> a normalized row (never raises for bad data; the row then carries the error).

    ``fields`` maps id, prompt, answers, text, score, generator, reference to the record's field names
    (answers/score/generator/reference may be None). ``nested``: the record holds a list of answers.
    ``flat``: the record is one (prompt id, prompt, answer, score) row; rows with the same id are merged
    later by `merge_flat`. A row with no answers field is fine (configured base models may answer it).
    """
    if not isinstance(rec, dict):
        return error_row(fallback_id, "input", f"record is {type(rec).__name__}, not a JSON object")
    rid = rec.get(fields["id"])
    if rid is None:
        return error_row(fallback_id, "input", f"missing id field {fields['id']!r}")
    rid = str(rid)
    try:
        if fields["prompt"] not in rec:
            raise RowError("input", f"missing prompt field {fields['prompt']!r}")
        messages = _messages_of(rec[fields["prompt"]])
        ref = rec.get(fields["reference"]) if fields.get("reference") else None
        if ref is not None and not isinstance(ref, str):
            raise RowError("input", f"reference field {fields['reference']!r} must be a string")
        if layout == "flat":
            answers = [_answer(rec, fields["text"], fields.get("score"), fields.get("generator"), 0)]
        else:
            raw = rec.get(fields["answers"]) if fields.get("answers") else None
            if raw is None:
                raw = []
            if not isinstance(raw, list) or not all(isinstance(a, dict) for a in raw):
                raise RowError("input", f"answers field {fields['answers']!r} must be a list of objects")
            answers = [_answer(a, fields["text"], fields.get("score"), fields.get("generator"), n)
                       for n, a in enumerate(raw)]
    except RowError as e:
        return error_row(rid if layout == "nested" else fallback_id, e.kind, f"{e}" + (
            f" (prompt id {rid})" if layout == "flat" else ""))
    used = {fields[f] for f in ("id", "prompt", "answers", "text", "score", "generator", "reference") if fields.get(f)}
    meta = {k: str(v) for k, v in rec.items() if isinstance(v, (str, int, float, bool)) and k not in used}
    return {"id": rid, "messages": messages, "reference": ref, "answers": answers, "meta": meta, "error": None,
            "error_kind": None}


def error_row(row_id, kind: str, reason: str) -> dict:
    """A row that cannot become an example: `kind` is its summary key, `reason` the message."""
    return {"id": str(row_id), "messages": [], "reference": None, "answers": [], "meta": {}, "error": reason,
            "error_kind": kind}


def merge_flat(rows: list[dict]) -> dict:
    """Rows of one prompt id (flat layout) -> one row with all their answers, ordered by (generator, text)
    so the result does not depend on the order the rows arrive in. The rows must agree on the prompt and
    the reference. An error row is a group of its own (its id is its position in the input)."""
    rows = sorted(rows, key=lambda r: ([(m["role"], m["content"]) for m in r["messages"]], r["reference"] or ""))
    first = dict(rows[0])
    for r in rows[1:]:
        for k in ("messages", "reference"):
            if r[k] != first[k]:
                return error_row(first["id"], "input", f"the rows of prompt id {first['id']} disagree on the {k}")
    answers = [a for r in rows for a in r["answers"]]
    answers.sort(key=lambda a: (a["generator"], a["text"], str(a["raw_score"])))
    first["answers"] = answers
    return first


# ---- filters ---------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+", re.UNICODE)


def repeated_ngram_fraction(text: str, n: int = 4) -> float:
    """Share of the answer's word n-grams that repeat an earlier n-gram of the same answer.

    Words are lower-cased ``\\w+`` runs (punctuation and spacing ignored). With G the list of the answer's
    n-grams (len(words) - n + 1 of them), the fraction is ``1 - len(set(G)) / len(G)``; 0.0 when the
    answer has fewer than n words. "a b c d a b c d" with n=4 has 5 n-grams, 4 distinct: 0.2. A loop
    "x, x, x, ..." tends to 1.0. Normal prose is far below 0.3 for n=4; list-heavy or code answers sit higher.
    """
    words = [w.lower() for w in _WORD.findall(text)]
    if n < 1 or len(words) < n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def text_problem(text: str, repeat_ngram: int, max_repeat_fraction: float | None) -> tuple[str, str] | None:
    """(reason key, detail) when the text fails the content filters (empty, repetition), else None."""
    if not isinstance(text, str) or not text.strip():
        return "empty", "empty answer"
    if max_repeat_fraction is not None:
        f = repeated_ngram_fraction(text, repeat_ngram)
        if f > max_repeat_fraction:
            return "repetition", f"repeated {repeat_ngram}-gram fraction {f:.3f} > {max_repeat_fraction}"
    return None


def length_problem(prompt_tokens: int, answer_tokens: int, max_tokens: int | None) -> tuple[str, str] | None:
    """The training sequence is prompt (with chat template) + answer + EOS; it must fit max_tokens."""
    if max_tokens is None:
        return None
    total = prompt_tokens + answer_tokens + 1
    if total > max_tokens:
        return "too_long", f"{prompt_tokens} prompt + {answer_tokens} answer tokens + EOS = {total} > {max_tokens}"
    return None


def parse_score(value) -> float | None:
    """A score given as a number or a string holding one (AlpacaEval stores floats as strings).
    None for anything else: missing, empty, not a number, NaN or infinite."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def filter_answers(row: dict, tokenizer, max_tokens: int | None, repeat_ngram: int,
                   max_repeat_fraction: float | None, check_reference: bool) -> None:
    """Mark the answers of a row (`ROW_SCHEMA`) that fail a filter with their reason (``drop``, ``detail``):
    the content filters (`text_problem`), then the length filter (`length_problem`, counted in `tokenizer`'s
    tokens; skipped when it is None). With `check_reference` (the reference is the target) a reference that
    fails a filter fails the whole row (error kind ``reference``)."""
    from pipeline.prompts import chat_prompt_ids

    answers, ref = row["answers"], row["reference"]
    for a in answers:
        if not a["drop"] and (p := text_problem(a["text"], repeat_ngram, max_repeat_fraction)):
            a["drop"], a["detail"] = p
    check_ref = check_reference and isinstance(ref, str)
    if check_ref and (p := text_problem(ref, repeat_ngram, max_repeat_fraction)):
        row["error"], row["error_kind"] = f"reference answer rejected: {p[1]}", "reference"
    if tokenizer is None:
        return
    n_prompt = len(chat_prompt_ids(tokenizer, row["messages"]))
    todo = [a for a in answers if not a["drop"]]
    ref_too = check_ref and not row["error"]
    texts = [a["text"] for a in todo] + ([ref] if ref_too else [])
    lens = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    for a, n in zip(todo, lens):
        if p := length_problem(n_prompt, n, max_tokens):
            a["drop"], a["detail"] = p
    if ref_too and (p := length_problem(n_prompt, lens[-1], max_tokens)):
        row["error"], row["error_kind"] = f"reference answer rejected: {p[1]}", "reference"


def column_scores(answers: list[dict]) -> None:
    """Set `score` from `raw_score` for every kept answer; answers without a usable one are dropped."""
    for a in answers:
        if a["drop"]:
            continue
        s = parse_score(a.get("raw_score"))
        if s is None:
            a["drop"], a["detail"] = "no_score", f"score column value {a.get('raw_score')!r} is not a number"
        else:
            a["score"] = s


# ---- ranking -----------------------------------------------------------------------------------------
def _tie_key(seed: int, row_id: str, text: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}:{text}".encode()).hexdigest()


def rank_states(row_id: str, answers: list[dict], reference: str | None, target: str = "best",
                min_states: int = 2, seed: int = 0) -> dict:
    """Kept, scored answers -> states worst..best with the target last; RowError if too few are left.

    Equal scores are ordered by a hash of (seed, row id, text), so the result does not depend on the
    input order of the answers. Exact duplicate texts keep only the best-ranked copy (the others are
    dropped as ``duplicate``; with ``target="reference"`` so is a model answer equal to the reference).
    Returns {"states", "scores", "generators"}; with ``target="reference"`` the last score is None.
    Mutates `answers` (sets ``drop`` on duplicates).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "reference" and (reference is None or not reference.strip()):
        raise RowError("reference", "target=reference but the row has no reference answer")
    kept = [a for a in answers if not a["drop"]]
    unscored = [a for a in kept if a["score"] is None]
    if unscored:  # the stages guarantee a score or a drop; say so loudly rather than rank garbage
        raise RowError("internal", f"{len(unscored)} kept answers have no score")
    kept.sort(key=lambda a: (-a["score"], _tie_key(seed, row_id, a["text"])))  # best first
    seen = {reference.strip()} if target == "reference" else set()
    ranked = []
    for a in kept:
        t = a["text"].strip()
        if t in seen:
            a["drop"], a["detail"] = "duplicate", ("same text as the reference" if t == (reference or "").strip()
                                                   and target == "reference" else "same text as a better answer")
            continue
        seen.add(t)
        ranked.append(a)
    ranked.reverse()  # worst first
    states = [a["text"] for a in ranked]
    scores: list = [a["score"] for a in ranked]
    gens = [a["generator"] for a in ranked]
    if target == "reference":
        states.append(reference)
        scores.append(None)
        gens.append(REFERENCE)
    if len(states) < min_states:
        counts = drop_counts(answers)
        why = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "none dropped"
        raise RowError("too_few_states", f"{len(states)} state(s) left, min_states is {min_states} "
                                         f"({len(answers)} answers; dropped: {why})")
    return {"states": states, "scores": scores, "generators": gens}


def ranked_row(row: dict, split: str, target: str = "best", min_states: int = 2, seed: int = 0) -> dict:
    """A filtered, scored row (`ROW_SCHEMA`) -> its ranked row: the columns of `STATES_SCHEMA` (no
    trajectories yet) plus ``error``, ``error_kind`` and ``answers_in`` (its number of candidate answers).
    A row that arrives with an error, or that `rank_states` rejects, has no states and says why; either way
    ``dropped`` lists every answer left out, with the reason."""
    msgs, answers = row["messages"], row["answers"]
    out = {"id": row["id"], "prompt": msgs[-1]["content"] if msgs else "", "messages": msgs, "states": [],
           "scores": [], "generators": [], "target": "", "num_states": 0, "split": split, "dropped": [],
           "meta": row["meta"], "error": row["error"], "error_kind": row["error_kind"], "answers_in": len(answers),
           "trajectories": []}
    if not row["error"]:
        try:
            st = rank_states(row["id"], answers, row["reference"], target, min_states, seed)
            out.update(st, target=st["states"][-1], num_states=len(st["states"]))
        except RowError as e:
            out["error"], out["error_kind"] = str(e), e.kind
    out["dropped"] = [{"generator": a["generator"], "reason": a["drop"], "detail": a["detail"]}
                      for a in answers if a["drop"]]
    return out


def drop_counts(answers: list[dict]) -> dict:
    c = {k: 0 for k in DROP_REASONS}
    for a in answers:
        if a["drop"]:
            c[a["drop"]] = c.get(a["drop"], 0) + 1
    return c


# ---- split -------------------------------------------------------------------------------------------
def _unit_hash(s: str) -> float:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") / 2 ** 64


def split_of(row_id: str, heldout_mod: int | None = 4, heldout_rem: int = 0, dev_fraction: float = 0.0,
             seed: int = 0) -> str:
    """``heldout`` when id % heldout_mod == heldout_rem (an integer id uses its value, any other id a hash
    of it), else ``dev`` for a deterministic fraction of the rest (a hash of seed and id), else ``train``.
    For AlpacaEval (ids 0..804) the defaults give held-out = id % 4 == 0, the rule of ../shared/data."""
    rid = str(row_id)
    if heldout_mod:
        v = int(rid) if re.fullmatch(r"-?\d+", rid) else int(hashlib.sha256(rid.encode()).hexdigest(), 16)
        if v % heldout_mod == heldout_rem:
            return "heldout"
    if dev_fraction > 0 and _unit_hash(f"dev:{seed}:{rid}") < dev_fraction:
        return "dev"
    return "train"
