"""Ranked answer states for consistency training of the aligner, with Ray Data.

    python -m jobs.build_states                                    # ../shared/data AlpacaEval ranked answers
    python -m jobs.build_states input.path=answers.jsonl.gz output.path=outputs/states rank.target=reference
    python -m jobs.build_states --help                             # every key, its default and what it does
    ray job submit --working-dir . -- python -m jobs.build_states ray.address=auto input.path=/data/x.parquet \
        score.kind=reward_model score.reward_model.model=/models/rm score.reward_model.num_gpus=1

read -> normalize (-> merge a flat layout by prompt id) -> [a draft stage per configured base model]
-> filters (empty, repetition, over-length in the aligner's tokens; the score column is read here)
-> [reward-model or judge actor pool] -> rank into states worst..best + split -> [Jacobi trajectories] -> each
block written by the workers (`jobs.common.blocks`: rows stream from storage to storage; `output.path` may be a
local folder or a URI). In `output.path`:
  rows/, errors/        Parquet folders, a file per block: one row per prompt (`STATES_SCHEMA`: states worst..best,
                        target last, its split), and every row that could not become an example, with the reason
  train.parquet, dev.parquet, heldout.parquet, errors.jsonl   the same as single files per split (the export step,
                        `output.single_file`; `train_aligner` reads either)
  summary.json, config.yaml
A killed run, rerun with the same output path, redoes only the blocks not yet written (with the flat layout, the
blocks are hash partitions of the prompt id).
`pipeline/training/states.py` holds the logic; this file wires it into Ray Data.
"""
from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pyarrow as pa
from pydantic import Field

from jobs.common import blocks, data, exports, storage
from jobs.common.config import (DataRayCfg, EndpointCfg, HFDraftCfg, ModelCfg, OpenAIDraftCfg, PoolCfg, Section,
                                StageCfg, VllmDraftCfg, by_engine, expand, load_config)
from jobs.common.runtime import run_job
from jobs.common.stages import make_drafter
from pipeline.decoding.settings import RefineSettings, setting
from pipeline.models import is_default_model
from pipeline.training.states import (ROW_SCHEMA, STATES_SCHEMA, TARGETS, DROP_REASONS, column_scores, error_row,
                                      filter_answers, merge_flat, normalize_record, ranked_row, split_of)

SPLITS = ("train", "dev", "heldout")
TASK_CPUS = 0.25  # per filter / rank task, so that they fit in the CPUs `data.preflight` keeps free next to the pools


# ---- config schema ---------------------------------------------------------------------------------------
class InputCfg(Section):
    """Prompts with their answers: a JSONL / JSON / Parquet file (.gz too) or a folder of them."""
    path: str = Field("../shared/data/alpaca_eval/ranked_responses.jsonl.gz", description="a file or a folder")
    layout: Literal["nested", "flat"] = Field(
        "nested", description="nested: one record per prompt with a list of answers | flat: one record per "
                              "(prompt id, prompt, answer, score), merged by id")
    id_field: str = Field("id", description="prompt id: the split rule and the output key (unique when nested)")
    prompt_field: str = Field("instruction", description="a string, or a list of {role, content} messages "
                                                         "ending with the user's turn")
    answers_field: Optional[str] = Field("responses", description="nested: the list of answer objects; "
                                                                  "null = prompts only (bases answer them)")
    text_field: str = Field("output", description="answer text inside an answer object (flat: in the record)")
    score_field: Optional[str] = Field("win_prob_vs_reference", description="the answer's score (a number or a "
                                                                            "string holding one); score.kind=column")
    generator_field: Optional[str] = Field("generator", description="who wrote the answer; null = answer0, ...")
    reference_field: Optional[str] = Field("reference_output", description="the reference answer (the target "
                                                                           "when rank.target=reference)")
    limit: Optional[int] = Field(None, ge=1, description="first N records only (flat layout: N answer records)")

    def check(self) -> list[str]:
        files = data.input_files(self.path)
        if not files:
            return [f"path: no {'/'.join(data.INPUT_EXTS)} input found at {self.path!r}"]
        if any(not f.endswith(data.INPUT_EXTS) for f in files):
            return [f"path: {self.path!r} is not one of {', '.join(data.INPUT_EXTS)}"]
        return []

    def fields(self) -> dict:
        """The record's field names, as `normalize_record` takes them."""
        return {"id": self.id_field, "prompt": self.prompt_field, "answers": self.answers_field,
                "text": self.text_field, "score": self.score_field, "generator": self.generator_field,
                "reference": self.reference_field}


