"""Evaluate the aligner against the alternatives on a benchmark, with Ray Data for the model and judge work.

    python -m jobs.evaluate                                        # embedded default: demo prompts, offline judge
    python -m jobs.evaluate config=conf/evaluate_alpaca_heldout.yaml  # AlpacaEval held-out, Llama-3-8B drafts
    python -m jobs.evaluate --help                                 # every key, its default and what it does
    ray job submit --working-dir . -- python -m jobs.evaluate ray.address=auto benchmark.path=/data/question.jsonl ...

Pipeline: read the benchmark (AlpacaEval, MT-bench, HH-RLHF or any prompt file) -> draft with the base model
where the input has no drafts -> (Best-of-N samples) -> every configured method on the same prompts and
drafts -> the configured judges -> each block of prompts written by the workers (`jobs.common.blocks`: rows
stream from storage to storage; `output.path` may be a local folder or any URI pyarrow reads). In `output.path`:
  rows/, errors/    Parquet folders, one file per block: one row per prompt and method (answers, latency, what the
                    method's engine computed: Jacobi statistics or generated tokens, judge values); the rows that
                    could not be evaluated, with the reason
  results.parquet, errors.jsonl   the same as single files (the export step)
  summary.json      metrics with bootstrap intervals, paired tests vs the baseline, latency per method
  report.html + figures/*.png, and exports/fastchat/<method>.jsonl, exports/alpaca_eval/<method>.json
A killed run, rerun with the same output path, skips the blocks already written (other methods: every block is
redone). The statistics need every row's numbers in one place: that step reads the rows folder's numeric and label
columns (and the answers, for the report's examples); benchmarks are small.

Methods: draft (the base answer as is), refine (DiffPO on `aligner.engine`: vLLM or the fast Jacobi engine),
refine_reference (the published Jacobi loop), in_context (refine with the draft also shown in the aligner's
prompt), aligner_ar (the aligner's greedy HF generate: the same answer as refine, for the latency comparison),
best_of_n (N base samples drawn with HF generate, the best by `best_of_n.judge`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal, Optional

import pyarrow as pa
from pydantic import Field

from jobs.common import blocks, data, exports, storage, vllm_stages
from jobs.common.config import (REPO, AlignerCfg, DataRayCfg, DraftCfg, EndpointCfg, ModelCfg, Section,
                                VllmAlignerCfg, VllmDraftCfg, as_engine, expand, formerly, load_config, resolve_path)
from jobs.common.runtime import run_job
from jobs.common.stages import DraftStage, load_aligner, make_refiner, refine_turns
from pipeline.records import FORMATS, META, MESSAGE, ROW_SCHEMA, error_row, normalize

METHODS = ("draft", "refine", "refine_reference", "in_context", "aligner_ar", "best_of_n")
# method -> (engine, draft in context); None = the aligner section's engine
ALIGNER_METHODS = {"refine": (None, False), "refine_reference": ("reference", False),
                   "in_context": (None, True), "aligner_ar": ("ar", False)}
DEMO_EVAL = REPO / "pipeline" / "data" / "demo_eval.jsonl"  # the demo prompts with hand-written reference answers
Method = Literal[METHODS]


# ---- config schema ---------------------------------------------------------------------------------------
class BenchmarkCfg(Section):
    name: str = "demo"
    path: str = Field("demo", description='a file or folder (.jsonl, .json, .parquet, .gz too); "demo" = bundled '
                                          "prompts with references")
    format: Literal[FORMATS] = "auto"
    id_field: Optional[str] = None
    drafts_path: Optional[str] = Field(None, description="base answers joined by id or instruction")
    references_path: Optional[str] = Field(None, description="reference answers by id (FastChat answer file, or "
                                                             "JSONL with id + reference)")
    id_mod: Optional[int] = Field(None, ge=1, description="keep integer ids with id % id_mod == id_rem (held-out)")
    id_rem: int = 0
    limit: Optional[int] = Field(None, ge=1)

    def check(self) -> list[str]:
        problems = [] if data.input_files(self.path, DEMO_EVAL) else [
            f"path: no .jsonl/.json/.parquet input (.gz too) at {self.path!r}"]
        for k in ("drafts_path", "references_path"):
            if getattr(self, k) and not storage.exists(getattr(self, k)):
                problems.append(f"{k}: file not found: {getattr(self, k)}")
        return problems


class EvalOutputCfg(Section):
    path: str = Field("outputs/evaluate", description="a local folder or a URI (s3://, gs://, ...)")
    rows_per_block: int = Field(8, ge=1, description="prompts per block: one file of rows, the unit a killed job "
                                                     "redoes", json_schema_extra=formerly("rows_per_file"))
    model_id: str = Field("diffpo", description='exports name each method "<model_id>-<method>"')
    report: bool = Field(True, description="report.html + figures/*.png")
    exports: bool = Field(True, description="exports/fastchat/<method>.jsonl and exports/alpaca_eval/<method>.json")


class BestOfNCfg(Section):
    n: int = Field(4, ge=1, description="base samples per prompt")
    judge: Literal["offline", "reward", "llm"] = Field(
        "offline", description="picks the best sample (offline compares with the reference: an oracle)")


class OfflineJudgeCfg(Section):
    enabled: bool = True
    max_tokens: int = Field(256, ge=1, description="answers and references are embedded from their first max_tokens "
                                                   "tokens (truncation is this judge's design)")


class LLMJudgeCfg(EndpointCfg):
    enabled: bool = False
    model: str = "gpt-4"
    prompts: str = Field("../shared/data/mt_bench/judge_prompts.jsonl", description="FastChat's judge prompts")
    grade: bool = True
    pairwise: bool = True
    swap: bool = Field(True, description="pairwise in both orders, averaged")
    max_tokens: int = Field(512, ge=1)
    timeout_s: float = Field(120.0, gt=0)

    def check(self) -> list[str]:
        if not self.enabled:
            return []
        problems = self.endpoint(self.model).validate()
        if not resolve_path(self.prompts).exists():
            problems.append(f"prompts: FastChat judge prompt file not found: {self.prompts}")
        if not (self.grade or self.pairwise):
            problems.append("grade and pairwise are both off")
        return problems


class RewardJudgeCfg(ModelCfg):
    enabled: bool = False
    model: Optional[str] = Field(None, description="a Hugging Face sequence-classification model")
    label_index: int = 0
    max_length: int = Field(2048, ge=8, description="a longer conversation + answer gets no rm_score, and a judge "
                                                    "note with its length (never truncated)")

    def check(self) -> list[str]:
        if not self.enabled:
            return []
        return ModelCfg.check(self) if self.model else ["model: a Hugging Face sequence-classification model is needed"]


class JudgesCfg(Section):
    offline: OfflineJudgeCfg = Field(default_factory=OfflineJudgeCfg)
    llm: LLMJudgeCfg = Field(default_factory=LLMJudgeCfg)
    reward: RewardJudgeCfg = Field(default_factory=RewardJudgeCfg)
    batch_size: int = Field(16, ge=1)
    num_cpus: float = Field(0.5, gt=0)

    def check(self) -> list[str]:
        if not (self.offline.enabled or self.llm.enabled or self.reward.enabled):
            return ["enable at least one of judges.offline / judges.llm / judges.reward"]
        return []


class StatsCfg(Section):
    baseline: str = "draft"
    n_boot: int = Field(1000, ge=1)
    seed: int = 0


class EvaluateConfig(Section):
    benchmark: BenchmarkCfg = Field(default_factory=BenchmarkCfg)
    output: EvalOutputCfg = Field(default_factory=EvalOutputCfg)
    methods: list[Method] = Field(default_factory=lambda: ["draft", "refine", "in_context", "aligner_ar"])
    base: DraftCfg = Field(default_factory=VllmDraftCfg, description="drafts rows without drafts, draws Best-of-N samples")
    aligner: AlignerCfg = Field(default_factory=VllmAlignerCfg, description="every aligner method uses this model "
                                                                        "and these settings (each picks its mode)")
    best_of_n: BestOfNCfg = Field(default_factory=BestOfNCfg)
    judges: JudgesCfg = Field(default_factory=JudgesCfg)
    stats: StatsCfg = Field(default_factory=StatsCfg)
    ray: DataRayCfg = Field(default_factory=DataRayCfg)

    def check(self) -> list[str]:
        problems = []
        if not self.methods or len(set(self.methods)) != len(self.methods):
            problems.append(f"methods: a non-empty list without repeats, got {self.methods}")
        if self.stats.baseline not in self.methods:
            problems.append(f"stats.baseline: {self.stats.baseline!r} is not among the methods {self.methods}")
        if "best_of_n" in self.methods:
            if not getattr(self.judges, self.best_of_n.judge).enabled:
                problems.append(f"best_of_n.judge={self.best_of_n.judge} needs "
                                f"judges.{self.best_of_n.judge}.enabled=true")
            if self.base.engine == "openai":
                problems.append("best_of_n: needs a local base model (base.engine vllm or hf; the samples are drawn "
                                "with HF generate in the job)")
            if not self.base.sampling.do_sample:
                problems.append("best_of_n: needs base.sampling.do_sample=true (N greedy samples are all the same)")
        return problems


# ---- rows ------------------------------------------------------------------------------------------------
INPUT_SCHEMA = ROW_SCHEMA.append(pa.field("draft_s", pa.float64()))
BON_SCHEMA = INPUT_SCHEMA.append(pa.field("bon_turns", pa.list_(pa.string()))).append(pa.field("bon_s", pa.float64()))
LONG_SCHEMA = pa.schema([
    ("id", pa.string()), ("benchmark", pa.string()), ("category", pa.string()), ("method", pa.string()),
    ("prompt", pa.string()), ("answer", pa.string()), ("answer_turns", pa.list_(pa.string())),
    ("turns", pa.list_(pa.string())), ("history", pa.list_(MESSAGE)), ("meta", META), ("reference", pa.string()),
    ("reference_turns", pa.list_(pa.string())), ("answer_words", pa.int64()), ("reference_words", pa.int64()),
    ("draft_s", pa.float64()), ("refine_s", pa.float64()), ("total_s", pa.float64()), ("passes", pa.int64()),
    ("new_tokens", pa.int64()), ("tokens_per_pass", pa.float64()), ("converged", pa.bool_()),
    ("generated_tokens", pa.int64()), ("error", pa.string())])
# Per row, only what the method's engine computed: passes, tokens_per_pass and converged from a Jacobi engine
# (refine and in_context on aligner.engine fast or reference; refine_reference), null elsewhere; generated_tokens
# (tokens generated, stop tokens included, summed over turns) from a greedy-continuation engine (aligner_ar; refine
# and in_context on vllm or ar), null elsewhere; draft and best_of_n run no aligner: all four null, new_tokens 0.
JUDGE_COLUMNS = ("offline_sim", "llm_score", "llm_pref", "rm_score", "rm_pref")
RESULT_SCHEMA = pa.schema(list(LONG_SCHEMA) + [pa.field(c, pa.float64()) for c in JUDGE_COLUMNS] + [
    pa.field("llm_score_turns", pa.list_(pa.float64())), pa.field("judge_notes", pa.list_(pa.string()))])


def load_references(path: str | None) -> dict[str, list[str]]:
    """Reference answers by id, one list of turns each: a FastChat answer file (MT-bench's
    reference_answer_gpt-4.jsonl) or JSONL with id + reference / reference_output / output."""
    if not path:
        return {}
    refs = blocks.drafts_lookup(path, prefer=("reference", "reference_output"))
    return {k: list(v) for k, v in refs.items()}


def keep_row(rid: str, mod: int | None, rem: int) -> bool:
    return mod is None or (str(rid).isdigit() and int(rid) % mod == rem)


def side_tables(drafts_path: str | None, references_path: str | None) -> tuple:
    """(drafts lookup or None, references by id): what the rows are joined with (a Ray task builds it once)."""
    return (blocks.drafts_lookup(drafts_path) if drafts_path else None), load_references(references_path)


def normalize_row(rec, fid: str, side, b: BenchmarkCfg) -> dict | None:
    """A benchmark record as a row, joined with the drafts and references files; None for a row the held-out split
    leaves out (a line that could not be read has no id to split on and stays, as its error row)."""
    drafts, refs = side or (None, {})
    row = normalize(rec, fid, b.format, b.id_field, drafts)
    if not (keep_row(row["id"], b.id_mod, b.id_rem) or (row["error"] is not None and not str(row["id"]).isdigit())):
        return None
    if refs and not row["references"]:  # references from a separate file fill the rows that came without
        row["references"] = refs.get(row["id"], [])
    return row


# ---- Ray Data stages (thin adapters over pipeline/) ------------------------------------------------------
def make_judges(j: JudgesCfg, only: str | None = None) -> dict:
    """The enabled judges, by name (offline, llm, reward)."""
    judges = {}
    if j.offline.enabled and only in (None, "offline"):
        from pipeline.evaluation.judges import OfflineJudge

        judges["offline"] = OfflineJudge(max_tokens=j.offline.max_tokens)
    if j.llm.enabled and only in (None, "llm"):
        from pipeline.clients import ChatEndpoint
        from pipeline.evaluation.judges import LLMJudge, load_fastchat_prompts

        c = j.llm
        judges["llm"] = LLMJudge(ChatEndpoint(c.endpoint(c.model)), load_fastchat_prompts(resolve_path(c.prompts)),
                                 c.max_tokens, c.swap)
    if j.reward.enabled and only in (None, "reward"):
        from pipeline.evaluation.judges import RewardJudge

        c = j.reward
        judges["reward"] = RewardJudge(c.model, device=c.device, dtype=c.dtype, label_index=c.label_index,
                                       trust_remote_code=c.trust_remote_code, max_length=c.max_length)
    return judges


class BestOfNStage(data.RowStage):
    """N sampled base answers per turn; the selection judge keeps the best (per turn, in order). A turn whose
    conversation does not fit the base model's context window (`Drafter.too_long`), or whose N answers are cut
    off by the row's time budget (`row_timeout_s`), makes the row an error row with the reason."""

    name = "best_of_n stage"
    schema = BON_SCHEMA

    def __init__(self, base: DraftCfg, bon: BestOfNCfg, judges: JudgesCfg, threads: int):
        import torch

        from pipeline.decoding.drafting import Drafter
        from pipeline.models import load_model

        torch.set_num_threads(threads)
        lm = load_model(base.model, dtype=base.dtype, device=base.device, trust_remote_code=base.trust_remote_code)
        self.drafter, self.n, self.kind = Drafter(base.sampling, lm=lm), bon.n, bon.judge
        self.row_timeout_s = base.row_timeout_s
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

    def process(self, rows: list[dict]) -> list[dict]:
        from pipeline.records import conversation

        for r in rows:
            t0, picked, refs = time.perf_counter(), [], r["references"]
            for k in range(len(r["turns"])):
                conv = conversation(r, k, picked)
                outs = self.drafter.answer([conv] * self.n, seed_key=f"{r['id']}#{k}", max_time=self.time_budget(1))
                bad = next((o for o in outs if isinstance(o, Exception)), None)
                if bad is not None:
                    r["error"] = f"{self.name}: turn {k + 1}: {type(bad).__name__}: {bad}"[:1000]
                    break
                cands = [a for a, _, _ in outs]
                picked.append(cands[self._pick(conv, cands, refs[k] if k < len(refs) else "")])
            else:
                r["bon_turns"], r["bon_s"] = picked, time.perf_counter() - t0
        return rows


