"""Align a whole dataset with Ray Data: read -> (draft with the base model) -> refine with the aligner -> write.

    python -m jobs.align_dataset                                   # embedded default: demo prompts, SmolLM2
    python -m jobs.align_dataset input.path=prompts.jsonl aligner.engine=reference base.engine=hf
    python -m jobs.align_dataset input.path=s3://bucket/prompts/ output.path=s3://bucket/aligned/
    python -m jobs.align_dataset --help                            # every key, its default and what it does
    ray job submit --working-dir . -- python -m jobs.align_dataset ray.address=auto input.path=/data/x.parquet

Rows stream from storage to storage: Ray's workers read the input files, run the model stages and write the
outputs block by block (`jobs.common.blocks`); the driver holds file and block names, never the rows. Outputs in
`output.path` (a folder or a URI):
  rows/                   the aligned rows, a Parquet dataset: a file per block of the input (`OUTPUT_SCHEMA`)
  errors/                 the rows that could not be processed, with the reason (id, error, prompt)
  summary.json            counts and engine statistics over the whole output; config.yaml
  aligned.parquet|jsonl, errors.jsonl, fastchat_answers.jsonl, alpaca_eval_outputs.json: single-file exports of
                          those folders, streamed (output.single_file, output.fastchat_answers, ...)
A killed job rerun with the same output path lists rows/, skips the blocks written whole and redoes the others.
"""
from __future__ import annotations

import json
import time
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from jobs.common import blocks, data, exports, storage, vllm_stages
from jobs.common.config import (AlignerCfg, DataRayCfg, DraftCfg, JobAlignerCfg, Section, VllmAlignerCfg,
                                VllmDraftCfg, expand, formerly, load_config)
from jobs.common.data import InputCfg
from jobs.common.runtime import run_job
from jobs.common.stages import DraftStage, load_aligner, make_refiner, refine_turns
from pipeline.config.stages import JACOBI_ENGINES
from pipeline.decoding.draft_prefix import needs_full_draft
from pipeline.records import KNOBS, META, MESSAGE, ROW_SCHEMA, error_row, normalize, normalize_table


# ---- config schema ---------------------------------------------------------------------------------------
class OutputCfg(Section):
    path: str = Field("outputs/align_dataset", description="a folder or a URI (s3://, gs://, hdfs://)")
    rows_per_block: int = Field(1000, ge=1, description="input rows per block: a file of the output, the unit a "
                                                        "killed job redoes", json_schema_extra=formerly("rows_per_file"))
    single_file: bool = Field(True, description="also export rows/ and errors/ as aligned.<format> and errors.jsonl "
                                                "(streamed through the driver: for benchmark-sized outputs)")
    format: Literal["parquet", "jsonl"] = Field("parquet", description="of the single-file export")
    fastchat_answers: bool = Field(False, description="also write fastchat_answers.jsonl (MT-bench answer format)")
    alpaca_eval_outputs: bool = Field(False, description="also write alpaca_eval_outputs.json (AlpacaEval format)")
    model_id: str = Field("diffpo-aligned", description="model name written into those exports")


class AlignDatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: InputCfg = Field(default_factory=InputCfg)
    output: OutputCfg = Field(default_factory=OutputCfg)
    base: DraftCfg = Field(default_factory=VllmDraftCfg, description="drafts rows that have none")
    aligner: JobAlignerCfg = Field(default_factory=VllmAlignerCfg, description="refines the drafts (engine=none: "
                                                                               "the drafts are the answers)")
    ray: DataRayCfg = Field(default_factory=DataRayCfg)
    show_samples: int = Field(3, ge=0, description="draft vs aligned samples printed at the end")


# ---- rows ------------------------------------------------------------------------------------------------
DRAFTED_SCHEMA = pa.schema(list(ROW_SCHEMA) + [pa.field("draft_s", pa.float64()), pa.field("draft_prefix", pa.bool_()),
                                                pa.field("draft_tokens", pa.int64())])
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("draft", pa.string()), ("aligned", pa.string()),
    ("turns", pa.list_(pa.string())), ("draft_turns", pa.list_(pa.string())),
    ("aligned_turns", pa.list_(pa.string())), ("history", pa.list_(MESSAGE)), ("meta", META), ("alignment", KNOBS),
    ("mode", pa.string()), ("passes", pa.int64()), ("new_tokens", pa.int64()), ("tokens_per_pass", pa.float64()),
    ("tokens_computed", pa.int64()), ("converged", pa.bool_()), ("generated_tokens", pa.int64()), ("stop", pa.string()),
    ("draft_s", pa.float64()), ("refine_s", pa.float64()), ("draft_prefix", pa.bool_()), ("draft_tokens", pa.int64()),
    ("error", pa.string())])
