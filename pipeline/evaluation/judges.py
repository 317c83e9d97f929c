"""Judges for the evaluation job: an LLM judge over any OpenAI-compatible endpoint, a reward model, and the
offline embedding judge. Every judge returns `Verdict`s; a verdict that cannot be parsed is recorded as
``status="unparsed"`` with the judge's raw text, never guessed.

* `LLMJudge.grade`   MT-bench single-answer grading (1-10) with FastChat's judge prompts (``single-v1``, the
                     reference-guided ``single-math-v1`` for math/reasoning/coding questions that have a
                     reference, and their ``-multi-turn`` forms for the second turn).
* `LLMJudge.compare` AlpacaEval-style pairwise comparison of an answer against the reference answer with
                     FastChat's ``pair-v2`` prompt; optionally asked a second time with the positions
                     swapped (the two verdicts are averaged, so an inconsistent pair counts as a tie).
* `RewardJudge`      pointwise reward of `states.RewardModel`; the preference against the reference is
                     sigmoid(r(answer) - r(reference)), the Bradley-Terry reading of a reward model.
* `OfflineJudge`     cosine similarity to the reference answer (`offline_judge.EmbeddingJudge`): closeness
                     to a reference, not quality; the evaluation job always reports it next to length.

FastChat's prompt file (``judge_prompts.jsonl`` of FastChat's llm_judge) is read from a path in the config;
the project does not ship a copy.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.scoring.verdicts import parse_judge_score

MATH_CATEGORIES = ("math", "reasoning", "coding")  # FastChat grades these against a reference answer
NEEDED_PROMPTS = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn", "pair-v2")


@dataclass
class Verdict:
    value: float | None  # the score (grade 1-10, preference 0..1, reward, similarity); None unless status == ok
    status: str = "ok"  # ok | unparsed | error
    raw: str = ""  # what the judge said (LLM judges), or the reason for an error

    @property
    def number(self) -> float:
        return self.value if self.status == "ok" and self.value is not None else math.nan


# ---- verdict parsing -------------------------------------------------------------------------------------
_PAIR = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_pairwise(verdict: str) -> float:
    """Preference for assistant A in a FastChat pairwise verdict: ``[[A]]`` 1.0, ``[[B]]`` 0.0, ``[[C]]`` (tie)
    0.5. ValueError when there is no verdict tag, or several different ones."""
    if not isinstance(verdict, str) or not verdict.strip():
        raise ValueError("empty verdict")
    tags = set(_PAIR.findall(verdict))
    if not tags:
        raise ValueError(f"no [[A]]/[[B]]/[[C]] verdict in {verdict.strip()[:160]!r}")
    if len(tags) > 1:
        raise ValueError(f"ambiguous verdict: {', '.join(f'[[{t}]]' for t in sorted(tags))} in {verdict.strip()[:160]!r}")
    return {"A": 1.0, "B": 0.0, "C": 0.5}[tags.pop()]


def load_fastchat_prompts(path: str | Path) -> dict[str, dict]:
    """FastChat's judge prompt file, by prompt name; a clear error if it is missing or incomplete."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"judge prompt file not found: {p} (FastChat's fastchat/llm_judge/data/"
                                "judge_prompts.jsonl; set judges.llm.prompts)")
    prompts = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            if not {"name", "system_prompt", "prompt_template"} <= rec.keys():
                raise ValueError(f"{p}:{n}: a judge prompt needs name, system_prompt and prompt_template")
            prompts[rec["name"]] = rec
    missing = [n for n in NEEDED_PROMPTS if n not in prompts]
    if missing:
        raise ValueError(f"{p} lacks the judge prompts {missing}")
    return prompts


