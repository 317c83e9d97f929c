"""Evaluate the aligner against the alternatives on a benchmark, with Ray Data for the model and judge work.

    python -m jobs.evaluate                                        # embedded default: demo prompts, offline judge
    python -m jobs.evaluate config=conf/evaluate_alpaca_heldout.yaml  # AlpacaEval held-out, Llama-3-8B drafts
    ray job submit --working-dir . -- python -m jobs.evaluate ray.address=auto benchmark.path=/data/question.jsonl ...

Pipeline: read the benchmark (AlpacaEval, MT-bench, HH-RLHF or any prompt file) -> draft with the base model
where the input has no drafts -> (Best-of-N samples) -> every configured method on the same prompts and
drafts -> the configured judges -> per-row Parquet parts. Then the driver writes, in `output.path`:
  results.parquet   one row per prompt and method (answers, latency, Jacobi statistics, judge values)
  errors.jsonl      rows that could not be evaluated, with the reason
  summary.json      metrics with bootstrap intervals, paired tests vs the baseline, latency per method
  report.html + figures/*.png, and exports/fastchat/<method>.jsonl, exports/alpaca_eval/<method>.json
A killed run, rerun with the same output path, skips the prompts already written.

Methods: draft (the base answer as is), refine (fast Jacobi engine), refine_reference (the published
algorithm), in_context (the draft is also shown in the aligner's prompt), aligner_ar (the aligner's greedy
generate, same answer as refine, for the latency comparison), best_of_n (N base samples, the best by
`best_of_n.judge`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import OmegaConf

from jobs.align_dataset import (AlignerCfg, BaseCfg, DraftStage, _sort_key, input_files, read_inputs,
                                refine_settings)
from jobs.config import REPO, ConfigError, DataRayCfg, expand, load_config, run_job, start_data_job

METHODS = ("draft", "refine", "refine_reference", "in_context", "aligner_ar", "best_of_n")
ALIGNER_METHODS = {"refine": ("fast", False), "refine_reference": ("reference", False),
                   "in_context": ("fast", True), "aligner_ar": ("ar", False)}
READ_HEADROOM_CPUS = 0.5  # kept free for Ray Data's write tasks: a pipeline whose actors take every CPU hangs
WRITE_CPUS = 0.25
DEMO_EVAL = REPO / "pipeline" / "data" / "demo_eval.jsonl"  # the demo prompts with hand-written reference answers


# ---- config schema ---------------------------------------------------------------------------------
@dataclass
class BenchmarkCfg:
    name: str = "demo"
    path: str = "demo"
    format: str = "auto"
    id_field: Optional[str] = None
    drafts_path: Optional[str] = None
    references_path: Optional[str] = None
    id_mod: Optional[int] = None
    id_rem: int = 0
    limit: Optional[int] = None


@dataclass
class EvalOutputCfg:
    path: str = "outputs/evaluate"
    rows_per_file: int = 4
    model_id: str = "diffpo"
    report: bool = True
    exports: bool = True


@dataclass
class BestOfNCfg:
    n: int = 4
    judge: str = "offline"  # offline | reward | llm


@dataclass
class OfflineJudgeCfg:
    enabled: bool = True
    max_tokens: int = 256


@dataclass
class LLMJudgeCfg:
    enabled: bool = False
    base_url: Optional[str] = None
    model: str = "gpt-4"
    api_key_env: Optional[str] = None
    prompts: str = "../shared/data/mt_bench/judge_prompts.jsonl"
    grade: bool = True
    pairwise: bool = True
    swap: bool = True
    max_tokens: int = 512
    timeout_s: float = 120.0
    max_retries: int = 3
    parallel_requests: int = 8


@dataclass
class RewardJudgeCfg:
    enabled: bool = False
    model: Optional[str] = None
    label_index: int = 0
    max_length: int = 2048
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False


@dataclass
class JudgesCfg:
    offline: OfflineJudgeCfg = field(default_factory=OfflineJudgeCfg)
    llm: LLMJudgeCfg = field(default_factory=LLMJudgeCfg)
    reward: RewardJudgeCfg = field(default_factory=RewardJudgeCfg)
    batch_size: int = 16
    num_cpus: float = 0.5


@dataclass
class StatsCfg:
    baseline: str = "draft"
    n_boot: int = 1000
    seed: int = 0


@dataclass
class EvaluateConfig:
    benchmark: BenchmarkCfg = field(default_factory=BenchmarkCfg)
    output: EvalOutputCfg = field(default_factory=EvalOutputCfg)
    methods: list = field(default_factory=lambda: ["draft", "refine", "in_context", "aligner_ar"])
    base: BaseCfg = field(default_factory=BaseCfg)
    aligner: AlignerCfg = field(default_factory=AlignerCfg)
    best_of_n: BestOfNCfg = field(default_factory=BestOfNCfg)
    judges: JudgesCfg = field(default_factory=JudgesCfg)
    stats: StatsCfg = field(default_factory=StatsCfg)
    ray: DataRayCfg = field(default_factory=DataRayCfg)


def _path(p: str) -> Path:
    q = Path(expand(p))
    return q if q.is_absolute() or q.exists() else REPO / q


def validate(cfg) -> None:
    from jobs.align_dataset import validate as validate_align
    from pipeline.records import FORMATS

    problems = []
    if not benchmark_files(cfg.benchmark.path):
        problems.append(f"benchmark.path: no .jsonl/.jsonl.gz/.json/.parquet input at {cfg.benchmark.path!r}")
    if cfg.benchmark.format not in FORMATS:
        problems.append(f"benchmark.format: {cfg.benchmark.format!r} is not one of {', '.join(FORMATS)}")
    for k in ("drafts_path", "references_path"):
        v = cfg.benchmark[k]
        if v and not _path(v).exists():
            problems.append(f"benchmark.{k}: file not found: {v}")
    if cfg.benchmark.id_mod is not None and cfg.benchmark.id_mod < 1:
        problems.append("benchmark.id_mod: must be >= 1 or null")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        problems.append(f"methods: {bad or '[]'} — choose from {', '.join(METHODS)}")
    if len(set(cfg.methods)) != len(cfg.methods):
        problems.append("methods: listed twice")
    if cfg.stats.baseline not in cfg.methods:
        problems.append(f"stats.baseline: {cfg.stats.baseline!r} is not among the methods {list(cfg.methods)}")
    if "best_of_n" in cfg.methods:
        if cfg.best_of_n.n < 1:
            problems.append("best_of_n.n: must be >= 1")
        if cfg.best_of_n.judge not in ("offline", "reward", "llm"):
            problems.append("best_of_n.judge: offline | reward | llm")
        elif not cfg.judges[cfg.best_of_n.judge].enabled:
            problems.append(f"best_of_n.judge={cfg.best_of_n.judge} needs judges.{cfg.best_of_n.judge}.enabled=true")
        if cfg.base.kind != "hf":
            problems.append("best_of_n: needs base.kind=hf (samples are drawn in the job)")
        if not cfg.base.do_sample:
            problems.append("best_of_n: needs base.do_sample=true (N greedy samples are all the same)")
    j = cfg.judges
    if not (j.offline.enabled or j.llm.enabled or j.reward.enabled):
        problems.append("judges: enable at least one of judges.offline / judges.llm / judges.reward")
    if j.llm.enabled:
        from pipeline.clients import EndpointConfig

        ep = EndpointConfig(base_url=j.llm.base_url or "", model=j.llm.model, api_key_env=j.llm.api_key_env,
                            timeout_s=j.llm.timeout_s, max_retries=j.llm.max_retries)
        problems += [f"judges.llm: {p}" for p in ep.validate()]
        if not _path(j.llm.prompts).exists():
            problems.append(f"judges.llm.prompts: FastChat judge prompt file not found: {j.llm.prompts}")
        if not (j.llm.grade or j.llm.pairwise):
            problems.append("judges.llm: grade and pairwise are both off")
    if j.reward.enabled and not j.reward.model:
        problems.append("judges.reward.model: a Hugging Face sequence-classification model is needed")
    if j.batch_size < 1 or j.num_cpus <= 0:
        problems.append("judges.batch_size must be >= 1 and judges.num_cpus > 0")
    # the base/aligner/ray sections share align_dataset's schema and checks
    shim = OmegaConf.create({"input": {"path": "demo", "format": "auto", "drafts_path": None, "limit": None},
                             "output": {"format": "parquet", "rows_per_file": cfg.output.rows_per_file},
                             "base": cfg.base, "aligner": cfg.aligner, "ray": cfg.ray})
    try:
        validate_align(shim)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)


# ---- reading ----------------------------------------------------------------------------------------
def benchmark_files(path: str) -> list[str]:
    return [str(DEMO_EVAL)] if path == "demo" else input_files(str(_path(path)))


def done_ids(parts: Path, methods: list[str]) -> set[str]:
    """Prompts whose rows for every method are already written (a prompt cut off halfway is redone; the
    final table keeps one row per prompt and method)."""
    import pyarrow.parquet as pq

    seen: dict[str, set] = {}
    for f in sorted(parts.glob("*.parquet")):
        try:
            t = pq.read_table(f, columns=["id", "method"]).to_pydict()
        except Exception:  # noqa: BLE001 - a file cut short by a kill has no footer
            print(f"[evaluate] removing incomplete part {f.name} (its rows will be redone)")
            f.unlink()
            continue
        for i, m in zip(t["id"], t["method"]):
            seen.setdefault(i, set()).add(m)
    return {i for i, ms in seen.items() if set(methods) <= ms}


def load_references(path: str | None) -> dict[str, list[str]]:
    """Reference answers by id, one list of turns each: a FastChat answer file (MT-bench's
    reference_answer_gpt-4.jsonl) or JSONL with id + reference / reference_output / output."""
    if not path:
        return {}
    from pipeline.records import load_drafts

    refs = load_drafts(str(_path(path)), prefer=("reference", "reference_output"))
    return {k: list(v) for k, v in refs.items()}


def reference_turns(row: dict, refs: dict) -> list[str]:
    meta = json.loads(row["meta"] or "{}")
    for k in ("reference_output", "reference"):
        if k in meta:
            return [meta[k]] if isinstance(meta[k], str) else list(meta[k])
    return list(refs.get(str(row["id"]), []))


def keep_row(rid: str, mod: int | None, rem: int) -> bool:
    if mod is None:
        return True
    return str(rid).isdigit() and int(rid) % mod == rem


# ---- Ray Data stages ----------------------------------------------------------------------------------
LONG_COLUMNS = ["id", "benchmark", "category", "method", "prompt", "answer", "answer_turns", "turns", "history",
                "reference", "reference_turns", "answer_words", "reference_words", "draft_s", "refine_s", "total_s",
                "passes", "new_tokens", "tokens_per_pass", "converged", "error"]


def _words(s: str) -> int:
    return len(s.split())


class BestOfNStage:
    """N sampled base answers per turn; the selection judge keeps the best (per turn, in order)."""

    def __init__(self, base: dict, bon: dict, judges: dict, threads: int):
        import torch

        from pipeline.decoding.drafting import SamplingParams
        from pipeline.models import load_model

        torch.set_num_threads(threads)
        self.lm = load_model(base["model"], dtype=base["dtype"], device=base["device"],
                             trust_remote_code=base["trust_remote_code"])
        self.params = SamplingParams(max_new_tokens=base["max_new_tokens"], temperature=base["temperature"],
                                     top_p=base["top_p"], do_sample=True, seed=base["seed"])
        self.n, self.kind = bon["n"], bon["judge"]
        self.judge = make_judges(judges, only=self.kind)[self.kind]

    def _pick(self, conv: list[dict], cands: list[str], ref: str) -> int:
        if self.kind == "offline":
            vals = [v.number for v in self.judge.score(cands, [ref] * len(cands))]
        elif self.kind == "reward":
            vals = self.judge.rm.score(conv, cands)
        else:
            vals = [self.judge.grade([conv[-1]["content"]], [c])[0].number for c in cands]
        vals = [-math.inf if v != v else v for v in vals]
        return max(range(len(cands)), key=lambda i: vals[i])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from pipeline.decoding.drafting import generate_answers
        from pipeline.records import conversation

        out = []
        for r in batch.to_dict("records"):
            r["bon_turns"], r["bon_s"] = "[]", 0.0
            if not r["error"]:
                t0, picked = time.perf_counter(), []
                try:
                    refs = json.loads(r["reference_turns"])
                    for k in range(len(json.loads(r["turns"]))):
                        conv = conversation(r, k, picked)
                        cands = [a for a, _, _ in generate_answers(self.lm, [conv] * self.n, self.params,
                                                                   seed_key=f"{r['id']}#{k}")]
                        picked.append(cands[self._pick(conv, cands, refs[k] if k < len(refs) else "")])
                    r["bon_turns"], r["bon_s"] = json.dumps(picked), time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001
                    r["error"] = f"best_of_n stage: {type(e).__name__}: {e}"
            out.append(r)
        return pd.DataFrame(out)


class MethodStage:
    """Runs every aligner method on a batch of prompts and emits one long row per (prompt, method)."""

    def __init__(self, st: dict, methods: list[str], benchmark: str, threads: int):
        import torch

        from pipeline.models import load_model
        from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE
        from pipeline.decoding.refiner import Refiner

        torch.set_num_threads(threads)
        self.methods, self.benchmark = methods, benchmark
        need = [m for m in methods if m in ALIGNER_METHODS]
        lm = load_model(st["model"], dtype=st["dtype"], device=st["device"],
                        trust_remote_code=st["trust_remote_code"]) if need else None
        if need and st.get("knobs"):  # alignment-vector knob settings: the aligner becomes θ + Σ λ·AV
            from pipeline.vectors.knobs import load_knobbed

            load_knobbed(lm, {n: expand(p) for n, p in st["vectors"].items() if n in st["knobs"]},
                         cache_size=0).apply(dict(st["knobs"]))
        self.refiners = {m: Refiner(lm, refine_settings(st), mode=ALIGNER_METHODS[m][0], in_context=ALIGNER_METHODS[m][1],
                                    template=st["template"] or DEFAULT_CORRECTION_TEMPLATE) for m in need}

    def _row(self, r: dict, method: str, answers: list[str], draft_s: float, refine_s: float, results=()) -> dict:
        refs = json.loads(r["reference_turns"])
        meta = json.loads(r["meta"] or "{}")
        turns = json.loads(r["turns"]) if r["turns"] else []
        passes = sum(x.passes for x in results)
        new = sum(x.new_tokens for x in results)
        return {"id": str(r["id"]), "benchmark": self.benchmark, "category": str(meta.get("category", meta.get("dataset", ""))),
                "method": method, "prompt": turns[0] if turns else "", "answer": answers[0] if answers else "",
                "answer_turns": json.dumps(answers), "turns": r["turns"] or "[]", "history": r["history"] or "[]",
                "reference": refs[0] if refs else "", "reference_turns": r["reference_turns"],
                "answer_words": _words(answers[0]) if answers else 0, "reference_words": _words(refs[0]) if refs else 0,
                "draft_s": float(draft_s), "refine_s": float(refine_s), "total_s": float(draft_s + refine_s),
                "passes": int(passes), "new_tokens": int(new), "tokens_per_pass": float(new / passes) if passes else 0.0,
                "converged": all(x.converged for x in results), "error": r["error"] or ""}

    def _refine(self, m: str, rows: list[dict]) -> dict[int, list]:
        """Refine every turn of every row with method m; row index -> results (or an error string)."""
        from pipeline.records import conversation
        from pipeline.decoding.refiner import RefineRequest

        ref = self.refiners[m]
        jobs, out = [], {}
        for i, r in enumerate(rows):
            drafts = json.loads(r["drafts"])
            try:
                items = [ref.encode(RefineRequest(conversation(r, k, drafts), drafts[k],
                                                  key=str(r["id"]) if k == 0 else f"{r['id']}#{k}"))
                         for k in range(len(json.loads(r["turns"])))]
            except ValueError as e:
                out[i] = f"{m}: {e}"
                continue
            jobs += [(i, it) for it in items]
        try:
            results = ref.refine_items([it for _, it in jobs])
        except Exception:  # noqa: BLE001 - isolate the row that breaks the batch
            results = []
            for i, it in jobs:
                try:
                    results.append(ref.refine_items([it])[0])
                except Exception as e:  # noqa: BLE001
                    out[i] = f"{m}: {type(e).__name__}: {e}"
                    results.append(None)
        for (i, _), res in zip(jobs, results):
            if not isinstance(out.get(i), str):
                out.setdefault(i, []).append(res)
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        out = []
        good = [r for r in rows if not r["error"]]
        for r in rows:
            if r["error"]:  # one error row per method, so a resumed run sees the prompt as done
                out += [self._row(r, m, [], 0.0, 0.0) for m in self.methods]
        per_method = {m: self._refine(m, good) for m in self.methods if m in ALIGNER_METHODS}
        for i, r in enumerate(good):
            draft_s = 0.0 if r.get("draft_s") is None or r["draft_s"] != r["draft_s"] else float(r["draft_s"])
            for m in self.methods:
                if m == "draft":
                    out.append(self._row(r, m, json.loads(r["drafts"]), draft_s, 0.0))
                elif m == "best_of_n":
                    out.append(self._row(r, m, json.loads(r.get("bon_turns") or "[]"), float(r.get("bon_s") or 0.0), 0.0))
                else:
                    res = per_method[m].get(i)
                    if isinstance(res, str) or res is None or any(x is None for x in res):
                        bad = dict(r, error=res if isinstance(res, str) else f"{m}: refinement failed")
                        out.append(self._row(bad, m, [], draft_s, 0.0))
                    else:
                        out.append(self._row(r, m, [x.text for x in res], draft_s, sum(x.wall_s for x in res), res))
        return pd.DataFrame(out, columns=LONG_COLUMNS)


def make_judges(j: dict, only: str | None = None) -> dict:
    """The enabled judges, by name (offline, llm, reward)."""
    judges = {}
    if j["offline"]["enabled"] and only in (None, "offline"):
        from pipeline.evaluation.judges import OfflineJudge

        judges["offline"] = OfflineJudge(max_tokens=j["offline"]["max_tokens"])
    if j["llm"]["enabled"] and only in (None, "llm"):
        from pipeline.evaluation.judges import LLMJudge, load_fastchat_prompts
        from pipeline.clients import ChatEndpoint, EndpointConfig

        c = j["llm"]
        ep = ChatEndpoint(EndpointConfig(base_url=c["base_url"], model=c["model"], api_key_env=c["api_key_env"],
                                         timeout_s=c["timeout_s"], max_retries=c["max_retries"]))
        judges["llm"] = LLMJudge(ep, load_fastchat_prompts(_path(c["prompts"])), c["max_tokens"], c["swap"])
    if j["reward"]["enabled"] and only in (None, "reward"):
        from pipeline.evaluation.judges import RewardJudge

        c = j["reward"]
        judges["reward"] = RewardJudge(c["model"], device=c["device"], dtype=c["dtype"], label_index=c["label_index"],
                                       trust_remote_code=c["trust_remote_code"], max_length=c["max_length"])
    return judges


class JudgeStage:
    """Adds the judges' columns to long rows: offline_sim, llm_score(+_turns), llm_pref, rm_score, rm_pref,
    and judge_notes (statuses and the raw text of every verdict that could not be parsed)."""

    def __init__(self, j: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.cfg, self.judges = j, make_judges(j)

    def _llm(self, r: dict) -> dict:
        judge, c, notes, res = self.judges["llm"], self.cfg["llm"], {}, {}
        qs, ans, refs = json.loads(r["turns"]), json.loads(r["answer_turns"]), json.loads(r["reference_turns"])
        if c["grade"]:
            vs = judge.grade(qs, ans, refs, r["category"])
            res["llm_score"] = float(sum(v.number for v in vs) / len(vs)) if vs else math.nan
            res["llm_score_turns"] = json.dumps([v.number if v.status == "ok" else None for v in vs])
            notes["llm_grade"] = [v.status if v.status == "ok" else f"{v.status}: {v.raw[-300:]}" for v in vs]
        if c["pairwise"] and r["reference"]:
            v = judge.compare(r["prompt"], r["answer"], r["reference"])
            res["llm_pref"] = v.number
            notes["llm_pair"] = v.status if v.status == "ok" else f"{v.status}: {v.raw[-300:]}"
        res["_notes"] = notes
        return res

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.records import conversation

        df = batch.copy()
        n = len(df)
        for c in ("offline_sim", "llm_score", "llm_pref", "rm_score", "rm_pref"):
            df[c] = math.nan
        df["llm_score_turns"] = "[]"
        notes = [{} for _ in range(n)]
        ok = [i for i in range(n) if not df["error"].iat[i]]
        if "offline" in self.judges and ok:
            vs = self.judges["offline"].score([df["answer"].iat[i] for i in ok], [df["reference"].iat[i] for i in ok])
            for i, v in zip(ok, vs):
                df.iat[i, df.columns.get_loc("offline_sim")] = v.number
        if "reward" in self.judges:
            for i in ok:
                r = df.iloc[i].to_dict()
                score, pref = self.judges["reward"].score(conversation(r, 0, []), r["answer"], r["reference"] or None)
                df.iat[i, df.columns.get_loc("rm_score")], df.iat[i, df.columns.get_loc("rm_pref")] = score.number, pref.number
                if score.status != "ok":
                    notes[i]["reward"] = f"{score.status}: {score.raw}"
        if "llm" in self.judges and ok:
            with ThreadPoolExecutor(self.cfg["llm"]["parallel_requests"]) as pool:
                outs = list(pool.map(lambda i: self._llm(df.iloc[i].to_dict()), ok))
            for i, o in zip(ok, outs):
                notes[i].update(o.pop("_notes"))
                for k, v in o.items():
                    df.iat[i, df.columns.get_loc(k)] = v
        df["judge_notes"] = [json.dumps(x) for x in notes]
        return df


# ---- finalize -------------------------------------------------------------------------------------------
def write_exports(ok: pd.DataFrame, out: Path, model_id: str) -> None:
    """Each method's answers in FastChat's answer format and AlpacaEval's model-outputs format."""
    (out / "exports" / "fastchat").mkdir(parents=True, exist_ok=True)
    (out / "exports" / "alpaca_eval").mkdir(parents=True, exist_ok=True)
    for m, g in ok.groupby("method", sort=False):
        name = f"{model_id}-{m}"
        with open(out / "exports" / "fastchat" / f"{m}.jsonl", "w") as f:
            for r in g.to_dict("records"):
                qid = int(r["id"]) if str(r["id"]).isdigit() else r["id"]
                f.write(json.dumps({"question_id": qid, "answer_id": f"{name}-{r['id']}", "model_id": name,
                                    "choices": [{"index": 0, "turns": json.loads(r["answer_turns"])}],
                                    "tstamp": time.time()}, ensure_ascii=False) + "\n")
        recs = [{"instruction": r["prompt"], "output": r["answer"], "generator": name,
                 **({"dataset": r["category"]} if r["category"] else {})} for r in g.to_dict("records")]
        (out / "exports" / "alpaca_eval" / f"{m}.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False))


NOTES = {
    "offline": "The offline judge measures how close an answer is to the reference answer in a small embedding "
               "space (all-MiniLM-L6-v2), not quality. On 8 models' AlpacaEval answers it agrees with GPT-4-turbo's "
               "ordering about as often as answer length alone does (benchmarks/validate_offline_judge.py): read it "
               "next to the length-only and length-controlled rows.",
    "given_drafts": "Drafts came with the input, so the draft latency was not measured here (draft_s = 0); total_s "
                    "is the aligner's time only.",
}


def finalize(cfg, out: Path, parts: Path, rows_in: int, started: float, drafted: bool) -> tuple[dict, pd.DataFrame]:
    import pyarrow.parquet as pq

    from pipeline.evaluation.summary import summarize

    files = sorted(parts.glob("*.parquet"))
    df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True) if files else \
        pd.DataFrame(columns=LONG_COLUMNS + ["offline_sim", "llm_score", "llm_pref", "rm_score", "rm_pref", "judge_notes"])
    df = df.drop_duplicates(subset=["id", "method"], keep="last")
    df = df[df["method"].isin(list(cfg.methods))]  # a rerun with fewer methods reports only those
    df["_o"] = df["method"].map({m: i for i, m in enumerate(cfg.methods)})
    df = df.sort_values(["id", "_o"], key=lambda s: s.map(_sort_key) if s.name == "id" else s).drop(columns="_o")
    df = df.reset_index(drop=True)
    ok, bad = df[df["error"] == ""], df[df["error"] != ""]
    ok.to_parquet(out / "results.parquet", index=False)
    with open(out / "errors.jsonl", "w") as f:
        for r in bad.to_dict("records"):
            f.write(json.dumps({"id": r["id"], "method": r["method"], "error": r["error"], "prompt": r["prompt"]},
                               ensure_ascii=False) + "\n")
    s = summarize(df, cfg.stats.baseline, cfg.stats.n_boot, cfg.stats.seed)
    judges = [k for k in ("offline", "llm", "reward") if cfg.judges[k].enabled]
    notes = [NOTES["offline"]] if "offline" in judges else []
    if not drafted:
        notes.append(NOTES["given_drafts"])
    summary = {"benchmark": cfg.benchmark.name, "n_prompts": int(ok["id"].nunique()), "rows_in": rows_in,
               "error_rows": int(len(bad)), "judges": judges, "methods_run": list(cfg.methods),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "wall_s": round(time.perf_counter() - started, 1), "notes": notes,
               "config": OmegaConf.to_container(cfg), **s}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if cfg.output.exports:
        write_exports(ok, out, cfg.output.model_id)
    if cfg.output.report:
        from pipeline.evaluation.report import write_report

        write_report(ok, summary, out)
    return summary, ok