class MethodStage(data.RowStage):
    """Runs every aligner method on a batch of prompts and emits one long row per (prompt, method)."""

    name = "method stage"
    schema = LONG_SCHEMA

    def __init__(self, aligner: AlignerCfg, methods: list[str], benchmark: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.methods, self.benchmark = methods, benchmark
        self.on_vllm = set(vllm_methods(aligner, methods))  # refined before this stage (their results are columns)
        need = [m for m in methods if m in ALIGNER_METHODS and m not in self.on_vllm]
        lm = load_aligner(aligner) if need else None
        self.refiners = {m: make_refiner(lm, aligner, *ALIGNER_METHODS[m]) for m in need}
        self.row_timeout_s = in_process(aligner).row_timeout_s

    def __call__(self, batch: pa.Table) -> pa.Table:  # one input row -> one output row per method, in order
        rows = batch.to_pylist()
        good = [r for r in rows if not r["error"]]
        per_method = {m: self._refined(m, good) for m in self.methods if m in ALIGNER_METHODS} if good else {}
        out, i = [], -1
        for r in rows:
            if r["error"]:
                out += [self._row(r, m) for m in self.methods]
                continue
            i += 1
            for m in self.methods:
                if m == "draft":
                    out.append(self._row(r, m, r["drafts"], r["draft_s"]))
                elif m == "best_of_n":
                    out.append(self._row(r, m, r.get("bon_turns") or [], r.get("bon_s") or 0.0))
                elif isinstance(per_method[m][i], str):
                    out.append(self._row(dict(r, error=per_method[m][i]), m, [], r["draft_s"]))
                else:
                    res = per_method[m][i]
                    out.append(self._row(r, m, [x.text for x in res], r["draft_s"], sum(x.wall_s for x in res), res))
        keys = [k for k in blocks.KEY_NAMES if k in batch.column_names]
        return pa.Table.from_pylist(out, schema=blocks.keyed(self.schema) if keys else self.schema)

    def _refined(self, m: str, rows: list[dict]) -> list:
        """Per row, its results with method m, or the reason it failed (a failing row fails alone)."""
        if m in self.on_vllm:
            return [f"{m}: {r[f'vllm_{m}_error']}" if r.get(f"vllm_{m}_error") else
                    vllm_stages.as_results(r[f"vllm_{m}"]) for r in rows]
        try:
            return [res if isinstance(res, list) else f"{m}: {res}"
                    for res in refine_turns(self.refiners[m], rows, self.row_timeout_s)]
        except Exception:  # noqa: BLE001 - isolate the row that breaks the batch
            out = []
            for r in rows:
                try:
                    res = refine_turns(self.refiners[m], [r], self.row_timeout_s)[0]
                    out.append(res if isinstance(res, list) else f"{m}: {res}")
                except Exception as e:  # noqa: BLE001
                    out.append(f"{m}: {type(e).__name__}: {e}"[:1000])
            return out

    def _row(self, r: dict, method: str, answers=(), draft_s: float = 0.0, refine_s: float = 0.0, results=()) -> dict:
        refs, turns, meta = r["references"], r["turns"], r["meta"] or {}
        answers, new = list(answers), sum(x.new_tokens for x in results)
        jacobi = bool(results) and all(x.jacobi for x in results)  # the engine's own statistics only (LONG_SCHEMA)
        passes = sum(x.passes for x in results) if jacobi else None
        generated = sum(x.generated_tokens or 0 for x in results) if results and not jacobi else None
        return {"id": r["id"], "benchmark": self.benchmark, "category": meta.get("category") or meta.get("dataset") or "",
                "method": method, "prompt": turns[0] if turns else "", "answer": answers[0] if answers else "",
                "answer_turns": answers, "turns": turns, "history": r["history"], "meta": meta,
                "reference": refs[0] if refs else "", "reference_turns": refs,
                "answer_words": len(answers[0].split()) if answers else 0,
                "reference_words": len(refs[0].split()) if refs else 0, "draft_s": draft_s or 0.0,
                "refine_s": refine_s, "total_s": (draft_s or 0.0) + refine_s, "passes": passes, "new_tokens": new,
                "tokens_per_pass": (new / passes if passes else 0.0) if jacobi else None,
                "converged": all(x.converged for x in results) if jacobi else None, "generated_tokens": generated,
                "error": r["error"], **{k: r[k] for k in blocks.KEY_NAMES if k in r}}


class JudgeStage(data.RowStage):
    """Adds the judges' columns to long rows: offline_sim, llm_score (+ llm_score_turns), llm_pref, rm_score,
    rm_pref, and judge_notes (statuses and the raw text of every verdict that could not be parsed)."""

    name = "judge stage"
    schema = RESULT_SCHEMA

    def __init__(self, judges: JudgesCfg, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.cfg, self.judges = judges, make_judges(judges)

    def passthrough(self, row: dict) -> dict:
        return dict(row, llm_score_turns=[], judge_notes=[])

    def _llm(self, r: dict) -> dict:
        judge, c, res = self.judges["llm"], self.cfg.llm, {"judge_notes": []}
        if c.grade:
            vs = judge.grade(r["turns"], r["answer_turns"], r["reference_turns"], r["category"])
            res["llm_score"] = sum(v.number for v in vs) / len(vs) if vs else math.nan
            res["llm_score_turns"] = [v.number if v.status == "ok" else None for v in vs]
            res["judge_notes"] += [f"llm grade turn {k + 1}: {v.status}: {v.raw[-300:]}"
                                   for k, v in enumerate(vs) if v.status != "ok"]
        if c.pairwise and r["reference"]:
            v = judge.compare(r["prompt"], r["answer"], r["reference"])
            res["llm_pref"] = v.number
            if v.status != "ok":
                res["judge_notes"].append(f"llm pair: {v.status}: {v.raw[-300:]}")
        return res

    def process(self, rows: list[dict]) -> list[dict]:
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.records import conversation

        for r in rows:
            r.update({c: math.nan for c in JUDGE_COLUMNS}, llm_score_turns=[], judge_notes=[])
        if "offline" in self.judges:
            for r, v in zip(rows, self.judges["offline"].score([r["answer"] for r in rows],
                                                               [r["reference"] for r in rows])):
                r["offline_sim"] = v.number
        if "reward" in self.judges:
            for r in rows:
                score, pref = self.judges["reward"].score(conversation(r, 0, []), r["answer"], r["reference"] or None)
                r["rm_score"], r["rm_pref"] = score.number, pref.number
                if score.status != "ok":
                    r["judge_notes"].append(f"reward: {score.status}: {score.raw}")
        if "llm" in self.judges:
            with ThreadPoolExecutor(self.cfg.llm.parallel_requests) as pool:
                for r, o in zip(rows, pool.map(self._llm, rows)):
                    r["judge_notes"] += o.pop("judge_notes")
                    r.update(o)
        return rows


# ---- finalize --------------------------------------------------------------------------------------------
NOTES = {
    "offline": "The offline judge measures how close an answer is to the reference answer in a small embedding "
               "space (all-MiniLM-L6-v2), not quality. On 8 models' AlpacaEval answers it agrees with GPT-4-turbo's "
               "ordering about as often as answer length alone does (benchmarks/validate_offline_judge.py): read it "
               "next to the length-only and length-controlled rows.",
    "given_drafts": "Drafts came with the input, so the draft latency was not measured here (draft_s = 0); total_s "
                    "is the aligner's time only.",
}


def in_process(aligner: AlignerCfg):
    """The aligner section of the method stage, an actor that runs the HF engines: the section itself, or for an
    aligner on vLLM the same model on the fast engine (its actor pool at the defaults)."""
    return aligner if aligner.engine != "vllm" else as_engine(aligner, "fast")


def vllm_methods(aligner: AlignerCfg, methods: list[str]) -> list[str]:
    """The methods that run on vLLM engines (`vllm_stages.refine`, one pass each): refine and in_context when the
    aligner's engine is vllm."""
    return [m for m in methods if aligner.engine == "vllm" and m in ALIGNER_METHODS and ALIGNER_METHODS[m][0] is None]


ERROR_COLUMNS = ["id", "method", "error", "prompt"]
# what the statistics and the report read of the rows (the list columns stay in the files)
STAT_COLUMNS = [f.name for f in RESULT_SCHEMA if not pa.types.is_list(f.type) and f.name not in ("meta", "error")]


def export(cfg: EvaluateConfig, out: str) -> None:
    """results.parquet, errors.jsonl and the per-method answer exports, streamed from the block files."""
    rows, errors = storage.join(out, "rows"), storage.join(out, "errors")
    writers = [exports.table_writer(storage.join(out, "results.parquet"), RESULT_SCHEMA.remove(
        RESULT_SCHEMA.get_field_index("error")))]
    if cfg.output.exports:
        for k in ("fastchat", "alpaca_eval"):
            storage.make_dir(storage.join(out, "exports", k))
        for m in cfg.methods:
            name = f"{cfg.output.model_id}-{m}"
            writers += [exports.only("method", m, exports.fastchat_writer(
                            storage.join(out, "exports", "fastchat", f"{m}.jsonl"), name, "answer_turns")),
                        exports.only("method", m, exports.alpaca_eval_writer(
                            storage.join(out, "exports", "alpaca_eval", f"{m}.json"), name, "answer"))]
    exports.stream(rows, writers)
    exports.stream(errors, [exports.table_writer(storage.join(out, "errors.jsonl"), None)])


def results_frame(out: str):
    """Every result row's numbers and labels (and answer texts, for the report), ok rows and error rows, as one
    DataFrame in the blocks' order: what the statistics need in one place."""
    import pandas as pd

    ok = [t for t in exports.tables(storage.join(out, "rows"), STAT_COLUMNS)]
    bad = [t for t in exports.tables(storage.join(out, "errors"), ERROR_COLUMNS)]
    frames = [t.to_pandas() for t in ok] + [t.to_pandas() for t in bad]
    df = pd.concat(frames, ignore_index=True) if frames else pa.schema(
        [RESULT_SCHEMA.field(c) for c in STAT_COLUMNS + ["error"]]).empty_table().to_pandas()
    if "error" not in df.columns:
        df["error"] = ""
    df["error"] = df["error"].fillna("")
    return df


def finalize(cfg: EvaluateConfig, out: str, totals: dict, started: float) -> dict:
    from pipeline.evaluation.summary import summarize

    export(cfg, out)
    df = results_frame(out)
    drafted = bool(len(df)) and bool((df["draft_s"].fillna(0) > 0).any())  # the job drafted: draft latency measured
    judges = [k for k in ("offline", "llm", "reward") if getattr(cfg.judges, k).enabled]
    ok = df[df["error"] == ""]
    summary = {"benchmark": cfg.benchmark.name, "n_prompts": int(ok["id"].nunique()) if len(ok) else 0,
               "rows_in": totals["rows_in"], "error_rows": totals.get("error_rows", 0), "blocks": totals["blocks"],
               "judges": judges, "methods_run": list(cfg.methods),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "wall_s": round(time.perf_counter() - started, 1),
               "notes": ([NOTES["offline"]] if "offline" in judges else []) + ([] if drafted else [NOTES["given_drafts"]]),
               "outputs": {k: storage.display(storage.join(out, k)) for k in ("rows", "errors", "results.parquet",
                                                                               "errors.jsonl")},
               "config": cfg.model_dump(mode="json"), **summarize(df, cfg.stats.baseline, cfg.stats.n_boot, cfg.stats.seed)}
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2, default=float))
    if cfg.output.report:
        from pipeline.evaluation.report import write_report

        with storage.local_dir(out) as local:
            write_report(ok.reset_index(drop=True), summary, Path(local))
    return summary


