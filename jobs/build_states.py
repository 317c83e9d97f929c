"""Ranked answer states for consistency training of the aligner, with Ray Data.

    python -m jobs.build_states                                    # ../shared/data AlpacaEval ranked answers
    python -m jobs.build_states input.path=answers.jsonl.gz output.path=outputs/states rank.target=reference
    ray job submit --working-dir . -- python -m jobs.build_states ray.address=auto input.path=/data/x.parquet \
        score.kind=reward_model score.reward_model.model=/models/rm score.reward_model.num_gpus=1

read -> normalize (-> merge a flat layout by prompt id) -> [draft stages: one per configured base model]
-> filters (empty, repetition, over-length with the aligner's tokenizer; the score column is read here)
-> [reward-model or judge actor pool] -> rank into states worst..best + split -> write_parquet(_parts).
The driver then splits the parts into the outputs in `output.path`:
  train.parquet, dev.parquet, heldout.parquet   one row per prompt (states worst..best, target last)
  errors.jsonl                                   every row that could not become an example, with the reason
  summary.json, config.yaml
Every key is documented in conf/build_states.yaml. `pipeline/training/states.py` holds the logic; this file only
wires it into Ray Data.
"""
from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pandas as pd
from omegaconf import OmegaConf

from jobs.config import REPO, ConfigError, DataRayCfg, DraftCfg, StageCfg, expand, load_config, run_job, start_data_job

TASK_HEADROOM_CPUS = 1.0  # kept free for Ray Data's read/map/write tasks (1 CPU each); without it: a silent hang
ROW_COLUMNS = ["id", "messages", "reference", "answers", "meta", "error", "error_kind"]
SPLITS = ("train", "dev", "heldout")
INPUT_EXTS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


# ---- config schema ---------------------------------------------------------------------------------
@dataclass
class InputCfg:
    path: str = "../shared/data/alpaca_eval/ranked_responses.jsonl.gz"
    layout: str = "nested"  # nested: a list of answers per record | flat: one record per (prompt id, answer)
    id_field: str = "id"
    prompt_field: str = "instruction"  # a string, or a list of {role, content} messages ending with the user
    answers_field: Optional[str] = "responses"  # nested layout only; null = the file holds prompts only
    text_field: str = "output"
    score_field: Optional[str] = "win_prob_vs_reference"  # number or string holding one; used by score.kind=column
    generator_field: Optional[str] = "generator"
    reference_field: Optional[str] = "reference_output"
    limit: Optional[int] = None


@dataclass
class OutputCfg:
    path: str = "outputs/build_states"


@dataclass
class BaseCfg(DraftCfg):
    """A base model whose answers join each prompt's candidates (one or more per prompt; sampled with the
    job's seed, the base name and the row id)."""
    name: Optional[str] = None  # generator name in the output; null = the model's name
    max_new_tokens: int = 256
    num_answers: int = 1


@dataclass
class RewardModelCfg(StageCfg):
    model: Optional[str] = None  # an AutoModelForSequenceClassification (e.g. an ArmoRM-style reward model)
    label_index: int = 0
    max_length: int = 4096


@dataclass
class JudgeCfg:
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: Optional[str] = None
    timeout_s: float = 60.0
    max_retries: int = 3
    parallel_requests: int = 8
    max_tokens: int = 512
    template: Optional[str] = None
    batch_size: int = 4
    num_cpus: float = 0.25
    concurrency: int = 1


@dataclass
class ScoreCfg:
    kind: str = "column"  # column | reward_model | judge
    reward_model: RewardModelCfg = field(default_factory=RewardModelCfg)
    judge: JudgeCfg = field(default_factory=JudgeCfg)


@dataclass
class RankCfg:
    target: str = "best"  # best | reference
    min_states: int = 2


@dataclass
class FiltersCfg:
    tokenizer: Optional[str] = "default"
    trust_remote_code: bool = False
    max_tokens: Optional[int] = 2048
    repeat_ngram: int = 4
    max_repeat_fraction: Optional[float] = 0.5


@dataclass
class SplitCfg:
    heldout_mod: Optional[int] = 4
    heldout_rem: int = 0
    dev_fraction: float = 0.0


@dataclass
class TrajectoryCfg(StageCfg):
    """CLLM-style Jacobi trajectories: the current aligner refines worse states (the published loop's states)."""
    enabled: bool = False
    splits: List[str] = field(default_factory=lambda: ["train"])  # rows of these splits get trajectories
    from_states: Optional[int] = None  # worse states per prompt to start from (seeded pick); None = all
    in_context: bool = False
    block_size: int = 32
    max_iter: int = 64
    max_new_tokens: int = 256
    reserve_tokens: int = 0
    max_states: int = 8


@dataclass
class RayCfg(DataRayCfg):
    rows_per_block: int = 32