class OutputCfg(Section):
    path: str = Field("outputs/build_states", description="a local folder or a URI (s3://, gs://, ...): rows/, "
                                                          "errors/, summary.json")
    single_file: bool = Field(True, description="also export rows/ and errors/ as train/dev/heldout.parquet and "
                                                "errors.jsonl (streamed through the driver: for benchmark-sized sets)")


class BaseKeys(Section):
    """What a base model of this job adds to a draft section: it samples with the job's `seed`, its generator name
    and the row id, so reruns draw the same answers."""
    name: Optional[str] = Field(None, description="generator name in the output; null = the model's folder name")
    num_answers: int = Field(1, ge=1, description='answers per prompt (generators "name#0", "name#1", ... when > 1)')

    def check(self) -> list[str]:
        problems = super().check()
        if self.sampling.seed != 0:
            problems.append("sampling.seed: the bases sample with the job's seed (set seed=...)")
        return problems

    def generator(self) -> str:
        return self.name or Path(str(self.model).rstrip("/")).name or "base"


class BaseCfg(BaseKeys, HFDraftCfg):
    """A base model on transformers `generate` in the job's actors (the default engine here)."""


class OpenAIStatesBaseCfg(BaseKeys, OpenAIDraftCfg):
    """A base model at an OpenAI-compatible endpoint."""


class VllmStatesBaseCfg(BaseKeys, VllmDraftCfg):
    """Not yet: vLLM (Ray Data LLM) returns one sample per request."""

    def check(self) -> list[str]:
        return super().check() + [
            "engine: vllm does not draft the bases' answers yet (num_answers samples per prompt; Ray Data LLM "
            "returns one sample per request); use engine=hf, or serve the base with vLLM and use engine=openai"]


StatesBaseCfg = by_engine(BaseCfg, OpenAIStatesBaseCfg, VllmStatesBaseCfg, default="hf")


class RewardModelCfg(StageCfg):
    model: Optional[str] = Field(None, description="HF folder or hub id of an AutoModelForSequenceClassification "
                                                   "(e.g. an ArmoRM-style reward model)")
    label_index: int = Field(0, ge=0, description="which output logit is the reward (0 for num_labels=1 models)")
    max_length: int = Field(4096, ge=8, description="longer (prompt + answer) sequences are not scored: the "
                                                     "answer is dropped as score_error with its length")


class JudgeCfg(EndpointCfg, PoolCfg):
    """An LLM judge at an OpenAI-compatible endpoint that rates each answer 1-10."""
    model: Optional[str] = Field(None, description="the judge's model name at the endpoint")
    max_tokens: int = Field(512, ge=1, description='the verdict\'s length cap (it explains, then writes '
                                                    '"Rating: [[N]]")')
    template: Optional[str] = Field(None, description="prompt with {question} and {answer}; null = the built-in "
                                                      "1-10 rating prompt")
    num_cpus: float = Field(0.25, ge=0, description="per actor (it mostly waits for the endpoint)")

    def check(self) -> list[str]:
        from pipeline.scoring.verdicts import check_judge_template

        problems = PoolCfg.check(self)
        if self.template is not None:
            try:
                check_judge_template(self.template)
            except ValueError as e:
                problems.append(f"template: {e}")
        return problems


class ScoreCfg(Section):
    kind: Literal["column", "reward_model", "judge"] = Field(
        "column", description="column: input.score_field | reward_model: a HF sequence classifier | judge: an LLM")
    reward_model: RewardModelCfg = Field(default_factory=RewardModelCfg)
    judge: JudgeCfg = Field(default_factory=JudgeCfg)

    def check(self) -> list[str]:
        if self.kind == "reward_model" and is_default_model(self.reward_model.model):
            return ["reward_model.model: set a HF sequence-classification model (folder or hub id)"]
        if self.kind == "judge":
            return [f"judge: {p}" for p in self.judge.endpoint(self.judge.model or "").validate()]
        return []


class RankCfg(Section):
    target: Literal[TARGETS] = Field("best", description="best: y(T) = the best-scored answer | reference: y(T) = "
                                                         "the reference, every answer ranked below it")
    min_states: int = Field(2, ge=1, description="rows with fewer states left (target included) go to errors.jsonl")