# What each engine tells about a row, and nothing else: the Jacobi engines (fast, reference) fill passes,
# tokens_per_pass and converged, and leave generated_tokens null; the greedy-continuation engines (ar, vllm) run no
# Jacobi iteration, so those three are null and generated_tokens (tokens the engine generated, stop tokens
# included, summed over turns) is set. new_tokens, tokens_computed, stop and refine_s: every engine. draft_tokens: the
# base tokens drafted for the row (0 for given drafts); draft_prefix: its last turn's draft is only the prefix the
# aligned answer depends on (base.drafts=as_needed before an aligner on vllm or ar, docs/decoding.md).


class RefineStage(data.RowStage):
    """Refines every turn's draft with the aligner on a Hugging Face engine (all turns of the batch in one call)."""

    name = "refine stage"
    schema = OUTPUT_SCHEMA

    def __init__(self, aligner: AlignerCfg, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.refiner = make_refiner(load_aligner(aligner), aligner)
        self.row_timeout_s = aligner.row_timeout_s
        self.mode, self.jacobi = aligner.label, aligner.engine in JACOBI_ENGINES
        self.knobs = {n: float(x) for n, x in aligner.knobs.items() if x} or None  # applied to the whole job

    def process(self, rows: list[dict]) -> list[dict]:
        # the HF engines run the job's knobs (merged once); a row's own setting needs vLLM's adapters
        bad = {}
        for i, r in enumerate(rows):
            own = {n: x for n, x in ((self.knobs or {}) | dict(r.get("alignment") or {})).items() if x} or None
            if own != self.knobs:
                bad[i] = (f"alignment {dict(r['alignment'])}: a row's own knobs run on aligner.engine=vllm (a LoRA "
                          "adapter per setting); the HF engines apply aligner.knobs to the whole job")
            r["alignment"] = self.knobs
        good = [r for i, r in enumerate(rows) if i not in bad]
        t0 = time.perf_counter()
        done = iter(refine_turns(self.refiner, good, self.row_timeout_s) if good else [])
        results = [bad[i] if i in bad else next(done) for i in range(len(rows))]
        per_turn = (time.perf_counter() - t0) / max(1, sum(len(x) for x in results if isinstance(x, list)))
        return [self.output(r, res, per_turn) for r, res in zip(rows, results)]

    def passthrough(self, row: dict) -> dict:
        return self.output(row, [], 0.0)

    def output(self, r: dict, res: list | str, per_turn_s: float) -> dict:
        if isinstance(res, str):
            r, res = dict(r, error=f"{self.name}: {res}"), []
        drafts, aligned = r.get("drafts") or [], [x.text for x in res]
        new = sum(x.new_tokens for x in res)
        # only what the engine computed (see OUTPUT_SCHEMA); a row without results: as the stage's engine would
        jacobi = all(x.jacobi for x in res) if res else self.jacobi
        passes = sum(x.passes for x in res) if jacobi else None
        return {"id": r["id"], "prompt": r["turns"][0] if r["turns"] else "", "draft": drafts[0] if drafts else "",
                "aligned": aligned[0] if aligned else "", "turns": r["turns"], "draft_turns": drafts,
                "aligned_turns": aligned, "history": r["history"], "meta": r["meta"],
                "alignment": dict(r["alignment"]) if r.get("alignment") else None, "mode": self.mode,
                "passes": passes, "new_tokens": new,
                "tokens_per_pass": (new / passes if passes else 0.0) if jacobi else None,
                "tokens_computed": sum(x.tokens_computed for x in res),
                "converged": (bool(res) and all(x.converged for x in res)) if jacobi else None,
                "generated_tokens": None if jacobi else sum(x.generated_tokens or 0 for x in res),
                "stop": ",".join(x.stop for x in res), "draft_prefix": bool(r.get("draft_prefix")),
                "draft_tokens": r.get("draft_tokens") or 0,
                "draft_s": r.get("draft_s") or 0.0, "refine_s": per_turn_s * len(res), "error": r.get("error")}


class VllmOutputStage(RefineStage):
    """The output rows of the aligner's vLLM stage (`vllm_stages.refine`): its per-turn results, written as
    RefineStage writes the HF engines' (refine_s = the engine's seconds on the row)."""

    def __init__(self, aligner: AlignerCfg):
        self.mode, self.jacobi = aligner.label, False

    def process(self, rows: list[dict]) -> list[dict]:
        results = [vllm_stages.as_results(r["refined"]) for r in rows]
        return [self.output(r, res, 0.0) | {"refine_s": sum(x.wall_s for x in res)} for r, res in zip(rows, results)]


def no_aligner(batch: pa.Table) -> pa.Table:
    """`aligner.engine=none`: the output rows with the drafts as the answers, computed column-wise (no model runs;
    the plumbing alone is what `benchmarks/bench_scale.py` compares with a plain Ray Data pipeline). A row with
    its own alignment knobs becomes an error row: no aligner runs to apply them."""
    n = batch.num_rows
    strings = pa.list_(pa.string())
    error = batch.column("error").combine_chunks()
    knobs = batch.column("alignment").combine_chunks()
    if knobs.null_count < n:  # rows that ask for knobs (rare): checked one by one
        asks = [i for i, k in enumerate(knobs.to_pylist()) if k and any(x for _, x in k) and error[i].as_py() is None]
        if asks:
            reasons = [None] * n
            for i in asks:
                reasons[i] = (f"alignment {dict(knobs[i].as_py())}: aligner.engine=none runs no aligner to apply "
                              "knobs")
            error = pc.coalesce(error, pa.array(reasons, pa.string()))

    def first(lists) -> pa.Array:  # lists[0], or "" for an empty or null list
        some = pc.fill_null(pc.greater(pc.list_value_length(lists), 0), False)
        return pc.list_flatten(pc.if_else(some, pc.list_slice(lists, 0, 1), pa.array([[""]] * n, strings)))

    none = lambda tp: pa.nulls(n, tp)  # noqa: E731
    drafts = pc.if_else(pc.is_null(batch.column("drafts")), pa.array([[]] * n, strings), batch.column("drafts"))
    aligned = pc.if_else(pc.is_null(error), drafts, pa.array([[]] * n, strings))
    zeros = pa.array([0] * n, pa.int64())
    columns = {"id": batch.column("id"), "prompt": first(batch.column("turns")), "draft": first(drafts),
               "aligned": first(aligned), "turns": batch.column("turns"), "draft_turns": drafts,
               "aligned_turns": aligned, "history": batch.column("history"), "meta": batch.column("meta"),
               "alignment": none(KNOBS), "mode": pa.array(["none"] * n), "passes": none(pa.int64()),
               "new_tokens": zeros, "tokens_per_pass": none(pa.float64()), "tokens_computed": zeros,
               "converged": none(pa.bool_()), "generated_tokens": none(pa.int64()), "stop": pa.array([""] * n),
               "draft_s": batch.column("draft_s"), "refine_s": pa.array([0.0] * n),
               "draft_prefix": batch.column("draft_prefix"), "draft_tokens": batch.column("draft_tokens"),
               "error": error}
    out = pa.Table.from_arrays([columns[f.name] for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)
    return blocks.with_keys(out, batch)


# ---- summary ---------------------------------------------------------------------------------------------
STAT_COLUMNS = ["mode", "passes", "new_tokens", "converged", "generated_tokens", "refine_s", "draft_s", "draft_tokens"]


def _sum(col) -> float:
    return pc.sum(col).as_py() or 0


def row_stats(ok: pa.Table) -> dict:
    """What the summary adds up over the aligned rows of a piece of the output (`BlockSink`'s `stats`)."""
    jac = ok.filter(pc.invert(pc.is_null(ok.column("passes"))))
    gen = ok.filter(pc.invert(pc.is_null(ok.column("generated_tokens"))))
    modes = pc.value_counts(ok.column("mode")).to_pylist() if ok.num_rows else []
    return {"jacobi_rows": jac.num_rows, "passes": _sum(jac.column("passes")),
            "jacobi_new_tokens": _sum(jac.column("new_tokens")),
            "converged_rows": _sum(pc.cast(pc.fill_null(jac.column("converged"), False), pa.int64())),
            "generated_rows": gen.num_rows, "generated_tokens": _sum(gen.column("generated_tokens")),
            "refine_s": _sum(ok.column("refine_s")), "draft_s": _sum(ok.column("draft_s")),
            "draft_tokens": _sum(ok.column("draft_tokens")),
            "rows_by_mode": {m["values"]: m["counts"] for m in modes}}


def engine_summary(t: dict) -> dict:
    """What the engines computed, over the aligned rows (`t`: `row_stats` summed over the output): each statistic
    over the rows whose engine computes it, and absent when no row's did (a vllm or ar run has no Jacobi
    statistic, a fast or reference run no mean_generated_tokens).

    mean_passes, tokens_per_pass, converged_fraction: Jacobi passes per row, answer tokens per pass, the fraction
    of rows whose every block reached its fixed point (rows a Jacobi engine refined); mean_generated_tokens:
    tokens a greedy-continuation engine (ar, vllm) generated per row; mean_refine_s, mean_draft_s: every row;
    rows_by_mode: how many rows each engine refined (a rerun with another engine finishes what a killed run
    started: the statistics then cover each engine's rows)."""
    n = t.get("rows_out", 0)
    mean = lambda k: round(t.get(k, 0) / n, 3) if n else 0.0  # noqa: E731
    jac, gen, passes = t.get("jacobi_rows", 0), t.get("generated_rows", 0), t.get("passes", 0)
    jacobi = {"mean_passes": round(passes / jac, 2),
              "tokens_per_pass": round(t.get("jacobi_new_tokens", 0) / max(1, passes), 3),
              "converged_fraction": round(t.get("converged_rows", 0) / jac, 4)} if jac else {}
    generated = {"mean_generated_tokens": round(t.get("generated_tokens", 0) / gen, 2)} if gen else {}
    return {**jacobi, **generated, "mean_refine_s": mean("refine_s"), "mean_draft_s": mean("draft_s"),
            "mean_draft_tokens": mean("draft_tokens"), "rows_by_mode": dict(sorted(t.get("rows_by_mode", {}).items()))}


def export(cfg: AlignDatasetConfig, out: str) -> dict[str, str]:
    """The single-file exports of rows/ and errors/ that the config asks for (streamed, a block at a time)."""
    o, files = cfg.output, {}
    rows, errors = storage.join(out, "rows"), storage.join(out, "errors")
    writers = []
    if o.single_file:
        files["output_file"] = storage.join(out, f"aligned.{o.format}")
        writers.append(exports.table_writer(files["output_file"], OUTPUT_SCHEMA.remove(OUTPUT_SCHEMA.get_field_index("error"))))
    if o.fastchat_answers:
        files["fastchat_answers"] = storage.join(out, "fastchat_answers.jsonl")
        writers.append(exports.fastchat_writer(files["fastchat_answers"], o.model_id, "aligned_turns"))
    if o.alpaca_eval_outputs:
        files["alpaca_eval_outputs"] = storage.join(out, "alpaca_eval_outputs.json")
        writers.append(exports.alpaca_eval_writer(files["alpaca_eval_outputs"], o.model_id, "aligned"))
    exports.stream(rows, writers)
    if o.single_file:
        files["errors_file"] = storage.join(out, "errors.jsonl")
        exports.stream(errors, [exports.table_writer(files["errors_file"], None)])
    return files


# ---- main ------------------------------------------------------------------------------------------------
def prefix_aligner(cfg: AlignDatasetConfig):
    """The aligner section to draft prefixes for (`base.drafts=as_needed`, a vLLM base whose seeded samples are
    the same whatever their length cap, an aligner that reads only the draft's first r tokens), or None."""
    a = cfg.aligner
    if (cfg.base.drafts != "as_needed" or cfg.base.engine != "vllm" or a.engine == "none"
            or needs_full_draft(a.engine, a.in_context)):
        return None
    return a


def task_cpus(cfg: AlignDatasetConfig, info: blocks.InputInfo) -> float:
    """CPUs per read / column / write task: a fraction beside model stages (they must fit next to the actor pools),
    whole CPUs when no model runs (aligner.engine=none, every row drafted): as many tasks as CPUs, none waiting."""
    return blocks.SCAN_CPUS if cfg.aligner.engine == "none" and not info.to_draft else blocks.READ_CPUS


def run_stages(cfg: AlignDatasetConfig, todo, info: blocks.InputInfo, out: str, prefix_for) -> dict:
    """draft (rows without drafts) -> refine -> write the blocks, for the rows of `todo`; returns the sink's totals
    (file -> stats). The stages on vLLM share the job's engine pools (`vllm_stages.Engines`), one per model."""
    draft_on_vllm = info.to_draft and cfg.base.engine == "vllm"
    pools = {"base": cfg.base} if info.to_draft else {}
    data.preflight(pools | ({"aligner": cfg.aligner} if cfg.aligner.engine != "none" else {}),
                   info.turns + (prefix_for is not None))
    on_vllm = ([cfg.base] if draft_on_vllm else []) + ([cfg.aligner] if cfg.aligner.engine == "vllm" else [])
    with vllm_stages.Engines("align", on_vllm) as engines:
        ds = todo.map_batches(_draft_columns, batch_format="pyarrow", num_cpus=task_cpus(cfg, info))
        schema = blocks.keyed(DRAFTED_SCHEMA)
        if draft_on_vllm:
            ds = vllm_stages.draft(ds, engines, cfg.base, info.turns, schema, prefix_for=prefix_for)
        elif info.to_draft:
            ds = data.map_stage(ds, DraftStage, cfg.base, base=cfg.base, schema=DRAFTED_SCHEMA,
                                threads=cfg.ray.torch_threads)
        if cfg.aligner.engine == "none":
            ds = ds.map_batches(no_aligner, batch_format="pyarrow", num_cpus=task_cpus(cfg, info))
        elif cfg.aligner.engine == "vllm":
            ds = vllm_stages.refine(ds, engines, cfg.aligner, info.turns, schema)
            ds = ds.map_batches(_vllm_output, batch_format="pyarrow", num_cpus=vllm_stages.REQUEST_CPUS,
                                fn_kwargs={"aligner": cfg.aligner})
        else:
            ds = data.map_stage(ds, RefineStage, cfg.aligner, aligner=cfg.aligner, threads=cfg.ray.torch_threads)
        sink = blocks.BlockSink(storage.join(out, "rows"), storage.join(out, "errors"),
                                OUTPUT_SCHEMA.remove(OUTPUT_SCHEMA.get_field_index("error")), ERROR_COLUMNS, row_stats)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": max(data.WRITE_CPUS, task_cpus(cfg, info))})
    return sink.totals


def _vllm_output(batch: pa.Table, aligner: AlignerCfg) -> pa.Table:
    return VllmOutputStage(aligner)(batch)


ERROR_COLUMNS = ["id", "error", "prompt"]


def _draft_columns(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return (batch.append_column("draft_s", pa.array([0.0] * n)).append_column("draft_prefix", pa.array([False] * n))
            .append_column("draft_tokens", pa.array([0] * n, pa.int64())))


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml", argv)
    out = expand(cfg.output.path)
    data.start_data_job("align_dataset", cfg, out)

    i = cfg.input
    parser = blocks.Parser(lambda rec, fid, drafts: normalize(rec, fid, i.format, i.id_field, drafts), error_row,
                           ROW_SCHEMA, cfg.output.rows_per_block,
                           lookup=blocks.drafts_table(i.drafts_path) if i.drafts_path else None,
                           columnar=lambda t: normalize_table(t, i.format, i.id_field))
    job = blocks.BlockJob("align_dataset", out, data.input_files(i.path), data.input_root(i.path), parser, i.limit)
    todo, info = job.todo(lambda info: task_cpus(cfg, info))
    totals = run_stages(cfg, todo, info, out, prefix_aligner(cfg)) if info.rows else {}
    totals = job.finish(totals, STAT_COLUMNS, row_stats)

    files = export(cfg, out)
    wall = time.perf_counter() - started
    summary = {
        "rows_in": totals["rows_in"], "rows_out": totals.get("rows_out", 0), "error_rows": totals.get("error_rows", 0),
        "rows_processed_this_run": job.processed, "blocks": totals["blocks"], "duplicate_ids": totals["duplicate_ids"],
        "wall_s": round(wall, 2),
        "rows_per_s": round(job.processed / wall, 4) if wall > 0 else 0.0,
        **engine_summary(totals), "mode": cfg.aligner.label,
        "rows": storage.display(storage.join(out, "rows")), "errors": storage.display(storage.join(out, "errors")),
        **{k: storage.display(v) for k, v in files.items()},
    }
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    print("[align_dataset] summary:\n" + json.dumps(summary, indent=2), flush=True)
    for r in exports.first_rows(storage.join(out, "rows"), cfg.show_samples):
        print(f"\n--- id {r['id']} ---\nPROMPT : {r['prompt'][:200]}\nDRAFT  : {r['draft'][:300]}\n"
              f"ALIGNED: {r['aligned'][:300]}")
    print(f"\n[align_dataset] aligned rows: {summary['rows']}"
          + (f" (and {summary['output_file']})" if "output_file" in summary else "")
          + f"\n[align_dataset] error rows:   {summary['errors']}"
          + (f" (and {summary['errors_file']})" if "errors_file" in summary else ""))
    return summary


if __name__ == "__main__":
    run_job("align_dataset")
