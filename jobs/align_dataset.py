"""Align a whole dataset with Ray Data: read -> (draft with the base model) -> refine with the aligner -> write.

    python -m jobs.align_dataset                                   # embedded default: demo prompts, SmolLM2
    python -m jobs.align_dataset input.path=prompts.jsonl aligner.mode=reference
    ray job submit --working-dir . -- python -m jobs.align_dataset ray.address=auto input.path=/data/x.parquet

Every key is documented in conf/align_dataset.yaml and the README. Outputs in `output.path`:
  aligned.parquet|jsonl   one row per input row that could be processed
  errors.jsonl            every other row, with the reason
  summary.json, config.yaml, and optionally fastchat_answers.jsonl / alpaca_eval_outputs.json
  _parts/                 what Ray Data wrote so far: a killed job rerun with the same output path
                          skips the ids found there and never writes a row twice.
"""
from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import OmegaConf

from jobs.config import REPO, ConfigError, DataRayCfg, DraftCfg, StageCfg, expand, load_config, run_job, start_data_job

DEMO_PROMPTS = REPO / "pipeline" / "data" / "demo_prompts.jsonl"
READ_HEADROOM_CPUS = 0.5  # left free for Ray Data's read/write tasks; without it the pipeline can hang


# ---- config schema ---------------------------------------------------------------------------------
@dataclass
class InputCfg:
    path: str = "demo"
    format: str = "auto"
    id_field: Optional[str] = None
    drafts_path: Optional[str] = None
    limit: Optional[int] = None


@dataclass
class OutputCfg:
    path: str = "outputs/align_dataset"
    format: str = "parquet"
    fastchat_answers: bool = False
    alpaca_eval_outputs: bool = False
    model_id: str = "diffpo-aligned"
    rows_per_file: int = 4


@dataclass
class BaseCfg(DraftCfg):
    seed: int = 0  # sampling seed (with the row id and turn)


@dataclass
class AlignerCfg(StageCfg):
    mode: str = "fast"
    in_context: bool = False
    template: Optional[str] = None
    block_size: int = 256
    max_iter: int = 300
    max_new_tokens: int = 256
    reserve_tokens: int = 12
    seed: int = 0
    window: Optional[int] = 16
    adaptive_window: bool = True
    reseed: bool = True
    reseed_ngram: int = 3
    prompt_lookup: int = 0
    vectors: dict[str, str] = field(default_factory=dict)  # alignment vectors: name -> folder (jobs.extract_vector)
    knobs: dict[str, float] = field(default_factory=dict)  # name -> λ: aligner weights = θ + Σ λ·AV


@dataclass
class AlignDatasetConfig:
    input: InputCfg = field(default_factory=InputCfg)
    output: OutputCfg = field(default_factory=OutputCfg)
    base: BaseCfg = field(default_factory=BaseCfg)
    aligner: AlignerCfg = field(default_factory=AlignerCfg)
    ray: DataRayCfg = field(default_factory=DataRayCfg)
    show_samples: int = 3


def refine_settings(a) -> "RefineSettings":  # noqa: F821
    """The engine settings from the aligner section (a DictConfig or a plain dict)."""
    from dataclasses import fields

    from pipeline.decoding.jacobi import RefineSettings

    return RefineSettings(**{f.name: a[f.name] for f in fields(RefineSettings)})


def input_files(path: str) -> list[str]:
    if path == "demo":
        return [str(DEMO_PROMPTS)]
    p = Path(expand(path))
    if p.is_dir():
        files = sorted(f for ext in ("jsonl", "jsonl.gz", "json", "parquet")
                       for f in glob.glob(str(p / f"**/*.{ext}"), recursive=True))
        return files
    return [str(p)] if p.exists() else []