@dataclass
class BuildStatesConfig:
    input: InputCfg = field(default_factory=InputCfg)
    output: OutputCfg = field(default_factory=OutputCfg)
    bases: List[BaseCfg] = field(default_factory=list)
    score: ScoreCfg = field(default_factory=ScoreCfg)
    rank: RankCfg = field(default_factory=RankCfg)
    filters: FiltersCfg = field(default_factory=FiltersCfg)
    split: SplitCfg = field(default_factory=SplitCfg)
    trajectory: TrajectoryCfg = field(default_factory=TrajectoryCfg)
    seed: int = 0
    ray: RayCfg = field(default_factory=RayCfg)
    show_samples: int = 1


def _resolve(path: str) -> Path:
    """An absolute path (Ray workers do not share the driver's working directory): relative paths are
    taken from the working directory, else from the repository root."""
    p = Path(expand(path))
    return (p if p.is_absolute() or p.exists() else REPO / p).resolve()


def _missing_local(spec) -> bool:
    """A model spec that names a local path (./x, /x, ~/x) which does not exist."""
    return bool(spec) and str(spec).startswith((".", "/", "~")) and not Path(expand(str(spec))).exists()


def _fast_engine_problem(spec: str, trust_remote_code: bool) -> str | None:
    """Why the fast engine cannot run this model, read from its config (None also when the config cannot be
    read here, e.g. a hub id offline: the actor reports that itself)."""
    from transformers import AutoConfig

    from pipeline.decoding.engine import unsupported_attention
    from pipeline.models import DEFAULT_MODEL, resolve_model_path

    if spec in (DEFAULT_MODEL, "", None):  # a Llama with full attention; resolving it here would convert the
        return None  # GGUF in the driver (the actors do that, once, cached)
    try:
        path, gguf = resolve_model_path(expand(str(spec)))
        config = AutoConfig.from_pretrained(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - not ours to report here
        return None
    return unsupported_attention(config)


def input_files(path: str) -> list[str]:
    p = _resolve(path)
    if p.is_dir():
        return sorted(f for f in glob.glob(str(p / "**" / "*"), recursive=True) if f.endswith(INPUT_EXTS))
    return [str(p)] if p.is_file() else []


def base_name(b) -> str:
    return b.name or Path(str(b.model).rstrip("/")).name or "base"


def validate(cfg) -> None:
    from pipeline.clients import EndpointConfig
    from pipeline.training.states import TARGETS
    from pipeline.scoring.verdicts import check_judge_template

    problems = []
    i = cfg.input
    if not input_files(i.path):
        problems.append(f"input.path: no {'/'.join(INPUT_EXTS)} input found at {i.path!r} (set input.path=...)")
    elif any(not f.endswith(INPUT_EXTS) for f in input_files(i.path)):
        problems.append(f"input.path: {i.path!r} is not one of {', '.join(INPUT_EXTS)}")
    if i.layout not in ("nested", "flat"):
        problems.append(f"input.layout: {i.layout!r} is not nested or flat")
    if i.layout == "nested" and not i.answers_field and not cfg.bases:
        problems.append("input.answers_field is null and no bases are configured: no answers to rank")
    if i.limit is not None and i.limit < 1:
        problems.append(f"input.limit: must be >= 1 or null, got {i.limit}")
    kind = cfg.score.kind
    if kind not in ("column", "reward_model", "judge"):
        problems.append(f"score.kind: {kind!r} is not column, reward_model or judge")
    if kind == "column" and not i.score_field:
        problems.append("score.kind=column needs input.score_field (or use score.kind=reward_model / judge)")
    if kind == "column" and cfg.bases:
        problems.append("score.kind=column cannot score the answers of bases (they have no score column); "
                        "use score.kind=reward_model or judge")
    if kind == "reward_model":
        rm = cfg.score.reward_model
        if not rm.model or rm.model == "default":
            problems.append("score.reward_model.model: set a HF sequence-classification model (folder or hub id)")
        elif _missing_local(rm.model):
            problems.append(f"score.reward_model.model: not found: {rm.model}")
        _pool_problems("score.reward_model", rm, problems)
        if rm.max_length < 8:
            problems.append("score.reward_model.max_length: must be >= 8")
    if kind == "judge":
        j = cfg.score.judge
        ep = EndpointConfig(base_url=j.base_url or "", model=j.model or "", api_key_env=j.api_key_env,
                            timeout_s=j.timeout_s, max_retries=j.max_retries)
        problems += [f"score.judge: {p}" for p in ep.validate()]
        if j.template is not None:
            try:
                check_judge_template(j.template)
            except ValueError as e:
                problems.append(f"score.judge.template: {e}")
        if j.parallel_requests < 1 or j.max_tokens < 1:
            problems.append("score.judge.parallel_requests and max_tokens must be >= 1")
        _pool_problems("score.judge", j, problems)
    names = [base_name(b) for b in cfg.bases]
    if len(set(names)) != len(names):
        problems.append(f"bases: generator names must be unique, got {names}; set bases.N.name")
    for n, b in enumerate(cfg.bases):
        key = f"bases.{n}"
        if b.kind not in ("hf", "openai"):
            problems.append(f"{key}.kind: {b.kind!r} is not hf or openai")
        elif b.kind == "openai":
            ep = EndpointConfig(base_url=b.base_url or "", model=b.model, api_key_env=b.api_key_env,
                                timeout_s=b.timeout_s, max_retries=b.max_retries)
            problems += [f"{key}: {p}" for p in ep.validate()]
        elif _missing_local(b.model):
            problems.append(f"{key}.model: not found: {b.model}")
        if b.max_new_tokens < 1 or b.num_answers < 1:
            problems.append(f"{key}: max_new_tokens and num_answers must be >= 1")
        if b.do_sample and not (0 < b.top_p <= 1 and b.temperature > 0):
            problems.append(f"{key}: sampling needs temperature > 0 and 0 < top_p <= 1 (or do_sample=false)")
        _pool_problems(key, b, problems)
    if cfg.rank.target not in TARGETS:
        problems.append(f"rank.target: {cfg.rank.target!r} is not one of {', '.join(TARGETS)}")
    if cfg.rank.target == "reference" and not i.reference_field:
        problems.append("rank.target=reference needs input.reference_field")
    if cfg.rank.min_states < 1:
        problems.append(f"rank.min_states: must be >= 1, got {cfg.rank.min_states}")
    f = cfg.filters
    if f.max_tokens is not None and (f.max_tokens < 2 or not f.tokenizer):
        problems.append("filters.max_tokens: must be >= 2 and needs filters.tokenizer (or null to skip the filter)")
    if f.max_tokens is not None and _missing_local(f.tokenizer):
        problems.append(f"filters.tokenizer: not found: {f.tokenizer}")
    if f.repeat_ngram < 1:
        problems.append(f"filters.repeat_ngram: must be >= 1, got {f.repeat_ngram}")
    if f.max_repeat_fraction is not None and not 0 <= f.max_repeat_fraction < 1:
        problems.append(f"filters.max_repeat_fraction: must be in [0, 1) or null, got {f.max_repeat_fraction}")
    s = cfg.split
    if s.heldout_mod is not None and (s.heldout_mod < 1 or not 0 <= s.heldout_rem < s.heldout_mod):
        problems.append(f"split: need heldout_mod >= 1 and 0 <= heldout_rem < heldout_mod (or heldout_mod=null), "
                        f"got {s.heldout_mod}, {s.heldout_rem}")
    if not 0 <= s.dev_fraction < 1:
        problems.append(f"split.dev_fraction: must be in [0, 1), got {s.dev_fraction}")
    t = cfg.trajectory
    if t.enabled:
        from pipeline.decoding.jacobi import RefineSettings

        try:
            RefineSettings(block_size=t.block_size, max_iter=t.max_iter, max_new_tokens=t.max_new_tokens,
                           reserve_tokens=t.reserve_tokens).validate()
        except ValueError as e:
            problems.append(f"trajectory: {e}")
        if t.max_states < 2:
            problems.append(f"trajectory.max_states: must be >= 2 (the answer and the fixed point), got {t.max_states}")
        if _missing_local(t.model):
            problems.append(f"trajectory.model: not found: {t.model}")
        elif (why := _fast_engine_problem(t.model, t.trust_remote_code)):
            problems.append(f"trajectory.model: {why} (trajectories are recorded with the fast engine)")
        bad = [x for x in t.splits if x not in ("train", "dev", "heldout")]
        if bad or not t.splits:
            problems.append(f"trajectory.splits: a non-empty list of train / dev / heldout, got {list(t.splits)}")
        if t.from_states is not None and t.from_states < 1:
            problems.append(f"trajectory.from_states: must be >= 1 or null (all), got {t.from_states}")
        _pool_problems("trajectory", t, problems)
    if cfg.ray.torch_threads < 1 or cfg.ray.rows_per_block < 1:
        problems.append("ray.torch_threads and ray.rows_per_block must be >= 1")
    if problems:
        raise ConfigError(problems)


def _pool_problems(key: str, st, problems: list) -> None:
    if st.batch_size < 1 or st.concurrency < 1:
        problems.append(f"{key}: batch_size and concurrency must be >= 1")
    if st.num_cpus <= 0 and getattr(st, "num_gpus", 0) <= 0:
        problems.append(f"{key}.num_cpus: must be > 0 (fractions such as 0.5 are fine), got {st.num_cpus}")
    if getattr(st, "dtype", "auto") not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        problems.append(f"{key}.dtype: {st.dtype!r} is not auto, float32, bfloat16 or float16")


def actor_pools(cfg) -> list[tuple[str, object]]:
    pools = [(f"bases.{n}", b) for n, b in enumerate(cfg.bases)]
    if cfg.score.kind in ("reward_model", "judge"):
        pools.append((f"score.{cfg.score.kind}", cfg.score[cfg.score.kind]))
    if cfg.trajectory.enabled:
        pools.append(("trajectory", cfg.trajectory))
    return pools


def preflight_resources(cfg) -> None:
    """Refuse actor pools that would leave no CPU for Ray Data's tasks (the pipeline would wait forever)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    pools = actor_pools(cfg)
    want_cpu = sum(st.num_cpus * st.concurrency for _, st in pools)
    want_gpu = sum(getattr(st, "num_gpus", 0.0) * st.concurrency for _, st in pools)
    problems = []
    if want_cpu + TASK_HEADROOM_CPUS > cpus:
        detail = " + ".join(f"{k} {st.num_cpus} x {st.concurrency}" for k, st in pools)
        problems.append(f"the actor pools ask for {want_cpu:g} CPUs ({detail}) but the cluster has {cpus:g} and "
                        f"{TASK_HEADROOM_CPUS:g} must stay free for Ray Data's tasks. Lower num_cpus (fractions "
                        "work, e.g. score.reward_model.num_cpus=0.5) or concurrency.")
    if want_gpu > gpus:
        problems.append(f"the actor pools ask for {want_gpu:g} GPUs but the cluster has {gpus:g}; set num_gpus=0 "
                        "on CPU-only clusters")
    if problems:
        raise ConfigError(problems)


# ---- reading (thin adapters over pipeline.training.states) -----------------------------------------------------
def _fields(i) -> dict:
    return {"id": i.id_field, "prompt": i.prompt_field, "answers": i.answers_field, "text": i.text_field,
            "score": i.score_field, "generator": i.generator_field, "reference": i.reference_field}


def parse_file(row: dict, fields: dict, layout: str) -> list[dict]:
    """One JSONL / JSON file (gzipped or not) -> normalized rows; a bad line is one error row."""
    from pipeline.records import parse_json_array, parse_lines
    from pipeline.training.states import error_row, normalize_record

    path, data = row["path"], row["bytes"]
    src = os.path.basename(path)
    if data[:2] == b"\x1f\x8b":  # still gzipped (Ray usually decompresses .gz files itself while reading)
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            return [error_row(f"{src}:0", "input", f"not a valid gzip file: {e}")]
    parse = parse_json_array if path.endswith((".json", ".json.gz")) else parse_lines
    return [error_row(fid, "input", err) if err else normalize_record(rec, fid, fields, layout)
            for rec, fid, err in parse(data, src)]


def parse_parquet_batch(batch: pd.DataFrame, fields: dict, layout: str) -> pd.DataFrame:
    from pipeline.records import plain_value
    from pipeline.training.states import error_row, normalize_record

    out = []
    for rec in batch.to_dict("records"):
        # parquet rows carry no line number: a row without a usable id is named by a hash of its content
        fallback = "parquet:" + hashlib.sha256(repr(sorted(rec.items())).encode()).hexdigest()[:12]
        try:
            rec = {k: plain_value(v) for k, v in rec.items()}
        except UnicodeDecodeError as e:
            out.append(error_row(fallback, "input", f"field is not valid UTF-8 ({e.reason})"))
            continue
        out.append(normalize_record(rec, fallback, fields, layout))
    return pd.DataFrame(out, columns=ROW_COLUMNS)


def merge_group(group: pd.DataFrame) -> pd.DataFrame:
    from pipeline.training.states import merge_flat

    return pd.DataFrame([merge_flat(group.to_dict("records"))], columns=ROW_COLUMNS)


# ---- stages ---------------------------------------------------------------------------------------------
class DraftStage:
    """Adds a base model's answers (num_answers per prompt) to every row's candidates.

    HF models answer one prompt per `generate` call (num_answers samples of it, seeded by the job seed, the
    base name and the row id), so a row's answers never depend on which rows Ray Data batched together."""

    def __init__(self, st: dict, name: str, seed: int, threads: int):
        import torch

        from pipeline.decoding.drafting import Drafter

        torch.set_num_threads(threads)
        self.st, self.name = st, name
        self.drafter = Drafter(st, seed=seed)

    def _answers(self, r: dict) -> list[str]:
        msgs = json.loads(r["messages"])
        return [o[0] for o in self.drafter.answer([msgs] * self.st["num_answers"], seed_key=f"{self.name}:{r['id']}")]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        n = self.st["num_answers"]
        gens = [self.name if n == 1 else f"{self.name}#{k}" for k in range(n)]
        for r in rows:
            if r["error"]:
                continue
            answers = json.loads(r["answers"])
            try:
                texts, detail = self._answers(r), ""
            except Exception as e:  # noqa: BLE001 - one failing prompt must not sink the batch
                texts, detail = [""] * n, f"{self.name}: {type(e).__name__}: {e}"[:500]
            for g, t in zip(gens, texts):
                answers.append({"generator": g, "text": t, "score": None, "raw_score": None,
                                "drop": "draft_error" if detail else None, "detail": detail})
            r["answers"] = json.dumps(answers, ensure_ascii=False)
        return pd.DataFrame(rows, columns=ROW_COLUMNS)


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str, trust_remote_code: bool):
    from pipeline.models import load_tokenizer

    return load_tokenizer(spec, trust_remote_code)