class FiltersCfg(Section):
    """An answer failing a filter is dropped from its row and counted in summary.json."""
    tokenizer: Optional[str] = Field("default", description="the aligner's tokenizer (only it is loaded): default / "
                                                            "HF folder / .gguf / hub id")
    trust_remote_code: bool = False
    max_tokens: Optional[int] = Field(2048, ge=2, description="prompt (chat template) + answer + EOS must fit, in "
                                                              "aligner tokens; null = no length filter")
    repeat_ngram: int = Field(4, ge=1, description="degenerate repetition: the share of repeated word n-grams ...")
    max_repeat_fraction: Optional[float] = Field(0.5, ge=0, lt=1, description="... above this drops the answer "
                                                                              "(prose < 0.3); null = no filter")

    def check(self) -> list[str]:
        if self.max_tokens is None:
            return []
        if not self.tokenizer:
            return ["max_tokens: needs filters.tokenizer (or max_tokens=null for no length filter)"]
        return [p.replace("model:", "tokenizer:", 1) for p in ModelCfg(model=self.tokenizer).check()]


class SplitCfg(Section):
    """By prompt id, so held-out prompts never enter training."""
    heldout_mod: Optional[int] = Field(4, ge=1, description="heldout when id % heldout_mod == heldout_rem "
                                                            "(non-integer ids: a hash); null = none held out")
    heldout_rem: int = Field(0, ge=0, description="AlpacaEval rule (../shared/data/README.md): id % 4 == 0")
    dev_fraction: float = Field(0.0, ge=0, lt=1, description="share of the other ids put into dev (a hash of the "
                                                             "seed and the id)")

    def check(self) -> list[str]:
        if self.heldout_mod is not None and self.heldout_rem >= self.heldout_mod:
            return [f"heldout_rem: must be < heldout_mod ({self.heldout_mod}), got {self.heldout_rem}"]
        return []


@dataclass
class TrajectoryRefine(RefineSettings):
    """`trajectory.refine`: the Jacobi settings trajectories are recorded with, as defaults (a dataclass of its
    own, not a default instance, so that setting one key keeps the others' defaults). Only block_size,
    max_iter, max_new_tokens and reserve_tokens can change: the rest give the published loop's states (the
    whole block every pass, no re-seeding), and the job's `seed` is the seed."""
    block_size: int = setting(32, "draft tokens per Jacobi block of a recorded trajectory")
    max_iter: int = setting(64, "passes per block before the state is accepted as is")
    reserve_tokens: int = setting(0, "draft tokens held fixed (r); trajectories start from the whole answer")
    window: int | None = setting(None, "fixed: the whole block every pass (the published loop's states)")
    adaptive_window: bool = setting(False, "fixed: off")
    reseed: bool = setting(False, "fixed: off (no re-seeding)")


class TrajectoryCfg(StageCfg):
    """CLLM-style Jacobi trajectories (column `trajectories`): the current aligner runs the Jacobi loop from
    states below the target and the states of its passes are kept (text and token ids), batched in the fast
    engine with settings that give the published loop's states."""
    enabled: bool = False
    splits: list[Literal[SPLITS]] = Field(default_factory=lambda: ["train"], min_length=1,
                                          description="rows of these splits get trajectories")
    from_states: Optional[int] = Field(None, ge=1, description="worse states per prompt to start from (a seeded "
                                                               "pick); null = every worse state")
    in_context: bool = Field(False, description="the aligner's prompt also shows the answer (correction template)")
    refine: TrajectoryRefine = Field(default_factory=TrajectoryRefine)
    max_states: int = Field(8, ge=2, description="states kept per trajectory, evenly spaced; the answer's block "
                                                 "and the fixed point always")

    def check(self) -> list[str]:
        if not self.enabled:
            return []
        problems = StageCfg.check(self)  # refine's own problems are reported as trajectory.refine: ...
        fixed = TrajectoryRefine()
        problems += [f"refine.{k}: fixed for trajectories (they follow the published loop)"
                     for k in ("window", "adaptive_window", "reseed", "reseed_ngram")
                     if getattr(self.refine, k) != getattr(fixed, k)]
        if self.refine.seed != fixed.seed:
            problems.append("refine.seed: trajectories use the job's seed (set seed=...)")
        if not problems and not self.refine.problems() and (why := self.fast_engine_problem()):
            problems.append(f"model: {why} (trajectories are recorded with the fast engine)")
        return problems

    def fast_engine_problem(self) -> str | None:
        """Why the fast engine cannot run the model, read from its config; None also when the config cannot be
        read here (e.g. a hub id offline: the actor reports it) and for the embedded default, a Llama with full
        attention (resolving it here would convert its GGUF in the driver)."""
        if is_default_model(self.model):
            return None
        from transformers import AutoConfig

        from pipeline.decoding.engine import unsupported_attention
        from pipeline.models import resolve_model_path

        try:
            path, gguf = resolve_model_path(expand(self.model))
            config = AutoConfig.from_pretrained(path, gguf_file=gguf, trust_remote_code=self.trust_remote_code)
        except Exception:  # noqa: BLE001 - not ours to report here
            return None
        return unsupported_attention(config)