def print_table(summary: dict) -> None:
    """The summary per method; tok/pass (Jacobi methods) and gen tok (tokens a greedy-continuation engine
    generated per prompt) show "-" for the methods whose engine does not compute them."""
    metrics = list(summary["metrics"])[:4]
    opt = lambda v, w, f: f"{v:>{w}{f}}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    print(f"{'method':<18}" + "".join(f"{m:>22}" for m in metrics) + f"{'words':>7}{'total_s':>9}{'tok/pass':>9}"
          f"{'gen tok':>9}")
    for m, r in summary["methods"].items():
        cells = "".join(f"{v['mean']:>8.3f} [{v['lo']:.3f},{v['hi']:.3f}]" if (v := r["metrics"].get(k)) else f"{'-':>22}"
                        for k in metrics)
        print(f"{m:<18}{cells}{r['mean_words']:>7.0f}{r['latency']['total_s']:>9.2f}"
              f"{opt(r['jacobi']['tokens_per_pass'], 9, '.2f')}{opt(r.get('mean_generated_tokens'), 9, '.1f')}")


# ---- main ------------------------------------------------------------------------------------------------
def run_stages(cfg: EvaluateConfig, todo, info: blocks.InputInfo, out: str) -> dict:
    """draft (rows without drafts) -> best_of_n -> the methods on vLLM -> the method stage -> the judges -> the
    blocks written; returns the sink's totals (file -> stats)."""
    threads, turns, drafted = cfg.ray.torch_threads, info.turns, info.to_draft > 0
    pools = {"base": cfg.base} if drafted else {}
    if "best_of_n" in cfg.methods:
        pools["best_of_n"] = as_engine(cfg.base, "hf", concurrency=1)  # an HF actor
    pools |= {"aligner": in_process(cfg.aligner),  # the method stage: an actor
              "judges": data.PoolCfg(batch_size=cfg.judges.batch_size, num_cpus=cfg.judges.num_cpus)}
    methods = vllm_methods(cfg.aligner, list(cfg.methods))
    for m in methods:  # the methods on vLLM: one engine pool, shared (and with the base if the same model)
        pools[f"aligner ({m})"] = cfg.aligner
    data.preflight(pools, turns)
    on_vllm = ([cfg.base] if drafted and cfg.base.engine == "vllm" else []) + ([cfg.aligner] if methods else [])
    with vllm_stages.Engines("evaluate", on_vllm) as engines:
        ds = todo.map_batches(_draft_s, batch_format="pyarrow", num_cpus=blocks.READ_CPUS)
        schema = blocks.keyed(INPUT_SCHEMA)
        if drafted and cfg.base.engine == "vllm":
            ds = vllm_stages.draft(ds, engines, cfg.base, turns, schema)
        elif drafted:
            ds = data.map_stage(ds, DraftStage, cfg.base, base=cfg.base, schema=INPUT_SCHEMA, threads=threads)
        if "best_of_n" in cfg.methods:
            ds = data.map_stage(ds, BestOfNStage, pools["best_of_n"], base=cfg.base, bon=cfg.best_of_n,
                                judges=cfg.judges, threads=threads)
            schema = blocks.keyed(BON_SCHEMA)
        for m in methods:  # refine / in_context on vLLM engines: their results are columns
            a = cfg.aligner.model_copy(update={"in_context": ALIGNER_METHODS[m][1]})
            ds = vllm_stages.refine(ds, engines, a, turns, schema, column=f"vllm_{m}", fail_row=False)
            schema = vllm_stages.refined_schema(schema, f"vllm_{m}", fail_row=False)
        ds = data.map_stage(ds, MethodStage, pools["aligner"], aligner=cfg.aligner, methods=list(cfg.methods),
                            benchmark=cfg.benchmark.name, threads=threads)
        ds = data.map_stage(ds, JudgeStage, pools["judges"], judges=cfg.judges, threads=threads)
        sink = blocks.BlockSink(storage.join(out, "rows"), storage.join(out, "errors"),
                                RESULT_SCHEMA.remove(RESULT_SCHEMA.get_field_index("error")), ERROR_COLUMNS, _no_stats)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": data.WRITE_CPUS})
    return sink.totals