def filter_batch(batch: pd.DataFrame, f: dict, column_scores: bool, target: str) -> pd.DataFrame:
    """Content and length filters for every answer (and the reference when it is the target); reads the
    score column when score.kind=column. Each failing answer gets its reason; nothing is removed here."""
    from pipeline.prompts import chat_prompt_ids
    from pipeline.training.states import column_scores as read_scores
    from pipeline.training.states import length_problem, text_problem

    tok = _tokenizer(f["tokenizer"], f["trust_remote_code"]) if f["max_tokens"] else None
    rows = batch.to_dict("records")
    for r in rows:
        if r["error"]:
            continue
        answers = json.loads(r["answers"])
        todo = [a for a in answers if not a["drop"]]
        for a in todo:
            p = text_problem(a["text"], f["repeat_ngram"], f["max_repeat_fraction"])
            if p:
                a["drop"], a["detail"] = p
        ref = json.loads(r["reference"])
        check_ref = target == "reference" and isinstance(ref, str)
        if check_ref:
            p = text_problem(ref, f["repeat_ngram"], f["max_repeat_fraction"])
            if p:
                r["error"], r["error_kind"] = f"reference answer rejected: {p[1]}", "reference"
        if tok is not None:
            n_prompt = len(chat_prompt_ids(tok, json.loads(r["messages"])))
            todo = [a for a in answers if not a["drop"]]
            texts = [a["text"] for a in todo] + ([ref] if check_ref and not r["error"] else [])
            lens = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
            for a, n in zip(todo, lens):
                p = length_problem(n_prompt, n, f["max_tokens"])
                if p:
                    a["drop"], a["detail"] = p
            if check_ref and not r["error"]:
                p = length_problem(n_prompt, lens[-1], f["max_tokens"])
                if p:
                    r["error"], r["error_kind"] = f"reference answer rejected: {p[1]}", "reference"
        if column_scores:
            read_scores(answers)
        r["answers"] = json.dumps(answers, ensure_ascii=False)
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