def validate(cfg) -> None:
    from pipeline.prompts import check_template
    from pipeline.records import FORMATS
    from pipeline.decoding.refiner import MODES

    problems = []
    files = input_files(cfg.input.path)
    if not files:
        problems.append(f"input.path: no .jsonl/.jsonl.gz/.json/.parquet input found at {cfg.input.path!r}")
    if cfg.input.format not in FORMATS:
        problems.append(f"input.format: {cfg.input.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.input.drafts_path and not Path(expand(cfg.input.drafts_path)).exists():
        problems.append(f"input.drafts_path: file not found: {cfg.input.drafts_path}")
    if cfg.input.limit is not None and cfg.input.limit < 1:
        problems.append(f"input.limit: must be >= 1 or null, got {cfg.input.limit}")
    if cfg.output.format not in ("parquet", "jsonl"):
        problems.append(f"output.format: {cfg.output.format!r} is not parquet or jsonl")
    if cfg.output.rows_per_file < 1:
        problems.append("output.rows_per_file: must be >= 1")
    if cfg.aligner.mode not in MODES:
        problems.append(f"aligner.mode: {cfg.aligner.mode!r} is not one of {', '.join(MODES)}")
    if cfg.aligner.template is not None:
        try:
            check_template(cfg.aligner.template)
        except ValueError as e:
            problems.append(f"aligner.template: {e}")
    try:
        refine_settings(cfg.aligner).validate()
    except ValueError as e:
        problems.append(f"aligner: {e}")
    for name in ("base", "aligner"):
        st = cfg[name]
        if st.batch_size < 1:
            problems.append(f"{name}.batch_size: must be >= 1, got {st.batch_size}")
        if st.concurrency < 1:
            problems.append(f"{name}.concurrency: must be >= 1, got {st.concurrency}")
        if st.num_cpus <= 0 and st.num_gpus <= 0:
            problems.append(f"{name}.num_cpus: must be > 0 (fractions such as 0.5 are fine), got {st.num_cpus}")
        if st.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            problems.append(f"{name}.dtype: {st.dtype!r} is not auto, float32, bfloat16 or float16")
    for name in cfg.aligner.knobs:
        if name not in cfg.aligner.vectors:
            problems.append(f"aligner.knobs.{name}: no vector named {name!r} in aligner.vectors "
                            f"(have {sorted(cfg.aligner.vectors)})")
    for name, path in cfg.aligner.vectors.items():
        if not (Path(expand(path)) / "vector.json").exists():
            problems.append(f"aligner.vectors.{name}: no alignment vector at {path} (write one with jobs.extract_vector)")
    if cfg.base.max_new_tokens < 1:
        problems.append("base.max_new_tokens: must be >= 1")
    if cfg.base.kind not in ("hf", "openai"):
        problems.append(f"base.kind: {cfg.base.kind!r} is not hf or openai")
    elif cfg.base.kind == "openai":
        from pipeline.clients import EndpointConfig

        ep = EndpointConfig(base_url=cfg.base.base_url or "", model=cfg.base.model, api_key_env=cfg.base.api_key_env,
                            timeout_s=cfg.base.timeout_s, max_retries=cfg.base.max_retries)
        problems += [f"base: {p}" for p in ep.validate()]
        if cfg.base.parallel_requests < 1:
            problems.append("base.parallel_requests: must be >= 1")
    if cfg.base.do_sample and not (0 < cfg.base.top_p <= 1 and cfg.base.temperature > 0):
        problems.append("base: sampling needs temperature > 0 and 0 < top_p <= 1 (or base.do_sample=false)")
    if cfg.ray.torch_threads < 1:
        problems.append("ray.torch_threads: must be >= 1")
    if problems:
        raise ConfigError(problems)


def preflight_resources(cfg, needs_drafts: bool) -> None:
    """Refuse a pipeline whose actors would take every CPU: Ray Data would then wait forever for a free
    CPU to run its read/write tasks, silently."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    stages = (["base"] if needs_drafts else []) + ["aligner"]
    want_cpu = sum(cfg[s].num_cpus * cfg[s].concurrency for s in stages)
    want_gpu = sum(cfg[s].num_gpus * cfg[s].concurrency for s in stages)
    problems = []
    if want_cpu + READ_HEADROOM_CPUS > cpus:
        detail = " + ".join(f"{s} {cfg[s].num_cpus} x {cfg[s].concurrency}" for s in stages)
        problems.append(f"the actors ask for {want_cpu:g} CPUs ({detail}) but the cluster has {cpus:g}, and "
                        f"{READ_HEADROOM_CPUS} must stay free for reading and writing. Lower num_cpus (fractions "
                        f"work, e.g. base.num_cpus=0.5) or concurrency.")
    if want_gpu > gpus:
        problems.append(f"the actors ask for {want_gpu:g} GPUs but the cluster has {gpus:g}; set num_gpus=0 "
                        "on CPU-only clusters")
    if problems:
        raise ConfigError(problems)


# ---- Ray Data stages (thin adapters over pipeline/) --------------------------------------------------
def _model_kwargs(st: dict) -> dict:
    return {k: st[k] for k in ("dtype", "device", "trust_remote_code")}


class DraftStage:
    """Writes the base model's answers for rows that came without drafts (turn by turn)."""

    def __init__(self, st: dict, threads: int):
        import torch

        from pipeline.decoding.drafting import Drafter

        torch.set_num_threads(threads)
        self.drafter = Drafter(st, seed=st["seed"])

    def _one(self, r: dict, conv: list, turn: int):
        try:
            return self.drafter.answer([conv], seed_key=f"{r['id']}#{turn}")[0]
        except Exception as e:  # noqa: BLE001
            r["error"] = f"draft stage: {type(e).__name__}: {e}"
            return None

    def _turn(self, rows: list[dict], convs: list, turn: int) -> list:
        """One turn for several rows: a remote endpoint gets parallel requests, a local model one batch."""
        if self.drafter.remote:  # one request per row, so one failure marks only its row
            return list(self.drafter.pool.map(lambda rc: self._one(rc[0], rc[1], turn), zip(rows, convs)))
        try:
            return self.drafter.answer(convs, seed_key=",".join(r["id"] for r in rows) + f"#{turn}")
        except Exception:  # noqa: BLE001 - one bad row must not sink the batch: retry one by one
            return [self._one(r, c, turn) for r, c in zip(rows, convs)]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from pipeline.records import conversation

        rows = batch.to_dict("records")
        todo = [r for r in rows if not r["error"] and not r["drafts"]]
        for r in todo:
            r["_drafts"], r["draft_s"] = [], 0.0
        turn = 0
        while todo:
            convs = [conversation(r, turn, r["_drafts"]) for r in todo]
            outs = self._turn(todo, convs, turn)
            for r, o in zip(todo, outs):
                if o is not None:
                    r["_drafts"].append(o[0])
                    r["draft_s"] += o[2]
            turn += 1
            todo = [r for r in todo if not r["error"] and turn < len(json.loads(r["turns"]))]
        for r in rows:
            if "_drafts" in r:
                if not r["error"]:
                    r["drafts"] = json.dumps(r["_drafts"])
                del r["_drafts"]
        return pd.DataFrame(rows, columns=list(batch.columns) + (["draft_s"] if "draft_s" not in batch else []))


OUTPUT_COLUMNS = ["id", "prompt", "draft", "aligned", "turns", "draft_turns", "aligned_turns", "history", "meta",
                  "mode", "passes", "new_tokens", "tokens_per_pass", "tokens_computed", "converged", "stop",
                  "draft_s", "refine_s", "error"]


def output_row(r: dict, mode: str, aligned: list[str] | None = None, results=None, refine_s: float = 0.0) -> dict:
    """One output row with every column typed the same way in every file (no all-null columns)."""
    turns = json.loads(r["turns"]) if r["turns"] else []
    drafts = json.loads(r["drafts"]) if r.get("drafts") else []
    results = results or []
    passes = sum(x.passes for x in results)
    new = sum(x.new_tokens for x in results)
    return {
        "id": str(r["id"]), "prompt": turns[0] if turns else "", "draft": drafts[0] if drafts else "",
        "aligned": aligned[0] if aligned else "", "turns": r["turns"] or "[]", "draft_turns": json.dumps(drafts),
        "aligned_turns": json.dumps(aligned or []), "history": r.get("history") or "[]", "meta": r.get("meta") or "{}",
        "mode": mode, "passes": int(passes), "new_tokens": int(new),
        "tokens_per_pass": float(new / passes) if passes else 0.0,
        "tokens_computed": int(sum(x.tokens_computed for x in results)),
        "converged": bool(results) and all(x.converged for x in results),
        "stop": ",".join(x.stop for x in results), "draft_s": _num(r.get("draft_s")),
        "refine_s": float(refine_s), "error": r["error"] or "",
    }


def _num(x) -> float:
    return 0.0 if x is None or x != x else float(x)  # None and NaN (a column pandas filled) are 0


class RefineStage:
    """Refines every turn's draft with the aligner; rows that cannot be refined become error rows."""

    def __init__(self, st: dict, threads: int):
        import torch

        from pipeline.models import load_model
        from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE
        from pipeline.decoding.refiner import Refiner

        torch.set_num_threads(threads)
        lm = load_model(st["model"], **_model_kwargs(st))
        if st.get("knobs"):  # alignment vectors: the aligner's weights become θ + Σ λ·AV, once
            from pipeline.vectors.knobs import load_knobbed

            load_knobbed(lm, {n: expand(p) for n, p in st["vectors"].items() if n in st["knobs"]},
                         cache_size=0).apply(dict(st["knobs"]))
        self.mode = st["mode"] + ("+in_context" if st["in_context"] else "")
        self.refiner = Refiner(lm, refine_settings(st), mode=st["mode"], in_context=st["in_context"],
                               template=st["template"] or DEFAULT_CORRECTION_TEMPLATE,
                               prompt_lookup=st["prompt_lookup"])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from pipeline.records import conversation
        from pipeline.decoding.refiner import RefineRequest

        rows = batch.to_dict("records")
        jobs = []  # (row index, turn, item)
        for i, r in enumerate(rows):
            if r["error"]:
                continue
            drafts = json.loads(r["drafts"])
            try:
                for k in range(len(json.loads(r["turns"]))):
                    key = str(r["id"]) if k == 0 else f"{r['id']}#{k}"  # turn 0: same r as the library
                    req = RefineRequest(conversation(r, k, drafts), drafts[k], key=key)
                    jobs.append((i, k, self.refiner.encode(req)))
            except ValueError as e:
                r["error"] = f"refine stage: {e}"
                jobs = [j for j in jobs if j[0] != i]
        t0 = time.perf_counter()
        try:
            results = self.refiner.refine_items([j[2] for j in jobs])
        except Exception:  # noqa: BLE001 - isolate the row that breaks the batch
            results = []
            for i, _, item in jobs:
                try:
                    results.append(self.refiner.refine_items([item])[0])
                except Exception as e:  # noqa: BLE001
                    rows[i]["error"] = f"refine stage: {type(e).__name__}: {e}"
                    results.append(None)
        dt = time.perf_counter() - t0
        per_row: dict[int, list] = {}
        for (i, _, _), res in zip(jobs, results):
            per_row.setdefault(i, []).append(res)
        out = []
        for i, r in enumerate(rows):
            res = per_row.get(i)
            if r["error"] or not res or any(x is None for x in res):
                out.append(output_row(r, self.mode))
            else:
                out.append(output_row(r, self.mode, [x.text for x in res], res, refine_s=dt * len(res) / max(1, len(jobs))))
        return pd.DataFrame(out, columns=OUTPUT_COLUMNS)


def parse_file(row: dict, fmt: str, id_field, drafts_by_key) -> list[dict]:
    from pipeline.records import error_row, normalize, parse_json_array, parse_lines

    path, data = row["path"], row["bytes"]
    if path.endswith(".gz"):
        import gzip

        data, path = gzip.decompress(data), path[:-3]
    src = os.path.basename(path)
    parse = parse_json_array if path.endswith(".json") else parse_lines
    out = []
    for rec, fid, err in parse(data, src):
        out.append(error_row(fid, err) if err else normalize(rec, fid, fmt, id_field, drafts_by_key))
    return out


def parse_parquet_batch(batch: pd.DataFrame, fmt: str, id_field, drafts_by_key) -> pd.DataFrame:
    from pipeline.records import error_row, normalize, plain_value

    out = []
    for n, rec in enumerate(batch.to_dict("records")):
        try:
            rec = {k: plain_value(v) for k, v in rec.items()}
        except UnicodeDecodeError as e:
            out.append(error_row(rec.get(id_field or "id", f"row{n}"), f"field is not valid UTF-8 ({e.reason})"))
            continue
        out.append(normalize(rec, f"row{n}", fmt, id_field, drafts_by_key))
    return pd.DataFrame(out, columns=["id", "history", "turns", "drafts", "meta", "error"])


def read_inputs(files: list[str], fmt: str, id_field, drafts_by_key):
    """A Ray Dataset of normalized rows (or error rows) from JSONL/JSON(.gz) and Parquet input files."""
    import ray

    kw = dict(fmt=fmt, id_field=id_field, drafts_by_key=drafts_by_key)
    js = [f for f in files if not f.endswith(".parquet")]
    pq_files = [f for f in files if f.endswith(".parquet")]
    pieces = []
    if js:
        pieces.append(ray.data.read_binary_files(js, include_paths=True).flat_map(parse_file, fn_kwargs=kw))
    if pq_files:
        pieces.append(ray.data.read_parquet(pq_files).map_batches(parse_parquet_batch, batch_format="pandas",
                                                                  fn_kwargs=kw))
    return pieces[0] if len(pieces) == 1 else pieces[0].union(*pieces[1:])


# ---- resume and finalize ----------------------------------------------------------------------------
def done_ids(parts: Path) -> set[str]:
    """Ids already written by an earlier run; unreadable (half-written) part files are removed."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for f in sorted(parts.glob("*.parquet")):
        try:
            col = pq.read_table(f, columns=["id"]).column("id").to_pylist()
        except Exception:  # noqa: BLE001 - a file cut short by a kill has no footer
            print(f"[align_dataset] removing incomplete part {f.name} (its rows will be redone)")
            f.unlink()
            continue
        ids.update(col)
    return ids


def finalize(cfg, out: Path, parts: Path, rows_in: int, started: float, processed_now: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(parts.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    df = table.to_pandas() if table is not None else pd.DataFrame(columns=OUTPUT_COLUMNS)
    dup = df["id"][df["id"].duplicated()].tolist()
    if dup:
        raise RuntimeError(f"internal error: ids written twice: {dup[:5]}")
    ok, bad = df[df["error"] == ""], df[df["error"] != ""]
    ok = ok.sort_values("id", key=lambda s: s.map(_sort_key)).reset_index(drop=True)
    if cfg.output.format == "parquet":
        ok.drop(columns=["error"]).to_parquet(out / "aligned.parquet", index=False)
    else:
        ok.drop(columns=["error"]).to_json(out / "aligned.jsonl", orient="records", lines=True, force_ascii=False)
    with open(out / "errors.jsonl", "w") as f:
        for r in bad.to_dict("records"):
            f.write(json.dumps({"id": r["id"], "error": r["error"], "prompt": r["prompt"]}, ensure_ascii=False) + "\n")
    if cfg.output.fastchat_answers:
        with open(out / "fastchat_answers.jsonl", "w") as f:
            for r in ok.to_dict("records"):
                qid = int(r["id"]) if str(r["id"]).isdigit() else r["id"]
                f.write(json.dumps({"question_id": qid, "answer_id": f"{cfg.output.model_id}-{r['id']}",
                                    "model_id": cfg.output.model_id,
                                    "choices": [{"index": 0, "turns": json.loads(r["aligned_turns"])}],
                                    "tstamp": time.time()}, ensure_ascii=False) + "\n")
    if cfg.output.alpaca_eval_outputs:
        recs = [{"instruction": r["prompt"], "output": r["aligned"], "generator": cfg.output.model_id,
                 **({"dataset": json.loads(r["meta"])["dataset"]} if "dataset" in json.loads(r["meta"]) else {})}
                for r in ok.to_dict("records")]
        (out / "alpaca_eval_outputs.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False))
    wall = time.perf_counter() - started
    summary = {
        "rows_in": rows_in, "rows_out": len(ok), "error_rows": len(bad),
        "rows_processed_this_run": processed_now, "wall_s": round(wall, 2),
        "rows_per_s": round(processed_now / wall, 4) if wall > 0 else 0.0,
        "mean_passes": round(float(ok["passes"].mean()), 2) if len(ok) else 0.0,
        "tokens_per_pass": round(float(ok["new_tokens"].sum() / max(1, ok["passes"].sum())), 3) if len(ok) else 0.0,
        "converged_fraction": round(float(ok["converged"].mean()), 4) if len(ok) else 0.0,
        "mean_refine_s": round(float(ok["refine_s"].mean()), 3) if len(ok) else 0.0,
        "mean_draft_s": round(float(ok["draft_s"].mean()), 3) if len(ok) else 0.0,
        "mode": cfg.aligner.mode + ("+in_context" if cfg.aligner.in_context else ""),
        "output": str(out / f"aligned.{cfg.output.format}"), "errors": str(out / "errors.jsonl"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary, ok


def _sort_key(x: str):
    return (0, int(x), "") if str(x).isdigit() else (1, 0, str(x))


# ---- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml", argv)
    validate(cfg)
    out = Path(expand(cfg.output.path))
    parts = out / "_parts"
    parts.mkdir(parents=True, exist_ok=True)

    import ray

    start_data_job("align_dataset", cfg, out, preserve_order=cfg.input.limit is not None)

    from pipeline.records import load_drafts

    files = input_files(cfg.input.path)
    drafts_by_key = load_drafts(expand(cfg.input.drafts_path)) if cfg.input.drafts_path else None
    fmt, id_field = cfg.input.format, cfg.input.id_field
    parsed = read_inputs(files, fmt, id_field, drafts_by_key)
    if cfg.input.limit:
        parsed = parsed.limit(cfg.input.limit)
    parsed = parsed.materialize()  # prompts are small; counting and the duplicate check need them all

    ids = parsed.select_columns(["id"]).to_pandas()["id"]
    dups = ids[ids.duplicated()].unique().tolist()
    if dups:
        raise ConfigError([f"input has duplicate ids (resume and outputs need unique ids): {dups[:10]}"
                           + (" ..." if len(dups) > 10 else "") + "; set input.id_field to a unique field"])
    rows_in = len(ids)
    done = done_ids(parts)
    todo = parsed.filter(lambda r: r["id"] not in done) if done else parsed
    n_todo = rows_in - len(done & set(ids))
    print(f"[align_dataset] {rows_in} input rows, {rows_in - n_todo} already done in {parts}, {n_todo} to do",
          flush=True)

    if n_todo:
        needs_drafts = todo.filter(lambda r: not r["error"] and not r["drafts"]).count() > 0
        preflight_resources(cfg, needs_drafts)
        ds = todo.repartition(target_num_rows_per_block=cfg.output.rows_per_file)
        threads = cfg.ray.torch_threads
        if needs_drafts:
            b = cfg.base
            ds = ds.map_batches(DraftStage, batch_format="pandas", batch_size=b.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=b.concurrency),
                                num_cpus=b.num_cpus, num_gpus=b.num_gpus or None,
                                fn_constructor_kwargs=dict(st=OmegaConf.to_container(b), threads=threads))
        a = cfg.aligner
        ds = ds.map_batches(RefineStage, batch_format="pandas", batch_size=a.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=a.concurrency),
                            num_cpus=a.num_cpus, num_gpus=a.num_gpus or None,
                            fn_constructor_kwargs=dict(st=OmegaConf.to_container(a), threads=threads))
        ds.write_parquet(str(parts))

    summary, ok = finalize(cfg, out, parts, rows_in, started, n_todo)
    print("[align_dataset] summary:\n" + json.dumps(summary, indent=2), flush=True)
    for r in ok.head(cfg.show_samples).to_dict("records"):
        print(f"\n--- id {r['id']} ---\nPROMPT : {r['prompt'][:200]}\nDRAFT  : {r['draft'][:300]}\n"
              f"ALIGNED: {r['aligned'][:300]}")
    print(f"\n[align_dataset] aligned rows: {summary['output']}\n[align_dataset] error rows:   {summary['errors']}")
    return summary


if __name__ == "__main__":
    run_job("align_dataset")