def _no_stats(table: pa.Table) -> dict:
    return {}


def _draft_s(batch: pa.Table) -> pa.Table:
    return batch.append_column("draft_s", pa.array([0.0] * batch.num_rows))


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfg = load_config(EvaluateConfig, "conf/evaluate.yaml", argv)
    out = expand(cfg.output.path)
    data.start_data_job("evaluate", cfg, out)

    b = cfg.benchmark
    side = blocks.lookup_table(side_tables, b.drafts_path, b.references_path) if (
        b.drafts_path or b.references_path) else None
    parser = blocks.Parser(lambda rec, fid, side: normalize_row(rec, fid, side, b), error_row, ROW_SCHEMA,
                           cfg.output.rows_per_block, lookup=side, skips=b.id_mod is not None)
    job = blocks.BlockJob("evaluate", out, data.input_files(b.path, DEMO_EVAL), data.input_root(b.path, DEMO_EVAL),
                          parser, b.limit, per_row=len(cfg.methods), key=("id", "method"),
                          settings={"methods": list(cfg.methods)})
    todo, info = job.todo()
    print(f"[evaluate] methods {list(cfg.methods)}", flush=True)
    totals = run_stages(cfg, todo, info, out) if info.rows else {}
    totals = job.finish(totals, ["id"], _no_stats)
    summary = finalize(cfg, out, totals, started)
    print_table(summary)
    print(f"[evaluate] results: {storage.display(storage.join(out, 'results.parquet'))}\n"
          f"[evaluate] summary: {storage.display(storage.join(out, 'summary.json'))}"
          + (f"\n[evaluate] report:  {storage.display(storage.join(out, 'report.html'))}" if cfg.output.report else ""),
          flush=True)
    return summary


if __name__ == "__main__":
    run_job("evaluate")