class RayCfg(DataRayCfg):
    rows_per_block: int = Field(32, ge=1, description="input rows per block: the unit the actor pools work on, a "
                                                      "file of the output, and what a killed job redoes")


class BuildStatesConfig(Section):
    input: InputCfg = Field(default_factory=InputCfg)
    output: OutputCfg = Field(default_factory=OutputCfg)
    bases: list[StatesBaseCfg] = Field(default_factory=list, description="base models whose answers join the "
                                       "candidates: draft sections (engine hf | openai, model, sampling.*, endpoint and "
                                       "pool keys) + name, num_answers")
    score: ScoreCfg = Field(default_factory=ScoreCfg)
    rank: RankCfg = Field(default_factory=RankCfg)
    filters: FiltersCfg = Field(default_factory=FiltersCfg)
    split: SplitCfg = Field(default_factory=SplitCfg)
    trajectory: TrajectoryCfg = Field(default_factory=TrajectoryCfg)
    seed: int = Field(0, description="dev split, tie order among equal scores, base-model sampling, trajectory starts")
    ray: RayCfg = Field(default_factory=RayCfg)
    show_samples: int = Field(1, ge=0, description="rows printed at the end, state by state")

    def check(self) -> list[str]:
        i, kind, problems = self.input, self.score.kind, []
        if i.layout == "nested" and not i.answers_field and not self.bases:
            problems.append("input.answers_field: null and no bases are configured: no answers to rank")
        if kind == "column" and not i.score_field:
            problems.append("score.kind: column needs input.score_field (or use score.kind=reward_model / judge)")
        if kind == "column" and self.bases:
            problems.append("score.kind: column cannot score the answers of bases (they have no score column); "
                            "use score.kind=reward_model or judge")
        if self.rank.target == "reference" and not i.reference_field:
            problems.append("rank.target: reference needs input.reference_field")
        names = [b.generator() for b in self.bases]
        if len(set(names)) != len(names):
            problems.append(f"bases: generator names must be unique, got {names}; set bases.N.name")
        return problems

    def pools(self) -> dict[str, PoolCfg]:
        """The actor pools this run starts, by config key."""
        pools: dict[str, PoolCfg] = {f"bases.{n}": b for n, b in enumerate(self.bases)}
        if self.score.kind != "column":
            pools[f"score.{self.score.kind}"] = getattr(self.score, self.score.kind)
        if self.trajectory.enabled:
            pools["trajectory"] = self.trajectory
        return pools


# ---- rows ------------------------------------------------------------------------------------------------
# a ranked row on its way to the parts: the columns of train.parquet and what errors.jsonl / summary.json need
RANKED_SCHEMA = pa.schema(list(STATES_SCHEMA) + [pa.field("error", pa.string()), pa.field("error_kind", pa.string()),
                                                 pa.field("answers_in", pa.int64())])


def task_options(pools: dict[str, PoolCfg]) -> dict:
    """Ray options of the filter and rank tasks: `TASK_CPUS` each, and no more at once than the whole CPUs the
    actor pools leave (a task's worker process loads the tokenizer once; more processes than cores thrash)."""
    import ray

    free = ray.cluster_resources().get("CPU", 1.0) - sum(p.num_cpus * p.concurrency for p in pools.values())
    return {"num_cpus": TASK_CPUS, "compute": ray.data.TaskPoolStrategy(size=max(1, int(free)))}


def input_error(row_id: str, reason: str) -> dict:
    """The error row of a record that cannot be read (named by file and line)."""
    return error_row(row_id, "input", reason)


