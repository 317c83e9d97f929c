"""The evaluation job: judges, verdict parsing, the summary's statistics, and the Ray Data job end to end on tiny
models (offline and reward-model judges, every method, exports, report, resume)."""
import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import ConfigError, load_config
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
                         "passes": 0 if m == "draft" else 40, "new_tokens": 0 if m == "draft" else 80,
                         "converged": True, "error": ""})
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
    assert s["methods"]["closer"]["latency"]["total_s"] == pytest.approx(1.5)
    assert list(s["metrics"])[0] == "offline_sim" and "offline_lc" in s["metrics"]


# ---- the job ------------------------------------------------------------------------------------------
def _bench(tmp_path: Path) -> Path:
    rows = [
        {"id": 0, "dataset": "helpful_base", "instruction": "Name two colors.", "output": "Red and blue.",
         "reference_output": "Two colors are red and blue."},
        {"id": 4, "dataset": "koala", "instruction": "Say hello politely.", "reference_output": "Hello, nice to meet you."},
        {"id": 8, "instruction": "", "reference_output": "x"},  # empty prompt: an error row
        {"id": 5, "instruction": "Not held out.", "reference_output": "y"},  # id % 4 != 0: filtered
        {"question_id": 12, "category": "math", "turns": ["What is 1+1?", "And 2+2?"], "reference": ["2", "4"]},
    ]
    p = tmp_path / "bench.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


TINY = ["base.sampling.max_new_tokens=10", "aligner.refine.max_new_tokens=12", "aligner.refine.block_size=8", "ray.progress_bars=false",
        "stats.n_boot=50", "best_of_n.n=2", "output.rows_per_file=1", "base.num_cpus=0.25", "aligner.num_cpus=0.25",
        "judges.num_cpus=0.25", "aligner.batch_size=1", "base.batch_size=1", "judges.batch_size=6"]  # a part per prompt


@pytest.mark.timeout(600)
def test_evaluate_job_end_to_end(tmp_path, tiny_dirs, tiny_rm, ray_local):
    from jobs.evaluate import main

    m = str(tiny_dirs["llama"])
    out = tmp_path / "out"
    args = [f"benchmark.path={_bench(tmp_path)}", "benchmark.name=mini", "benchmark.id_mod=4", f"output.path={out}",
            f"base.model={m}", f"aligner.model={m}", "methods=[draft,refine,refine_reference,in_context,aligner_ar,best_of_n]",
            "judges.reward.enabled=true", f"judges.reward.model={tiny_rm}", *TINY]
    s = main(args)
    df = pd.read_parquet(out / "results.parquet")
    assert s["n_prompts"] == 3 and len(df) == 3 * 6
    assert set(df["method"]) == {"draft", "refine", "refine_reference", "in_context", "aligner_ar", "best_of_n"}
    by = {(r["id"], r["method"]): r for r in df.to_dict("records")}
    assert by[("0", "draft")]["answer"] == "Red and blue."  # a draft that came with the input is kept
    for i in ("0", "4", "12"):  # greedy Jacobi, reference Jacobi and greedy AR agree token for token
        assert list(by[(i, "refine")]["answer_turns"]) == list(by[(i, "aligner_ar")]["answer_turns"]) == \
            list(by[(i, "refine_reference")]["answer_turns"])
    assert len(by[("12", "refine")]["answer_turns"]) == 2  # both MT-bench turns
    assert list(by[("12", "draft")]["reference_turns"]) == ["2", "4"]
    assert df["offline_sim"].notna().all() and df["rm_score"].notna().all() and df["rm_pref"].between(0, 1).all()
    assert (df.loc[df["method"] == "refine", "passes"] > 0).all()
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["id"] for e in errors} == {"8"} and "empty prompt" in errors[0]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "draft" and {"offline_sim", "rm_score", "length_only"} <= set(summary["metrics"])
    assert any(p["method"] == "refine" and p["metric"] == "offline_sim" for p in summary["paired"])
    fc = [json.loads(x) for x in (out / "exports/fastchat/refine.jsonl").read_text().splitlines()]
    assert {x["question_id"] for x in fc} == {0, 4, 12} and fc[0]["model_id"] == "diffpo-refine"
    ae = json.loads((out / "exports/alpaca_eval/draft.json").read_text())
    assert ae[0]["instruction"] == "Name two colors." and ae[0]["output"] == "Red and blue."
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "refine_reference" in html

    # resume: drop one part file (one prompt); a rerun redoes exactly that prompt, without duplicates
    parts = sorted((out / "_parts").glob("*.parquet"))
    assert len(parts) == 4  # 3 prompts + the error row
    parts[0].unlink()
    s2 = main(args)
    assert len(list((out / "_parts").glob("*.parquet"))) == 4
    df2 = pd.read_parquet(out / "results.parquet")
    assert len(df2) == len(df) and not df2.duplicated(["id", "method"]).any()
    pd.testing.assert_frame_equal(df.drop(columns=["draft_s", "refine_s", "total_s"]).reset_index(drop=True),
                                  df2.drop(columns=["draft_s", "refine_s", "total_s"]).reset_index(drop=True),
                                  check_dtype=False)
    assert s2["n_prompts"] == 3


@pytest.mark.parametrize("override,msg", [
    ("methods=[draft,nope]", "methods.1: Input should be 'draft'"),
    ("stats.baseline=refine_reference", "not among the methods"),
    ("methods=[draft,best_of_n]", None),  # fine with the offline judge on
    ("judges.llm.enabled=true", "base_url"),
    ("judges.offline.enabled=false", "enable at least one"),
    ("benchmark.path=/nonexistent.jsonl", "benchmark.path"),
])
def test_config_errors_are_reported_up_front(override, msg):
    from jobs.evaluate import EvaluateConfig

    if msg is None:
        load_config(EvaluateConfig, "conf/evaluate.yaml", [override])
        return
    with pytest.raises(ConfigError, match=msg):
        load_config(EvaluateConfig, "conf/evaluate.yaml", [override])


def test_hh_rlhf_dialogues_become_prompts_with_the_chosen_answer_as_reference():
    import gzip

    from pipeline.records import normalize

    with gzip.open(shared_file("hh_rlhf/harmless-base-test.jsonl.gz"), "rt") as f:
        recs = [json.loads(next(f)) for _ in range(20)]
    for i, rec in enumerate(recs):
        row = normalize(rec, str(i))
        assert row["error"] is None
        last = rec["chosen"].rsplit("\n\nAssistant:", 1)
        assert row["references"] == [last[1].strip()]
        assert row["turns"][0] == last[0].rsplit("\n\nHuman:", 1)[1].strip()
    assert normalize({"chosen": "no turns here"}, "x")["error"]


def test_verdict_number():
    assert Verdict(3.0).number == 3.0 and math.isnan(Verdict(None, "unparsed").number)


def test_references_file_formats(tmp_path):
    from jobs.evaluate import load_references

    fc = tmp_path / "ref.jsonl"
    fc.write_text(json.dumps({"question_id": 81, "choices": [{"index": 0, "turns": ["t1", "t2"]}]}) + "\n"
                  + json.dumps({"id": 5, "reference_output": "R5", "output": "not this"}) + "\n"
                  + json.dumps({"id": 6, "output": "O6"}) + "\n")
    refs = load_references(str(fc))
    assert refs["81"] == ["t1", "t2"] and refs["5"] == ["R5"] and refs["6"] == ["O6"]
    assert load_references(None) == {}
