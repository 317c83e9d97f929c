"""The evaluation library: verdict parsing, the LLM / reward / offline judges, the summary's statistics."""
import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest

from pipeline.evaluation.judges import LLMJudge, Verdict, load_fastchat_prompts, parse_pairwise
from tests.conftest import shared_file
PROMPT_NAMES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn", "pair-v2")


def write_prompts(path: Path) -> Path:
    """A judge prompt file in FastChat's format, with our own (short) wording."""
    with open(path, "w") as f:
        for name in PROMPT_NAMES:
            if name.startswith("pair"):
                tpl = "Q: {question}\nA: {answer_a}\nB: {answer_b}\nSay [[A]], [[B]] or [[C]]."
            elif "multi" in name:
                tpl = "Q1: {question_1}\nA1: {answer_1}\nQ2: {question_2}\nA2: {answer_2}\nRate A2 as [[n]]."
                if "math" in name:
                    tpl += "\nRef: {ref_answer_1} / {ref_answer_2}"
            else:
                tpl = "Q: {question}\nA: {answer}\nRate as [[n]]." + ("\nRef: {ref_answer_1}" if "math" in name else "")
            f.write(json.dumps({"name": name, "type": "x", "system_prompt": f"judge:{name}", "prompt_template": tpl,
                                "output_format": "[[x]]"}) + "\n")
    return path


class ScriptedEndpoint:
    """An endpoint that answers from a script and records what it was asked (the HTTP path is tested against
    the real Serve app in tests/test_serve.py)."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def chat(self, messages, max_tokens, temperature, top_p):
        self.asked.append(messages)
        text = self.answer(messages) if callable(self.answer) else self.answer

        class C:
            pass

        c = C()
        c.text = text
        return c


# ---- verdict parsing and the LLM judge ------------------------------------------------------------------
@pytest.mark.parametrize("verdict,want", [
    ("[[A]]", 1.0), ("After thought, B is better. [[B]]", 0.0), ("Tie: [[C]]", 0.5), ("[[ A ]]", 1.0),
    ("[[A]] ... to repeat: [[A]]", 1.0),
])
def test_parse_pairwise(verdict, want):
    assert parse_pairwise(verdict) == want


@pytest.mark.parametrize("verdict,reason", [
    ("", "empty"), ("A is better than B", "no \\[\\[A\\]\\]"), ("[[A]] or maybe [[B]]", "ambiguous"), ("[[D]]", "no"),
])
def test_parse_pairwise_refuses_to_guess(verdict, reason):
    with pytest.raises(ValueError, match=reason):
        parse_pairwise(verdict)


def test_llm_judge_prompts_positions_and_unparsed_verdicts(tmp_path):
    prompts = load_fastchat_prompts(write_prompts(tmp_path / "p.jsonl"))
    ep = ScriptedEndpoint("Fine answer. Rating: [[7]]")
    j = LLMJudge(ep, prompts, swap=True)
    vs = j.grade(["What is 2+2?", "And 3+3?"], ["4", "6"], ["4", "6"], category="math")
    assert [v.value for v in vs] == [7.0, 7.0] and all(v.status == "ok" for v in vs)
    assert ep.asked[0][0]["content"] == "judge:single-math-v1" and "Ref: 4" in ep.asked[0][1]["content"]
    assert ep.asked[1][0]["content"] == "judge:single-math-v1-multi-turn" and "Ref: 4 / 6" in ep.asked[1][1]["content"]
    vs = j.grade(["Write a poem."], ["Roses."], [], category="writing")  # general question: no reference prompt
    assert ep.asked[-1][0]["content"] == "judge:single-v1"
    # a judge that always prefers position A: swapping turns its bias into a tie
    v = LLMJudge(ScriptedEndpoint("[[A]]"), prompts, swap=True).compare("q", "mine", "ref")
    assert v.status == "ok" and v.value == 0.5
    assert LLMJudge(ScriptedEndpoint("[[B]]"), prompts, swap=False).compare("q", "mine", "ref").value == 0.0
    # consistent preference for the answer, whichever position it is in
    ep = ScriptedEndpoint(lambda m: "[[A]]" if "A: mine" in m[1]["content"] else "[[B]]")
    assert LLMJudge(ep, prompts).compare("q", "mine", "ref").value == 1.0
    # what cannot be parsed is recorded with the raw text, never guessed
    bad = LLMJudge(ScriptedEndpoint("I think it is good."), prompts).grade(["q"], ["a"])[0]
    assert bad.status == "unparsed" and bad.value is None and math.isnan(bad.number) and "good" in bad.raw

    class Down:
        def chat(self, *a):
            raise ConnectionError("refused")

    err = LLMJudge(Down(), prompts).compare("q", "a", "r")
    assert err.status == "error" and "refused" in err.raw


def test_fastchat_prompt_file_loads_and_incomplete_files_are_refused(tmp_path):
    p = shared_file("mt_bench/judge_prompts.jsonl")
    prompts = load_fastchat_prompts(p)
    assert set(PROMPT_NAMES) <= set(prompts)
    (tmp_path / "few.jsonl").write_text(json.dumps({"name": "pair-v2", "system_prompt": "", "prompt_template": ""}) + "\n")
    with pytest.raises(ValueError, match="lacks the judge prompts"):
        load_fastchat_prompts(tmp_path / "few.jsonl")
    with pytest.raises(FileNotFoundError, match="judge_prompts.jsonl"):
        load_fastchat_prompts(tmp_path / "missing.jsonl")


def test_reward_judge_preference_is_bradley_terry(tiny_rm):
    from pipeline.evaluation.judges import RewardJudge

    j = RewardJudge(str(tiny_rm))
    msgs = [{"role": "user", "content": "Say something nice."}]
    score, pref = j.score(msgs, "You are great.", "Hello.")
    r = j.rm.score(msgs, ["You are great.", "Hello."])
    assert score.value == pytest.approx(r[0])
    assert pref.value == pytest.approx(1 / (1 + math.exp(-(r[0] - r[1]))))
    score, pref = j.score(msgs, "You are great.", None)
    assert score.status == "ok" and pref.status == "error"


def test_offline_judge_scores_against_the_reference():
    from pipeline.evaluation.judges import OfflineJudge

    j = OfflineJudge()
    vs = j.score(["The cat sat on the mat.", "Stock prices fell sharply today.", "anything"],
                 ["The cat sat on the mat.", "A cat is sitting on a rug.", ""])
    assert vs[0].value == pytest.approx(1.0, abs=1e-4)
    assert vs[1].value < 0.5 and vs[2].status == "error"


# ---- the summary's statistics ----------------------------------------------------------------------------
def _frame(n=60, seed=0):
    """draft vs two methods: `closer` is closer to the reference at equal length; `longer` only longer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base_sim, words = rng.uniform(0.3, 0.7), rng.randint(50, 150)
        for m, sim, w in (("draft", base_sim, words), ("closer", base_sim + 0.1, words + rng.choice([-1, 1])),
                          ("longer", base_sim - 0.05, words + 80)):
            rows.append({"id": str(i), "method": m, "answer_words": w, "reference_words": 100, "offline_sim": sim,
                         "draft_s": 1.0, "refine_s": 0.0 if m == "draft" else 0.5, "total_s": 1.0 if m == "draft" else 1.5,
                         "passes": None if m == "draft" else 40, "new_tokens": 0 if m == "draft" else 80,
                         "converged": None if m == "draft" else True, "generated_tokens": None, "error": ""})
    return pd.DataFrame(rows)