class RewardStage:
    """Scores every kept answer with a HF reward model (all answers of one prompt in one forward pass)."""

    def __init__(self, st: dict, threads: int):
        import torch

        from pipeline.scoring.reward_model import RewardModel

        torch.set_num_threads(threads)
        self.rm = RewardModel(st["model"], device=st["device"], dtype=st["dtype"],
                              trust_remote_code=st["trust_remote_code"], label_index=st["label_index"],
                              max_length=st["max_length"])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        for r in rows:
            if r["error"]:
                continue
            answers = json.loads(r["answers"])
            todo = [a for a in answers if not a["drop"]]
            try:
                for a, s in zip(todo, self.rm.score(json.loads(r["messages"]), [a["text"] for a in todo])):
                    a["score"] = s
            except Exception as e:  # noqa: BLE001
                for a in todo:
                    a["drop"], a["detail"] = "score_error", f"reward model: {type(e).__name__}: {e}"[:500]
            r["answers"] = json.dumps(answers, ensure_ascii=False)
        return pd.DataFrame(rows, columns=ROW_COLUMNS)


class JudgeStage:
    """Scores every kept answer 1-10 with an OpenAI-compatible judge; an unusable verdict drops the answer
    with the reason (`pipeline.scoring.verdicts.parse_judge_score` never guesses)."""

    def __init__(self, st: dict):
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.clients import ChatEndpoint, EndpointConfig
        from pipeline.scoring.verdicts import DEFAULT_JUDGE_TEMPLATE

        self.endpoint = ChatEndpoint(EndpointConfig(base_url=st["base_url"], model=st["model"],
                                                    api_key_env=st["api_key_env"], timeout_s=st["timeout_s"],
                                                    max_retries=st["max_retries"]))
        self.template, self.max_tokens = st["template"] or DEFAULT_JUDGE_TEMPLATE, st["max_tokens"]
        self.pool = ThreadPoolExecutor(st["parallel_requests"])

    def _one(self, msgs, a) -> None:
        from pipeline.scoring.verdicts import judge_answer

        try:
            a["score"] = judge_answer(self.endpoint, msgs, a["text"], self.template, self.max_tokens)
        except Exception as e:  # noqa: BLE001 - endpoint failures and unparsable verdicts alike
            a["drop"], a["detail"] = "score_error", f"judge: {type(e).__name__}: {e}"[:500]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        parsed = {i: (json.loads(r["messages"]), json.loads(r["answers"])) for i, r in enumerate(rows)
                  if not r["error"]}
        work = [(m, a) for m, answers in parsed.values() for a in answers if not a["drop"]]
        list(self.pool.map(lambda x: self._one(*x), work))
        for i, (_, answers) in parsed.items():
            rows[i]["answers"] = json.dumps(answers, ensure_ascii=False)
        return pd.DataFrame(rows, columns=ROW_COLUMNS)


