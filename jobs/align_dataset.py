"""Align a whole dataset with Ray Data: read -> (draft with the base model) -> refine with the aligner -> write.

    python -m jobs.align_dataset                                   # embedded default: demo prompts, SmolLM2
    python -m jobs.align_dataset input.path=prompts.jsonl aligner.engine=reference base.engine=hf
    python -m jobs.align_dataset --help                            # every key, its default and what it does
    ray job submit --working-dir . -- python -m jobs.align_dataset ray.address=auto input.path=/data/x.parquet

Outputs in `output.path`:
  aligned.parquet|jsonl   one row per input row that could be processed (`OUTPUT_SCHEMA`)
  errors.jsonl            every other row, with the reason
  summary.json, config.yaml, and optionally fastchat_answers.jsonl / alpaca_eval_outputs.json
  _parts/                 what Ray Data wrote so far: a killed job rerun with the same output path skips the ids
                          found there and never writes a row twice.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from jobs.common import data, vllm_stages
from jobs.common.config import (AlignerCfg, DataRayCfg, DraftCfg, Section, VllmAlignerCfg, VllmDraftCfg, expand,
                                load_config)
from jobs.common.data import InputCfg
from jobs.common.runtime import run_job
from jobs.common.stages import DraftStage, load_aligner, make_refiner, refine_turns
from pipeline.config.stages import JACOBI_ENGINES
from pipeline.decoding.draft_prefix import needs_full_draft
from pipeline.records import META, MESSAGE, ROW_SCHEMA, error_row, normalize


# ---- config schema ---------------------------------------------------------------------------------------
class OutputCfg(Section):
    path: str = "outputs/align_dataset"
    format: Literal["parquet", "jsonl"] = Field("parquet", description="aligned rows; errors go to errors.jsonl")
    fastchat_answers: bool = Field(False, description="also write fastchat_answers.jsonl (MT-bench answer format)")
    alpaca_eval_outputs: bool = Field(False, description="also write alpaca_eval_outputs.json (AlpacaEval format)")
    model_id: str = Field("diffpo-aligned", description="model name written into those exports")
    rows_per_file: int = Field(4, ge=1, description="rows per part file: the unit a killed job redoes")


class AlignDatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: InputCfg = Field(default_factory=InputCfg)
    output: OutputCfg = Field(default_factory=OutputCfg)
    base: DraftCfg = Field(default_factory=VllmDraftCfg, description="drafts rows that have none")
    aligner: AlignerCfg = Field(default_factory=VllmAlignerCfg)
    ray: DataRayCfg = Field(default_factory=DataRayCfg)
    show_samples: int = Field(3, ge=0, description="draft vs aligned samples printed at the end")


# ---- rows ------------------------------------------------------------------------------------------------
DRAFTED_SCHEMA = pa.schema(list(ROW_SCHEMA) + [pa.field("draft_s", pa.float64()), pa.field("draft_prefix", pa.bool_()),
                                                pa.field("draft_tokens", pa.int64())])
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("draft", pa.string()), ("aligned", pa.string()),
    ("turns", pa.list_(pa.string())), ("draft_turns", pa.list_(pa.string())),
    ("aligned_turns", pa.list_(pa.string())), ("history", pa.list_(MESSAGE)), ("meta", META),
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

    def process(self, rows: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        results = refine_turns(self.refiner, rows, self.row_timeout_s)
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
                "aligned_turns": aligned, "history": r["history"], "meta": r["meta"], "mode": self.mode,
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


# ---- finalize --------------------------------------------------------------------------------------------
def engine_summary(ok: list[dict]) -> dict:
    """What the engines computed, over the aligned rows: each statistic over the rows whose engine computes it,
    and absent when no row's did (a vllm or ar run has no Jacobi statistic, a fast or reference run no
    mean_generated_tokens).

    mean_passes, tokens_per_pass, converged_fraction: Jacobi passes per row, answer tokens per pass, the fraction
    of rows whose every block reached its fixed point (rows a Jacobi engine refined); mean_generated_tokens:
    tokens a greedy-continuation engine (ar, vllm) generated per row; mean_refine_s, mean_draft_s: every row;
    rows_by_mode: how many rows each engine refined (a rerun with another engine finishes what a killed run
    started: the statistics then cover each engine's rows)."""
    n = len(ok)
    mean = lambda k: round(sum(r[k] for r in ok) / n, 3) if n else 0.0  # noqa: E731
    jac = [r for r in ok if r["passes"] is not None]
    gen = [r for r in ok if r["generated_tokens"] is not None]
    passes = sum(r["passes"] for r in jac)
    jacobi = {"mean_passes": round(passes / len(jac), 2),
              "tokens_per_pass": round(sum(r["new_tokens"] for r in jac) / max(1, passes), 3),
              "converged_fraction": round(sum(bool(r["converged"]) for r in jac) / len(jac), 4)} if jac else {}
    generated = {"mean_generated_tokens": round(sum(r["generated_tokens"] for r in gen) / len(gen), 2)} if gen else {}
    return {
        **jacobi, **generated,
        "mean_refine_s": mean("refine_s"), "mean_draft_s": mean("draft_s"), "mean_draft_tokens": mean("draft_tokens"),
        "rows_by_mode": {m: sum(r["mode"] == m for r in ok) for m in sorted({r["mode"] for r in ok})},
    }


def finalize(cfg: AlignDatasetConfig, out: Path, parts: Path, rows_in: int, started: float, processed: int):
    rows = data.sorted_rows(data.read_parts(parts), OUTPUT_SCHEMA)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"internal error: ids written twice: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    ok, bad = [r for r in rows if not r["error"]], [r for r in rows if r["error"]]
    path = out / f"aligned.{cfg.output.format}"
    data.write_table(ok, OUTPUT_SCHEMA.remove(OUTPUT_SCHEMA.get_field_index("error")), path)
    data.write_jsonl(out / "errors.jsonl", ({"id": r["id"], "error": r["error"], "prompt": r["prompt"]} for r in bad))
    if cfg.output.fastchat_answers:
        data.write_fastchat(out / "fastchat_answers.jsonl", ok, cfg.output.model_id, "aligned_turns")
    if cfg.output.alpaca_eval_outputs:
        data.write_alpaca_eval(out / "alpaca_eval_outputs.json", ok, cfg.output.model_id, "aligned")
    wall = time.perf_counter() - started
    summary = {
        "rows_in": rows_in, "rows_out": len(ok), "error_rows": len(bad), "rows_processed_this_run": processed,
        "wall_s": round(wall, 2), "rows_per_s": round(processed / wall, 4) if wall > 0 else 0.0,
        **engine_summary(ok), "mode": cfg.aligner.label,
        "output": str(path), "errors": str(out / "errors.jsonl"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary, ok


# ---- main ------------------------------------------------------------------------------------------------
def prefix_aligner(cfg: AlignDatasetConfig):
    """The aligner section to draft prefixes for (`base.drafts=as_needed`, a vLLM base whose seeded samples are
    the same whatever their length cap, an aligner that reads only the draft's first r tokens), or None."""
    a = cfg.aligner
    if cfg.base.drafts != "as_needed" or cfg.base.engine != "vllm" or needs_full_draft(a.engine, a.in_context):
        return None
    return a


def run_stages(cfg: AlignDatasetConfig, todo: pa.Table, parts: Path, prefix_for) -> None:
    """draft (rows without drafts) -> refine -> write the parts, for the rows of `todo`."""
    needs_drafts = any(d is None and not e for d, e in zip(todo.column("drafts").to_pylist(),
                                                           todo.column("error").to_pylist()))
    turns = vllm_stages.max_turns(todo)
    data.preflight({"base": cfg.base, "aligner": cfg.aligner} if needs_drafts else {"aligner": cfg.aligner}, turns)
    rows = todo.append_column("draft_s", pa.array([0.0] * todo.num_rows))
    rows = rows.append_column("draft_prefix", pa.array([False] * todo.num_rows))
    ds = data.blocks(rows.append_column("draft_tokens", pa.array([0] * todo.num_rows, pa.int64())),
                     cfg.output.rows_per_file)
    if needs_drafts and cfg.base.engine == "vllm":
        ds = vllm_stages.draft(ds, cfg.base, turns, DRAFTED_SCHEMA, prefix_for=prefix_for)
    elif needs_drafts:
        ds = data.map_stage(ds, DraftStage, cfg.base, base=cfg.base, schema=DRAFTED_SCHEMA,
                            threads=cfg.ray.torch_threads)
    if cfg.aligner.engine == "vllm":
        ds = vllm_stages.refine(ds, cfg.aligner, turns, DRAFTED_SCHEMA)
        ds = ds.map_batches(lambda b: VllmOutputStage(cfg.aligner)(b), batch_format="pyarrow",
                            num_cpus=vllm_stages.REQUEST_CPUS)
    else:
        ds = data.map_stage(ds, RefineStage, cfg.aligner, aligner=cfg.aligner, threads=cfg.ray.torch_threads)
    if prefix_for is not None:  # unwritten, so that the second pass drafts them in full
        ds = ds.map_batches(_settled_only, batch_format="pyarrow", num_cpus=vllm_stages.REQUEST_CPUS)
    data.write_parts(ds, parts)


def _settled_only(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.invert(pc.fill_null(pc.equal(batch.column("error"), vllm_stages.PREFIX_REDO), False)))


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml", argv)
    out = Path(expand(cfg.output.path))
    parts = out / "_parts"
    parts.mkdir(parents=True, exist_ok=True)
    data.start_data_job("align_dataset", cfg, out)

    from pipeline.records import load_drafts

    i = cfg.input
    drafts = load_drafts(str(data.resolve_path(i.drafts_path))) if i.drafts_path else None
    rows = data.read_rows(data.input_files(i.path), lambda rec, fid: normalize(rec, fid, i.format, i.id_field, drafts),
                          error_row, ROW_SCHEMA)
    rows = rows.slice(0, i.limit) if i.limit else rows
    data.check_unique_ids(rows, "set input.id_field to a unique field")
    todo = data.not_done(rows, data.done_ids(parts))
    print(f"[align_dataset] {rows.num_rows} input rows, {rows.num_rows - todo.num_rows} already done in {parts}, "
          f"{todo.num_rows} to do", flush=True)

    processed, prefix_for = todo.num_rows, prefix_aligner(cfg)
    if todo.num_rows:
        run_stages(cfg, todo, parts, prefix_for)
    if prefix_for is not None:  # rows whose drafted prefix did not settle were left unwritten: draft them in full
        again = data.not_done(rows, data.done_ids(parts))
        if again.num_rows:
            print(f"[align_dataset] {again.num_rows} row(s) whose draft prefix did not decide the answer: "
                  "drafting them in full", flush=True)
            run_stages(cfg, again, parts, None)

    summary, ok = finalize(cfg, out, parts, rows.num_rows, started, processed)
    print("[align_dataset] summary:\n" + json.dumps(summary, indent=2), flush=True)
    for r in ok[:cfg.show_samples]:
        print(f"\n--- id {r['id']} ---\nPROMPT : {r['prompt'][:200]}\nDRAFT  : {r['draft'][:300]}\n"
              f"ALIGNED: {r['aligned'][:300]}")
    print(f"\n[align_dataset] aligned rows: {summary['output']}\n[align_dataset] error rows:   {summary['errors']}")
    return summary


if __name__ == "__main__":
    run_job("align_dataset")
