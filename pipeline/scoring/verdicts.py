"""Ratings from an LLM judge's verdict text, and the pointwise judge prompt used to build training states.

`parse_judge_score` never guesses: a verdict without a clear rating is a ValueError with the reason. The
evaluation's judges (`pipeline.evaluation.judges`) and build_states' judge stage both use it.
"""
from __future__ import annotations

import re

# ---- an OpenAI-compatible judge ---------------------------------------------------------------------
DEFAULT_JUDGE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the answer an AI assistant gave to the "
    "user's question below. Consider helpfulness, relevance, accuracy, depth and level of detail. Begin with "
    "a short explanation, then rate the answer on a scale of 1 to 10 by writing the rating in exactly this "
    "format: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of the Answer]\n{answer}\n"
    "[The End of the Answer]"
)
_NUM = r"(\d+(?:\.\d+)?)"
_JUDGE_PATTERNS = (  # most explicit first; the first pattern that matches decides
    ("[[N]]", re.compile(r"\[\[\s*" + _NUM + r"\s*(?:/\s*10\s*)?\]\]")),
    ("Rating: N", re.compile(r"\b(?:rating|score)\s*(?:[:=]|is)\s*\**\s*" + _NUM + r"(?![\d.]*\d)", re.IGNORECASE)),
    ("N/10", re.compile(r"(?<![\d.])" + _NUM + r"\s*(?:/|out of)\s*10\b", re.IGNORECASE)),
)


def parse_judge_score(verdict: str, lo: float = 1.0, hi: float = 10.0) -> float:
    """The rating in a judge's verdict, or ValueError with the reason: never a guess.

    Accepted, in this order: ``[[7]]`` / ``[[7.5]]`` / ``[[7/10]]``; ``Rating: 7`` / ``Score = 7``;
    ``7/10`` / ``7 out of 10``; a verdict that is only a number (``"7"``, ``"7."``). The first form found
    decides; if it appears several times with different values the verdict is ambiguous (an error); a value
    outside [lo, hi] is an error.
    """
    if not isinstance(verdict, str) or not verdict.strip():
        raise ValueError("empty verdict")
    text = verdict.strip()
    values = None
    for name, pat in _JUDGE_PATTERNS:
        found = [float(m) for m in pat.findall(text)]
        if found:
            values = found
            break
    if values is None:
        bare = re.fullmatch(_NUM + r"\.?", text)
        if not bare:
            raise ValueError(f"no rating found in verdict {_clip(text)!r}")
        values, name = [float(bare.group(1))], "bare number"
    if len(set(values)) > 1:
        raise ValueError(f"ambiguous verdict: several ratings ({', '.join(f'{v:g}' for v in values)}) "
                         f"in {_clip(text)!r}")
    v = values[0]
    if not lo <= v <= hi:
        raise ValueError(f"rating {v:g} outside {lo:g}-{hi:g} in {_clip(text)!r}")
    return v


def _clip(s: str, n: int = 160) -> str:
    return s if len(s) <= n else s[:n] + "..."


def judge_answer(endpoint, messages: list[dict], answer: str, template: str = DEFAULT_JUDGE_TEMPLATE,
                 max_tokens: int = 512) -> float:
    """Ask an OpenAI-compatible judge (`openai_http.ChatEndpoint`, or anything with the same `chat`) for a
    1-10 rating of `answer` to the last user turn of `messages`; raises ValueError/EndpointError."""
    question = messages[-1]["content"]
    if len(messages) > 1:  # earlier dialogue is shown as context
        ctx = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])
        question = f"{ctx}\nuser: {question}"
    prompt = template.format(question=question, answer=answer)
    verdict = endpoint.chat([{"role": "user", "content": prompt}], max_tokens, 0.0, 1.0).text
    return parse_judge_score(verdict)


def check_judge_template(template: str) -> None:
    try:
        template.format(question="q", answer="a")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"judge template must use only {{question}} and {{answer}} fields: {e}") from None
    if "{answer}" not in template:
        raise ValueError("judge template must contain {answer}")