OUT_COLUMNS = ["id", "prompt", "messages", "states", "scores", "generators", "target", "num_states", "split",
               "dropped", "meta", "error", "error_kind", "answers_in", "trajectories"]


def rank_batch(batch: pd.DataFrame, target: str, min_states: int, seed: int, split: dict) -> pd.DataFrame:
    """Rows -> output rows: states worst..best (lists as JSON until the driver writes typed Parquet)."""
    from pipeline.training.states import RowError, rank_states, split_of

    out = []
    for r in batch.to_dict("records"):
        msgs = json.loads(r["messages"])
        answers = json.loads(r["answers"])
        row = {"id": r["id"], "prompt": msgs[-1]["content"] if msgs else "", "messages": r["messages"],
               "states": "[]", "scores": "[]", "generators": "[]", "target": "", "num_states": 0,
               "split": split_of(r["id"], split["heldout_mod"], split["heldout_rem"], split["dev_fraction"], seed),
               "dropped": "[]", "meta": r["meta"], "error": r["error"], "error_kind": r["error_kind"],
               "answers_in": len(answers), "trajectories": "[]"}
        if not r["error"]:
            try:
                st = rank_states(r["id"], answers, json.loads(r["reference"]), target, min_states, seed)
                row.update(states=json.dumps(st["states"], ensure_ascii=False), scores=json.dumps(st["scores"]),
                           generators=json.dumps(st["generators"], ensure_ascii=False), target=st["states"][-1],
                           num_states=len(st["states"]))
            except RowError as e:
                row["error"], row["error_kind"] = str(e), e.kind
        row["dropped"] = json.dumps([{"generator": a["generator"], "reason": a["drop"], "detail": a["detail"]}
                                     for a in answers if a["drop"]], ensure_ascii=False)
        out.append(row)
    return pd.DataFrame(out, columns=OUT_COLUMNS)