def test_summary_separates_closeness_from_length():
    from pipeline.evaluation.summary import summarize

    s = summarize(_frame(), baseline="draft", n_boot=300)
    closer, longer = s["methods"]["closer"]["metrics"], s["methods"]["longer"]["metrics"]
    assert closer["offline_win"]["mean"] == 1.0 and longer["offline_win"]["mean"] == 0.0
    assert longer["length_only"]["mean"] == 1.0  # length alone would crown the wrong method
    assert 0.3 < closer["length_only"]["mean"] < 0.7
    p = {(x["metric"], x["method"]): x for x in s["paired"]}
    assert p[("offline_sim", "closer")]["diff"] == pytest.approx(0.1) and p[("offline_sim", "closer")]["p_value"] < 0.01
    assert p[("offline_sim", "longer")]["diff"] == pytest.approx(-0.05)
    assert s["methods"]["closer"]["jacobi"]["tokens_per_pass"] == pytest.approx(2.0)
    assert s["methods"]["closer"]["jacobi"]["mean_passes"] == 40 and s["methods"]["closer"]["jacobi"]["converged_fraction"] == 1
    assert s["methods"]["draft"]["jacobi"] == {"mean_passes": None, "tokens_per_pass": None, "converged_fraction": None}
    assert s["methods"]["closer"]["mean_generated_tokens"] is None, "no greedy-continuation engine ran"
    assert s["methods"]["closer"]["latency"]["total_s"] == pytest.approx(1.5)
    assert list(s["metrics"])[0] == "offline_sim" and "offline_lc" in s["metrics"]


def test_verdict_number():
    assert Verdict(3.0).number == 3.0 and math.isnan(Verdict(None, "unparsed").number)