def merge_flat_rows(rows: list[dict]) -> list[dict]:
    """Flat layout: the rows of each prompt id merged into one (`merge_flat`), in the order the ids first appear."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["id"], []).append(r)
    return [merge_flat(g) for g in groups.values()]


class Stage(data.RowStage):
    """A model stage of this job: a row that fails in it (an error row naming the stage) gets the error kind
    ``stage``, since summary.json counts the error rows by kind."""

    def passthrough(self, row: dict) -> dict:
        return row if row.get("error_kind") else dict(row, error_kind="stage")


class DraftStage(Stage):
    """Adds a base model's answers (`num_answers` per prompt) to every row's candidates. A local model answers
    one prompt per `generate` call (its samples seeded by the job's seed, the generator name and the row id), so
    a row's answers never depend on how Ray Data batched the rows; an answer that could not be drafted is
    dropped as `draft_error`, with the reason."""

    name = "draft stage"
    schema = ROW_SCHEMA

    def __init__(self, base: BaseCfg, seed: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.drafter, self.n, self.generator = make_drafter(base, seed), base.num_answers, base.generator()
        self.row_timeout_s = base.row_timeout_s

    def process(self, rows: list[dict]) -> list[dict]:
        gens = [self.generator] if self.n == 1 else [f"{self.generator}#{k}" for k in range(self.n)]
        for r in rows:
            try:
                outs = self.drafter.answer([r["messages"]] * self.n, seed_key=f"{self.generator}:{r['id']}",
                                           max_time=self.time_budget(1))
            except Exception as e:  # noqa: BLE001 - one failing prompt must not sink the batch
                outs = [e] * self.n
            for g, o in zip(gens, outs):
                bad = isinstance(o, Exception)
                r["answers"].append({"generator": g, "text": "" if bad else o[0], "score": None, "raw_score": None,
                                     "drop": "draft_error" if bad else None,
                                     "detail": f"{self.generator}: {type(o).__name__}: {o}"[:500] if bad else ""})
        return rows


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str, trust_remote_code: bool):
    from pipeline.models import load_tokenizer

    return load_tokenizer(spec, trust_remote_code)


def filter_rows(batch: pa.Table, filters: FiltersCfg, column: bool, target: str) -> pa.Table:
    """Marks every answer that fails a filter (`filter_answers`) and, with score.kind=column (`column`), reads
    the score column. Nothing is removed here: the dropped answers are counted at the end."""
    f = filters
    tok = _tokenizer(f.tokenizer, f.trust_remote_code) if f.max_tokens else None
    rows = batch.to_pylist()
    for r in rows:
        if not r["error"]:
            filter_answers(r, tok, f.max_tokens, f.repeat_ngram, f.max_repeat_fraction, target == "reference")
            if column:
                column_scores(r["answers"])
    return blocks.with_keys(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), batch)


class RewardStage(Stage):
    """Scores every kept answer with a HF reward model (all answers of a prompt in one forward pass); an
    answer longer than the reward model takes (`RewardModel.too_long`: its length and the limit), and the
    answers of a prompt it fails on, are dropped as `score_error`."""

    name = "reward stage"
    schema = ROW_SCHEMA

    def __init__(self, rm: RewardModelCfg, threads: int):
        import torch

        from pipeline.scoring.reward_model import RewardModel

        torch.set_num_threads(threads)
        self.rm = RewardModel(rm.model, device=rm.device, dtype=rm.dtype, trust_remote_code=rm.trust_remote_code,
                              label_index=rm.label_index, max_length=rm.max_length)

    def process(self, rows: list[dict]) -> list[dict]:
        for r in rows:
            todo = [a for a in r["answers"] if not a["drop"]]
            for a, why in zip(todo, self.rm.too_long(r["messages"], [a["text"] for a in todo])):
                if why:
                    a["drop"], a["detail"] = "score_error", f"{self.name}: {why}"[:500]
            todo = [a for a in todo if not a["drop"]]
            try:
                for a, s in zip(todo, self.rm.score(r["messages"], [a["text"] for a in todo])):
                    a["score"] = s
            except Exception as e:  # noqa: BLE001
                for a in todo:
                    a["drop"], a["detail"] = "score_error", f"reward model: {type(e).__name__}: {e}"[:500]
        return rows


class JudgeStage(Stage):
    """Scores every kept answer 1-10 with an OpenAI-compatible judge (parallel requests); an answer whose
    request fails or whose verdict names no rating is dropped as `score_error` (`parse_judge_score` never
    guesses)."""

    name = "judge stage"
    schema = ROW_SCHEMA

    def __init__(self, judge: JudgeCfg):
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.clients import ChatEndpoint
        from pipeline.scoring.verdicts import DEFAULT_JUDGE_TEMPLATE

        self.endpoint = ChatEndpoint(judge.endpoint(judge.model))
        self.template, self.max_tokens = judge.template or DEFAULT_JUDGE_TEMPLATE, judge.max_tokens
        self.pool = ThreadPoolExecutor(judge.parallel_requests)

    def judge(self, messages: list[dict], a: dict) -> None:
        from pipeline.scoring.verdicts import judge_answer

        try:
            a["score"] = judge_answer(self.endpoint, messages, a["text"], self.template, self.max_tokens)
        except Exception as e:  # noqa: BLE001 - endpoint failures and unparsable verdicts alike
            a["drop"], a["detail"] = "score_error", f"judge: {type(e).__name__}: {e}"[:500]

    def process(self, rows: list[dict]) -> list[dict]:
        work = [(r["messages"], a) for r in rows for a in r["answers"] if not a["drop"]]
        list(self.pool.map(lambda x: self.judge(*x), work))
        return rows


def rank_rows(batch: pa.Table, rank: RankCfg, split: SplitCfg, seed: int) -> pa.Table:
    """Every row -> its ranked row (`ranked_row`: states worst..best, or the reason there are none) in its split."""
    s = split
    return blocks.with_keys(pa.Table.from_pylist(
        [ranked_row(r, split_of(r["id"], s.heldout_mod, s.heldout_rem, s.dev_fraction, seed), rank.target,
                    rank.min_states, seed) for r in batch.to_pylist()], schema=RANKED_SCHEMA), batch)


class TrajectoryStage(Stage):
    """CLLM-style Jacobi trajectories: the current aligner runs the Jacobi loop from worse states of the rows
    in `trajectory.splits`; each gives {"from": state index, "states", "state_ids", "fixed_point",
    "fixed_point_ids", "stop", "passes", "converged"} or {"from", "error"} (see
    `pipeline.training.trajectories.jacobi_trajectories`). The whole batch runs in the fast engine; greedy and
    seeded (which states, reserved tokens), so reruns give the same trajectories."""

    name = "trajectory stage"
    schema = RANKED_SCHEMA

    def __init__(self, traj: TrajectoryCfg, seed: int, threads: int):
        import torch

        from pipeline.decoding.refiner import Refiner
        from pipeline.models import load_model
        from pipeline.training.trajectories import trajectory_settings

        torch.set_num_threads(threads)
        lm = load_model(traj.model, dtype=traj.dtype, device=traj.device, trust_remote_code=traj.trust_remote_code)
        r = traj.refine
        settings = trajectory_settings(r.block_size, r.max_iter, r.max_new_tokens, r.reserve_tokens, seed)
        self.refiner = Refiner(lm, settings, mode="fast", in_context=traj.in_context)
        self.traj, self.seed, self.row_timeout_s = traj, seed, traj.row_timeout_s

    def starts(self, row_id: str, n_worse: int) -> list[int]:
        k = self.traj.from_states
        if k is None or k >= n_worse:
            return list(range(n_worse))
        return sorted(random.Random(f"{self.seed}:{row_id}:trajectory").sample(range(n_worse), k))

    def process(self, rows: list[dict]) -> list[dict]:
        from pipeline.decoding.refiner import RefineRequest
        from pipeline.training.trajectories import jacobi_trajectories

        reqs, owner = [], []
        for n, r in enumerate(rows):
            if r["split"] in self.traj.splits:
                for t in self.starts(r["id"], len(r["states"]) - 1):
                    reqs.append(RefineRequest(r["messages"], r["states"][t], key=f"{r['id']}#{t}"))
                    owner.append((n, t))
        trajectories = jacobi_trajectories(self.refiner, reqs, self.traj.max_states, self.time_budget(len(rows)))
        for (n, t), tr in zip(owner, trajectories):
            rows[n]["trajectories"].append({"from": t, **tr})
        return rows


# ---- the summary: per block file, in the write tasks (`blocks.BlockSink`), added up over the output --------------
ROWS_SCHEMA = STATES_SCHEMA.append(pa.field("answers_in", pa.int64()))  # what rows/ holds: train.parquet + a count
ERROR_COLUMNS = ["id", "error_kind", "error", "split", "prompt", "answers_in", "dropped"]


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def row_stats(t: pa.Table) -> dict:
    """What summary.json adds up of a block file's rows."""
    rows = t.select([c for c in ("split", "num_states", "answers_in", "dropped") if c in t.column_names]).to_pylist()
    out = {"rows_by_split": _counts(r["split"] for r in rows), "answers_in": sum(r["answers_in"] for r in rows),
           "answers_dropped": _counts(d["reason"] for r in rows for d in r["dropped"] or []),
           "states": sum(r["num_states"] for r in rows), "states_histogram": _counts(r["num_states"] for r in rows)}
    if "trajectories" in t.column_names:
        trs = [x for ts in t.column("trajectories").to_pylist() for x in ts]
        good = [x for x in trs if not x["error"]]
        out["trajectories"] = {"count": len(trs), "errors": len(trs) - len(good), "ok": len(good),
                               "states": sum(len(x["states"]) for x in good), "passes": sum(x["passes"] for x in good),
                               "converged": sum(bool(x["converged"]) for x in good)}
    return out


def error_stats(t: pa.Table) -> dict:
    """What summary.json adds up of a block file's error rows."""
    rows = t.select(["error_kind", "split", "answers_in", "dropped"]).to_pylist()
    return {"error_rows_by_kind": _counts(r["error_kind"] for r in rows),
            "error_rows_by_split": _counts(r["split"] for r in rows),
            "answers_in": sum(r["answers_in"] or 0 for r in rows),
            "answers_dropped": _counts(d["reason"] for r in rows for d in r["dropped"] or [])}


def trajectory_stats(t: dict) -> dict:
    n = t.get("ok") or 1
    return {"count": t.get("count", 0), "errors": t.get("errors", 0), "mean_states": round(t.get("states", 0) / n, 3),
            "mean_passes": round(t.get("passes", 0) / n, 3), "converged_fraction": round(t.get("converged", 0) / n, 4)}


def summarize(cfg: BuildStatesConfig, totals: dict, wall: float, out: str, files: dict) -> dict:
    ok = totals.get("rows_out", 0)
    hist = {int(k): v for k, v in (totals.get("states_histogram") or {}).items()}
    as_states = totals.get("states", 0) - (ok if cfg.rank.target == "reference" else 0)
    dropped = dict.fromkeys(DROP_REASONS, 0) | (totals.get("answers_dropped") or {})
    answers_in = totals.get("answers_in", 0)
    return {
        "rows_in": totals["rows_in"], "rows_out": ok, "error_rows": totals.get("error_rows", 0),
        "rows_by_split": {s: (totals.get("rows_by_split") or {}).get(s, 0) for s in SPLITS},
        "error_rows_by_kind": dict(sorted((totals.get("error_rows_by_kind") or {}).items())),
        "error_rows_by_split": {s: (totals.get("error_rows_by_split") or {}).get(s, 0) for s in SPLITS},
        "answers_in": answers_in, "answers_as_states": as_states, "answers_dropped": dropped,
        "answers_in_error_rows_not_dropped": answers_in - as_states - sum(dropped.values()),
        "states_per_row": ({"mean": round(totals.get("states", 0) / ok, 3), "min": min(hist), "max": max(hist),
                            "histogram": dict(sorted(hist.items()))} if ok else {}),
        "target": cfg.rank.target, "score": cfg.score.kind, "seed": cfg.seed,
        **({"trajectories": trajectory_stats(totals.get("trajectories") or {})} if cfg.trajectory.enabled else {}),
        "blocks": totals["blocks"], "duplicate_ids": totals["duplicate_ids"],
        "wall_s": round(wall, 2), "rows_per_s": round(totals["rows_in"] / wall, 3) if wall > 0 else 0.0,
        "outputs": {"rows": storage.display(storage.join(out, "rows")),
                    "errors": storage.display(storage.join(out, "errors"))} | {k: storage.display(v)
                                                                               for k, v in files.items()},
    }


def export(cfg: BuildStatesConfig, out: str) -> dict[str, str]:
    """train/dev/heldout.parquet and errors.jsonl from the block files (streamed), if `output.single_file`."""
    if not cfg.output.single_file:
        return {}
    files = {s: storage.join(out, f"{s}.parquet") for s in SPLITS}
    exports.stream(storage.join(out, "rows"), [exports.only("split", s, exports.table_writer(files[s], STATES_SCHEMA))
                                               for s in SPLITS])
    files["errors"] = storage.join(out, "errors.jsonl")
    exports.stream(storage.join(out, "errors"), [exports.table_writer(files["errors"], None)])
    return files


# ---- main ------------------------------------------------------------------------------------------------
def run_stages(cfg: BuildStatesConfig, ds, pools: dict) -> dict:
    threads, tasks = cfg.ray.torch_threads, task_options(pools)
    for b in cfg.bases:
        ds = data.map_stage(ds, DraftStage, b, base=b, seed=cfg.seed, threads=threads)
    ds = ds.map_batches(filter_rows, batch_format="pyarrow", **tasks, fn_kwargs=dict(
        filters=cfg.filters, column=cfg.score.kind == "column", target=cfg.rank.target))
    if cfg.score.kind == "reward_model":
        ds = data.map_stage(ds, RewardStage, cfg.score.reward_model, rm=cfg.score.reward_model, threads=threads)
    elif cfg.score.kind == "judge":
        ds = data.map_stage(ds, JudgeStage, cfg.score.judge, judge=cfg.score.judge)
    ds = ds.map_batches(rank_rows, batch_format="pyarrow", **tasks,
                        fn_kwargs=dict(rank=cfg.rank, split=cfg.split, seed=cfg.seed))
    if cfg.trajectory.enabled:
        ds = data.map_stage(ds, TrajectoryStage, cfg.trajectory, traj=cfg.trajectory, seed=cfg.seed, threads=threads)
    ds = ds.map_batches(_prompt_head, batch_format="pyarrow", num_cpus=TASK_CPUS)
    sink = blocks.BlockSink(storage.join(cfg_out(cfg), "rows"), storage.join(cfg_out(cfg), "errors"), ROWS_SCHEMA,
                            ERROR_COLUMNS, row_stats, error_stats)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": data.WRITE_CPUS})
    return sink.totals


def cfg_out(cfg: BuildStatesConfig) -> str:
    return expand(cfg.output.path)


def _prompt_head(batch: pa.Table) -> pa.Table:
    """Error rows keep the first 500 characters of their prompt (the errors output says which prompt it was)."""
    import pyarrow.compute as pc

    failed = pc.invert(pc.is_null(batch.column("error")))
    head = pc.if_else(failed, pc.utf8_slice_codeunits(batch.column("prompt"), 0, 500), batch.column("prompt"))
    return batch.set_column(batch.column_names.index("prompt"), "prompt", head)


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfg = load_config(BuildStatesConfig, "conf/build_states.yaml", argv)
    out = cfg_out(cfg)
    data.start_data_job("build_states", cfg, out)
    if pools := cfg.pools():
        data.preflight(pools)

    i = cfg.input
    parser = blocks.Parser(lambda rec, fid, _: normalize_record(rec, fid, fields=i.fields(), layout=i.layout),
                           input_error, ROW_SCHEMA, cfg.ray.rows_per_block)
    job = blocks.BlockJob("build_states", out, data.input_files(i.path), data.input_root(i.path), parser, i.limit,
                          merge=merge_flat_rows if i.layout == "flat" else None)
    todo, info = job.todo()
    totals = run_stages(cfg, todo, pools) if info.rows else {}
    totals = job.finish(totals, ["split", "num_states", "answers_in", "dropped"]
                        + (["trajectories"] if cfg.trajectory.enabled else []), row_stats, ERROR_COLUMNS, error_stats)
    files = export(cfg, out)
    summary = summarize(cfg, totals, time.perf_counter() - started, out, files)
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    print("[build_states] summary:\n" + json.dumps(summary, indent=2), flush=True)
    for r in exports.first_rows(storage.join(out, "rows"), cfg.show_samples):
        print(f"\n--- id {r['id']} ({r['split']}) ---\nPROMPT: {r['prompt'][:200]}")
        for t, (st, score, g) in enumerate(zip(r["states"], r["scores"], r["generators"])):
            print(f"  y({t}) {g} score={score}: {st[:120]!r}")
    print(f"\n[build_states] outputs in {storage.display(out)}: rows/ and errors/"
          + ("; " + ", ".join(f"{s}.parquet ({n} rows)" for s, n in summary["rows_by_split"].items())
             + f", errors.jsonl ({summary['error_rows']} rows)" if files else ""), flush=True)
    return summary


if __name__ == "__main__":
    run_job("build_states")
