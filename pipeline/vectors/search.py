"""Judging a knob setting: the prompts it is judged on, the knobbed model's answers to them, and their scores.

`jobs.search_knobs` switches the knobs (`pipeline.vectors.knobs`) to each point of a grid, then calls
`answer_all` (greedy generation) or `refine_all` (the aligner refines each row's draft) and scores the answers
with a `Scorer`: the mean answer length in words or tokens, or the offline embedding judge's similarity to
the row's reference answer (`pipeline.scoring.embedding`).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

SCORES = ("length_words", "length_tokens", "judge")


class PromptRowsError(ValueError):
    """A prompt file that cannot be read as prompt rows, or rows that lack what a score needs."""


def load_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows {id, prompt, reference, draft} from a JSONL file (.gz too): the prompt is the line's `prompt`,
    `instruction` or `question`; the reference its `reference` or `reference_output`; the draft its `draft`
    or `output`; the id its `id`, else the line number. `limit`: the first N rows only."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            prompt = r.get("prompt") or r.get("instruction") or r.get("question")
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptRowsError(f"{p}:{n + 1}: no prompt / instruction / question")
            rows.append({"id": str(r.get("id", n)), "prompt": prompt,
                         "reference": r.get("reference") or r.get("reference_output"),
                         "draft": r.get("draft") or r.get("output")})
            if limit and len(rows) >= limit:
                break
    return rows


def _conversation(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}]


def answer_all(lm, rows: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    """The model's greedy answer to each row's prompt, `batch_size` prompts at a time."""
    from pipeline.decoding.drafting import SamplingParams, generate_answers

    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)
    out = []
    for i in range(0, len(rows), batch_size):
        convs = [_conversation(r) for r in rows[i:i + batch_size]]
        out += [a[0] for a in generate_answers(lm, convs, params, seed_key="search")]
    return out


def refine_all(refiner, rows: list[dict], batch_size: int) -> list[str]:
    """Each row's draft refined by `refiner` (a `pipeline.decoding.refiner.Refiner`), `batch_size` rows at a
    time; a row without a draft is refined from an empty one."""
    from pipeline.decoding.refiner import RefineRequest

    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        out += [x.text for x in refiner.refine([RefineRequest(_conversation(r), r["draft"] or "", key=r["id"])
                                                for r in chunk])]
    return out


class Scorer:
    """Scores answers one by one: `length_words`, `length_tokens` (with the model's tokenizer) or `judge`
    (similarity to the row's reference; the embedding model loads on first use)."""

    def __init__(self, tokenizer):
        self.tok, self._judge = tokenizer, None

    def __call__(self, kind: str, answers: list[str], rows: list[dict]) -> list[float]:
        if kind == "length_words":
            return [float(len(a.split())) for a in answers]
        if kind == "length_tokens":
            return [float(len(self.tok(a, add_special_tokens=False)["input_ids"])) for a in answers]
        if kind != "judge":
            raise ValueError(f"unknown score {kind!r}; choose one of {', '.join(SCORES)}")
        refs = [r["reference"] for r in rows]
        if any(not isinstance(x, str) or not x for x in refs):
            raise PromptRowsError("score=judge needs a reference (reference / reference_output) on every prompt row")
        if self._judge is None:
            from pipeline.scoring.embedding import EmbeddingJudge

            self._judge = EmbeddingJudge()
        return self._judge.similarity(answers, refs)