class TrajectoryStage:
    """CLLM-style Jacobi trajectories: the current aligner runs the Jacobi loop from worse states of the
    row; each gives {"from": state index, "states", "state_ids", "fixed_point", "fixed_point_ids", "stop",
    "passes", "converged"} (see `pipeline.training.trajectories.jacobi_trajectories`). The whole batch runs in the fast
    engine with settings that reproduce the published loop's states. Greedy and seeded (which states,
    reserved tokens), so reruns give the same trajectories."""

    def __init__(self, st: dict, seed: int, threads: int):
        import torch

        from pipeline.models import load_model
        from pipeline.decoding.refiner import Refiner
        from pipeline.training.trajectories import trajectory_settings

        torch.set_num_threads(threads)
        lm = load_model(st["model"], dtype=st["dtype"], device=st["device"], trust_remote_code=st["trust_remote_code"])
        settings = trajectory_settings(st["block_size"], st["max_iter"], st["max_new_tokens"], st["reserve_tokens"], seed)
        self.refiner = Refiner(lm, settings, mode="fast", in_context=st["in_context"])
        self.st, self.seed = st, seed

    def starts(self, row_id: str, n_worse: int) -> list[int]:
        k = self.st["from_states"]
        if k is None or k >= n_worse:
            return list(range(n_worse))
        return sorted(random.Random(f"{self.seed}:{row_id}:trajectory").sample(range(n_worse), k))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from pipeline.decoding.refiner import RefineRequest
        from pipeline.training.trajectories import jacobi_trajectories

        rows = batch.to_dict("records")
        reqs, owner = [], []
        for n, r in enumerate(rows):
            if r["error"] or r["split"] not in self.st["splits"]:
                continue
            msgs, states = json.loads(r["messages"]), json.loads(r["states"])
            for t in self.starts(str(r["id"]), len(states) - 1):
                reqs.append(RefineRequest(msgs, states[t], key=f"{r['id']}#{t}"))
                owner.append((n, t))
        found: dict[int, list] = {}
        for (n, t), tr in zip(owner, jacobi_trajectories(self.refiner, reqs, self.st["max_states"])):
            found.setdefault(n, []).append({"from": t, **tr})
        for n, r in enumerate(rows):
            r["trajectories"] = json.dumps(found.get(n, []), ensure_ascii=False)
        return pd.DataFrame(rows, columns=OUT_COLUMNS)


# ---- finalize ---------------------------------------------------------------------------------------------
def _sort_key(x: str):
    return (0, int(x), "") if str(x).lstrip("-").isdigit() else (1, 0, str(x))