def print_table(summary: dict) -> None:
    metrics = list(summary["metrics"])[:4]
    head = f"{'method':<18}" + "".join(f"{m:>22}" for m in metrics) + f"{'words':>7}{'total_s':>9}{'tok/pass':>9}"
    print(head)
    for m, r in summary["methods"].items():
        cells = ""
        for k in metrics:
            v = r["metrics"].get(k)
            cells += f"{v['mean']:>8.3f} [{v['lo']:.3f},{v['hi']:.3f}]" if v else f"{'-':>22}"
        print(f"{m:<18}{cells}{r['mean_words']:>7.0f}{r['latency']['total_s']:>9.2f}{r['jacobi']['tokens_per_pass']:>9.2f}")


# ---- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfg = load_config(EvaluateConfig, "conf/evaluate.yaml", argv)
    validate(cfg)
    out = Path(expand(cfg.output.path))
    parts = out / "_parts"
    parts.mkdir(parents=True, exist_ok=True)

    import ray

    start_data_job("evaluate", cfg, out)

    from pipeline.records import load_drafts

    b = cfg.benchmark
    files = benchmark_files(b.path)
    drafts_by_key = load_drafts(str(_path(b.drafts_path))) if b.drafts_path else None
    refs = load_references(b.references_path)
    parsed = read_inputs(files, b.format, b.id_field, drafts_by_key)
    rows = parsed.to_pandas()  # benchmarks are small (hundreds to thousands of prompts); the models are the heavy part
    rows = rows[[keep_row(i, b.id_mod, b.id_rem) for i in rows["id"]]]
    if b.limit:
        rows = rows.head(b.limit)
    dups = rows["id"][rows["id"].duplicated()].unique().tolist()
    if dups:
        raise ConfigError([f"benchmark has duplicate ids {dups[:10]}; set benchmark.id_field to a unique field"])
    rows = rows.assign(reference_turns=[json.dumps(reference_turns(r, refs)) for r in rows.to_dict("records")])
    rows_in = len(rows)
    done = done_ids(parts, list(cfg.methods))
    todo = rows[~rows["id"].isin(done)]
    drafted = bool(todo["drafts"].isna().any()) if len(todo) else False
    print(f"[evaluate] {rows_in} prompts, {rows_in - len(todo)} already done in {parts}, {len(todo)} to do; "
          f"methods {list(cfg.methods)}", flush=True)

    if len(todo):
        res = ray.cluster_resources().get("CPU", 0.0)
        threads = cfg.ray.torch_threads
        stages = [("base", cfg.base.num_cpus * cfg.base.concurrency)] if drafted else []
        stages += [("best_of_n", cfg.base.num_cpus)] if "best_of_n" in cfg.methods else []
        stages += [("aligner", cfg.aligner.num_cpus * cfg.aligner.concurrency), ("judges", cfg.judges.num_cpus)]
        if sum(c for _, c in stages) + READ_HEADROOM_CPUS > res:
            raise ConfigError([f"the stages ask for {sum(c for _, c in stages):g} CPUs ({stages}) and "
                               f"{READ_HEADROOM_CPUS} must stay free for I/O, but the cluster has {res:g}"])
        todo = todo.reset_index(drop=True)
        k = cfg.output.rows_per_file  # blocks of k prompts from the start: no repartition task to schedule
        ds = ray.data.from_pandas([todo.iloc[i:i + k] for i in range(0, len(todo), k)])
        if drafted:
            st = OmegaConf.to_container(cfg.base)
            ds = ds.map_batches(DraftStage, batch_format="pandas", batch_size=cfg.base.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=cfg.base.concurrency),
                                num_cpus=cfg.base.num_cpus, num_gpus=cfg.base.num_gpus or None,
                                fn_constructor_kwargs=dict(st=st, threads=threads))
        if "best_of_n" in cfg.methods:
            ds = ds.map_batches(BestOfNStage, batch_format="pandas", batch_size=cfg.base.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.base.num_cpus,
                                num_gpus=cfg.base.num_gpus or None,
                                fn_constructor_kwargs=dict(base=OmegaConf.to_container(cfg.base),
                                                           bon=OmegaConf.to_container(cfg.best_of_n),
                                                           judges=OmegaConf.to_container(cfg.judges), threads=threads))
        a = cfg.aligner
        ds = ds.map_batches(MethodStage, batch_format="pandas", batch_size=a.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=a.concurrency), num_cpus=a.num_cpus,
                            num_gpus=a.num_gpus or None,
                            fn_constructor_kwargs=dict(st=OmegaConf.to_container(a), methods=list(cfg.methods),
                                                       benchmark=b.name, threads=threads))
        ds = ds.map_batches(JudgeStage, batch_format="pandas", batch_size=cfg.judges.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.judges.num_cpus,
                            fn_constructor_kwargs=dict(j=OmegaConf.to_container(cfg.judges), threads=threads))
        ds.write_parquet(str(parts), ray_remote_args={"num_cpus": WRITE_CPUS})

    summary, _ = finalize(cfg, out, parts, rows_in, started, drafted)
    print_table(summary)
    print(f"[evaluate] results: {out / 'results.parquet'}\n[evaluate] summary: {out / 'summary.json'}"
          + (f"\n[evaluate] report:  {out / 'report.html'}" if cfg.output.report else ""), flush=True)
    return summary


if __name__ == "__main__":
    run_job("evaluate")