# ---- LLM judge -------------------------------------------------------------------------------------------
class LLMJudge:
    """An LLM judge behind an OpenAI-compatible endpoint (`openai_http.ChatEndpoint` or anything with its
    ``chat(messages, max_tokens, temperature, top_p)``); greedy, so verdicts are reproducible where the
    endpoint is."""

    def __init__(self, endpoint, prompts: dict[str, dict], max_tokens: int = 512, swap: bool = True):
        self.endpoint, self.prompts, self.max_tokens, self.swap = endpoint, prompts, max_tokens, swap

    def _ask(self, name: str, **fields) -> str:
        p = self.prompts[name]
        msgs = [{"role": "system", "content": p["system_prompt"]},
                {"role": "user", "content": p["prompt_template"].format(**fields)}]
        return self.endpoint.chat(msgs, self.max_tokens, 0.0, 1.0).text

    def grade(self, questions: list[str], answers: list[str], references: list[str] | None = None,
              category: str = "") -> list[Verdict]:
        """One 1-10 grade per turn; turn k > 0 is graded in the context of the whole conversation so far
        (FastChat grades the second MT-bench turn this way)."""
        math_q = category in MATH_CATEGORIES and bool(references) and all(references[:len(questions)])
        out = []
        for k in range(len(questions)):
            try:
                if k == 0:
                    f = dict(question=questions[0], answer=answers[0])
                    if math_q:
                        f["ref_answer_1"] = references[0]
                    raw = self._ask("single-math-v1" if math_q else "single-v1", **f)
                else:  # FastChat's multi-turn templates show two turns
                    f = dict(question_1=questions[k - 1], question_2=questions[k],
                             answer_1=answers[k - 1], answer_2=answers[k])
                    if math_q:
                        f.update(ref_answer_1=references[k - 1], ref_answer_2=references[k])
                    raw = self._ask("single-math-v1-multi-turn" if math_q else "single-v1-multi-turn", **f)
            except Exception as e:  # noqa: BLE001 - an endpoint failure is recorded, the job goes on
                out.append(Verdict(None, "error", f"{type(e).__name__}: {e}"))
                continue
            try:
                out.append(Verdict(parse_judge_score(raw), "ok", raw))
            except ValueError:
                out.append(Verdict(None, "unparsed", raw))
        return out

    def compare(self, question: str, answer: str, reference: str) -> Verdict:
        """P(answer beats the reference) from one or two (swapped) pairwise verdicts."""
        prefs, raws = [], []
        orders = [(answer, reference, False)] + ([(reference, answer, True)] if self.swap else [])
        for a, b, swapped in orders:
            try:
                raw = self._ask("pair-v2", question=question, answer_a=a, answer_b=b)
            except Exception as e:  # noqa: BLE001
                return Verdict(None, "error", f"{type(e).__name__}: {e}")
            raws.append(raw)
            try:
                pa = parse_pairwise(raw)
            except ValueError:
                return Verdict(None, "unparsed", "\n---\n".join(raws))
            prefs.append(1.0 - pa if swapped else pa)
        return Verdict(sum(prefs) / len(prefs), "ok", "\n---\n".join(raws))


# ---- reward model and offline judges ----------------------------------------------------------------------
class RewardJudge:
    def __init__(self, model: str, **kw):
        from pipeline.scoring.reward_model import RewardModel

        self.rm = RewardModel(model, **kw)

    def score(self, messages: list[dict], answer: str, reference: str | None) -> tuple[Verdict, Verdict]:
        """(reward of the answer, preference over the reference) for one conversation."""
        try:
            texts = [answer] + ([reference] if reference else [])
            r = self.rm.score(messages, texts)
        except Exception as e:  # noqa: BLE001
            bad = Verdict(None, "error", f"{type(e).__name__}: {e}")
            return bad, bad
        pref = Verdict(1 / (1 + math.exp(-(r[0] - r[1]))), "ok") if reference else Verdict(None, "error", "no reference")
        return Verdict(r[0]), pref


class OfflineJudge:
    def __init__(self, max_tokens: int = 256):
        from pipeline.scoring.embedding import EmbeddingJudge

        self.emb = EmbeddingJudge(max_tokens=max_tokens)

    def score(self, answers: list[str], references: list[str]) -> list[Verdict]:
        out = [Verdict(None, "error", "no reference answer") for _ in answers]
        idx = [i for i, r in enumerate(references) if r]
        sims = self.emb.similarity([answers[i] for i in idx], [references[i] for i in idx]) if idx else []
        for i, s in zip(idx, sims):
            out[i] = Verdict(float(s))
        return out