def output_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("prompt", pa.string()), ("messages", pa.string()),
                      ("states", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
                      ("generators", pa.list_(pa.string())), ("target", pa.string()), ("num_states", pa.int64()),
                      ("split", pa.string()), ("dropped", pa.string()), ("meta", pa.string()),
                      ("trajectories", pa.string())])


def trajectory_stats(col) -> dict:
    trs = [t for x in col for t in json.loads(x)]
    good = [t for t in trs if "error" not in t]
    return {"count": len(trs), "errors": len(trs) - len(good),
            "mean_states": round(sum(len(t["states"]) for t in good) / len(good), 3) if good else 0.0,
            "mean_passes": round(sum(t["passes"] for t in good) / len(good), 3) if good else 0.0,
            "converged_fraction": round(sum(t["converged"] for t in good) / len(good), 4) if good else 0.0}


def finalize(cfg, out: Path, parts: Path, rows_in: int, started: float) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.training.states import DROP_REASONS

    files = sorted(parts.glob("*.parquet"))
    df = (pa.concat_tables([pq.read_table(f) for f in files]).to_pandas() if files
          else pd.DataFrame(columns=OUT_COLUMNS))
    if df["id"].duplicated().any():
        raise RuntimeError(f"internal error: ids written twice: {df['id'][df['id'].duplicated()].tolist()[:5]}")
    df = df.iloc[sorted(range(len(df)), key=lambda k: _sort_key(df["id"].iat[k]))].reset_index(drop=True)
    ok, bad = df[df["error"] == ""], df[df["error"] != ""]
    schema = output_schema()
    counts = {}
    for split in SPLITS:
        part = ok[ok["split"] == split]
        cols = {name: part[name].tolist() for name in schema.names}
        for name in ("states", "scores", "generators"):
            cols[name] = [json.loads(x) for x in cols[name]]
        pq.write_table(pa.table(cols, schema=schema), out / f"{split}.parquet")
        counts[split] = len(part)
    with open(out / "errors.jsonl", "w") as f:
        for r in bad.to_dict("records"):
            f.write(json.dumps({"id": r["id"], "error_kind": r["error_kind"], "error": r["error"],
                                "split": r["split"], "prompt": r["prompt"][:500]}, ensure_ascii=False) + "\n")
    dropped = {k: 0 for k in DROP_REASONS}
    for d in df["dropped"]:
        for x in json.loads(d):
            dropped[x["reason"]] = dropped.get(x["reason"], 0) + 1
    n_states = ok["num_states"].astype(int)
    ref_states = len(ok) if cfg.rank.target == "reference" else 0
    wall = time.perf_counter() - started
    summary = {
        "rows_in": rows_in, "rows_out": len(ok), "error_rows": len(bad),
        "rows_by_split": counts,
        "error_rows_by_kind": {k: int(v) for k, v in bad["error_kind"].value_counts().sort_index().items()},
        "error_rows_by_split": {s: int((bad["split"] == s).sum()) for s in SPLITS},
        "answers_in": int(df["answers_in"].sum()),
        "answers_as_states": int(n_states.sum()) - ref_states,
        "answers_dropped": dropped,
        "answers_in_error_rows_not_dropped": int(df["answers_in"].sum()) - (int(n_states.sum()) - ref_states)
                                             - sum(dropped.values()),
        "states_per_row": ({"mean": round(float(n_states.mean()), 3), "min": int(n_states.min()),
                            "max": int(n_states.max()), "histogram": {int(k): int(v) for k, v in
                                                                     n_states.value_counts().sort_index().items()}}
                           if len(ok) else {}),
        "target": cfg.rank.target, "score": cfg.score.kind, "seed": cfg.seed,
        **({"trajectories": trajectory_stats(ok["trajectories"])} if cfg.trajectory.enabled else {}),
        "wall_s": round(wall, 2), "rows_per_s": round(rows_in / wall, 3) if wall > 0 else 0.0,
        "outputs": {s: str(out / f"{s}.parquet") for s in SPLITS} | {"errors": str(out / "errors.jsonl")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary, ok


# ---- main -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfg = load_config(BuildStatesConfig, "conf/build_states.yaml", argv)
    validate(cfg)
    out = Path(expand(cfg.output.path))
    parts = out / "_parts"
    if parts.exists():
        shutil.rmtree(parts)  # a new run: parts of an earlier one would mix in
    parts.mkdir(parents=True)

    import ray
    from ray.data.context import ShuffleStrategy

    ctx = start_data_job("build_states", cfg, out)  # outputs are sorted anyway; order keeps `limit` stable
    preflight_resources(cfg)
    # flat layout's groupby: the task-based sort shuffle. The default hash shuffle starts aggregator actors that
    # need CPUs of their own (seconds on small data, and a wait where actor pools hold the CPUs). Datasets copy
    # the context when they are created, so this must be set before the first read.
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED

    # read -> normalized rows ------------------------------------------------------------------------
    files = input_files(cfg.input.path)
    fields, layout = _fields(cfg.input), cfg.input.layout
    pq_files = [f for f in files if f.endswith(".parquet")]
    js_files = [f for f in files if not f.endswith(".parquet")]
    pieces = []
    if js_files:
        pieces.append(ray.data.read_binary_files(js_files, include_paths=True)
                      .flat_map(parse_file, fn_kwargs=dict(fields=fields, layout=layout)))
    if pq_files:
        pieces.append(ray.data.read_parquet(pq_files).map_batches(
            parse_parquet_batch, batch_format="pandas", fn_kwargs=dict(fields=fields, layout=layout)))
    parsed = pieces[0] if len(pieces) == 1 else pieces[0].union(*pieces[1:])
    if cfg.input.limit:
        parsed = parsed.limit(cfg.input.limit)
    if layout == "flat":
        # a few partitions are plenty for prompt-sized rows (Ray's default is 200)
        parts_n = max(2, int(ray.cluster_resources().get("CPU", 2)))
        parsed = parsed.groupby("id", num_partitions=parts_n).map_groups(merge_group, batch_format="pandas")
    parsed = parsed.materialize()  # rows are small; the id check and the counts need them all

    ids = parsed.select_columns(["id"]).to_pandas()["id"]
    dups = ids[ids.duplicated()].unique().tolist()
    if dups:
        raise ConfigError([f"input has duplicate ids {dups[:10]}{' ...' if len(dups) > 10 else ''}: set "
                           "input.id_field to a unique field, or input.layout=flat for one row per answer"])
    rows_in = len(ids)
    print(f"[build_states] {rows_in} prompts read from {len(files)} file(s)", flush=True)

    # stages ---------------------------------------------------------------------------------------------
    ds = parsed.repartition(target_num_rows_per_block=cfg.ray.rows_per_block)
    threads = cfg.ray.torch_threads
    for b in cfg.bases:
        ds = ds.map_batches(DraftStage, batch_format="pandas", batch_size=b.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=b.concurrency),
                            num_cpus=b.num_cpus, num_gpus=b.num_gpus or None,
                            fn_constructor_kwargs=dict(st=OmegaConf.to_container(b), name=base_name(b),
                                                       seed=cfg.seed, threads=threads))
    ds = ds.map_batches(filter_batch, batch_format="pandas",
                        fn_kwargs=dict(f=OmegaConf.to_container(cfg.filters),
                                       column_scores=cfg.score.kind == "column", target=cfg.rank.target))
    sc = cfg.score
    if sc.kind == "reward_model":
        rm = sc.reward_model
        ds = ds.map_batches(RewardStage, batch_format="pandas", batch_size=rm.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=rm.concurrency),
                            num_cpus=rm.num_cpus, num_gpus=rm.num_gpus or None,
                            fn_constructor_kwargs=dict(st=OmegaConf.to_container(rm), threads=threads))
    elif sc.kind == "judge":
        j = sc.judge
        ds = ds.map_batches(JudgeStage, batch_format="pandas", batch_size=j.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=j.concurrency), num_cpus=j.num_cpus,
                            fn_constructor_kwargs=dict(st=OmegaConf.to_container(j)))
    ds = ds.map_batches(rank_batch, batch_format="pandas",
                        fn_kwargs=dict(target=cfg.rank.target, min_states=cfg.rank.min_states, seed=cfg.seed,
                                       split=OmegaConf.to_container(cfg.split)))
    t = cfg.trajectory
    if t.enabled:
        ds = ds.map_batches(TrajectoryStage, batch_format="pandas", batch_size=t.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=t.concurrency),
                            num_cpus=t.num_cpus, num_gpus=t.num_gpus or None,
                            fn_constructor_kwargs=dict(st=OmegaConf.to_container(t), seed=cfg.seed, threads=threads))
    ds.write_parquet(str(parts))

    summary, ok = finalize(cfg, out, parts, rows_in, started)
    shutil.rmtree(parts)
    print("[build_states] summary:\n" + json.dumps(summary, indent=2), flush=True)
    for r in ok.head(cfg.show_samples).to_dict("records"):
        states, scores, gens = json.loads(r["states"]), json.loads(r["scores"]), json.loads(r["generators"])
        print(f"\n--- id {r['id']} ({r['split']}) ---\nPROMPT: {r['prompt'][:200]}")
        for t, (s, sc_, g) in enumerate(zip(states, scores, gens)):
            print(f"  y({t}) {g} score={sc_}: {s[:120]!r}")
    print(f"\n[build_states] outputs in {out}: " + ", ".join(f"{s}.parquet ({n} rows)"
                                                          for s, n in summary["rows_by_split"].items())
          + f", errors.jsonl ({summary['error_rows']} rows)")
    return summary


if __name__ == "__main__":
    run_job("build_states")
