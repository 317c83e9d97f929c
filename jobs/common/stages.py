"""Model stages that more than one batch job runs: drafting with the base model, refining with the aligner."""
from __future__ import annotations

import pyarrow as pa

from jobs.common.config import AlignerCfg, DraftCfg, as_engine
from jobs.common.data import RowStage, time_budget, timeout_reason


def make_drafter(base: DraftCfg, seed: int | None = None):
    """The `pipeline.decoding.drafting.Drafter` a base section describes (a local model or an endpoint)."""
    from dataclasses import replace

    from pipeline.decoding.drafting import Drafter

    params = base.sampling if seed is None else replace(base.sampling, seed=seed)
    if base.engine == "openai":
        return Drafter(params, endpoint=base.endpoint(base.model), parallel_requests=base.parallel_requests)
    from pipeline.models import load_model

    return Drafter(params, lm=load_model(base.model, dtype=base.dtype, device=base.device,
                                         trust_remote_code=base.trust_remote_code))


def load_aligner(a: AlignerCfg):
    """The aligner model, with the configured alignment-vector knobs applied once (θ + Σ λ·AV)."""
    from pipeline.models import load_model

    lm = load_model(a.model, dtype=a.dtype, device=a.device, trust_remote_code=a.trust_remote_code)
    if a.knobs:
        from pipeline.vectors.knobs import load_knobbed

        load_knobbed(lm, a.knob_vectors(), cache_size=0).apply(dict(a.knobs))
    return lm


def make_refiner(lm, a: AlignerCfg, mode: str | None = None, in_context: bool | None = None):
    """The in-process refiner (a Hugging Face engine: `mode`, else the section's engine) of an aligner section; on
    another engine than the section's, the keys both take carry over (`as_engine`)."""
    from pipeline.decoding.refiner import Refiner
    from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE

    if mode and mode != a.engine:
        a = as_engine(a, mode)
    return Refiner(lm, a.settings(), mode=a.engine, in_context=a.in_context if in_context is None else in_context,
                   template=a.template or DEFAULT_CORRECTION_TEMPLATE, prompt_lookup=getattr(a, "prompt_lookup", 0))


def refine_turns(refiner, rows: list[dict], row_timeout_s: float | None = None) -> list[list | str]:
    """Every turn of every row refined in one engine call, bounded by `row_timeout_s` x len(rows) seconds
    (None: no limit): per row, its results (one per turn) or the reason it could not be refined (longer than
    the aligner's context window; cut off by the time budget)."""
    from pipeline.decoding.refiner import RefineRequest
    from pipeline.records import conversation

    out: list[list | str] = [[] for _ in rows]
    jobs = []  # (row index, encoded item)
    for i, r in enumerate(rows):
        try:
            items = [refiner.encode(RefineRequest(conversation(r, k, r["drafts"]), r["drafts"][k],
                                                  key=str(r["id"]) if k == 0 else f"{r['id']}#{k}"))
                     for k in range(len(r["turns"]))]  # turn 0 is keyed by the id alone, as in the library
        except ValueError as e:
            out[i] = f"{e}"
            continue
        jobs += [(i, it) for it in items]
    results = refiner.refine_items([it for _, it in jobs], max_time=time_budget(row_timeout_s, len(rows)))
    for (i, _), res in zip(jobs, results):
        if isinstance(out[i], list):
            out[i] = timeout_reason(row_timeout_s, len(rows)) if res.stop == "timeout" else out[i] + [res]
    return out


class DraftStage(RowStage):
    """Writes the base model's answers for rows that came without drafts, turn by turn (a later turn's
    conversation holds the earlier drafted answers). Adds `draft_s`, the seconds spent on the row."""

    name = "draft stage"

    def __init__(self, base: DraftCfg, schema: pa.Schema, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.drafter, self.schema, self.row_timeout_s = make_drafter(base), schema, base.row_timeout_s

    def process(self, rows: list[dict]) -> list[dict]:
        from pipeline.records import conversation

        for r in rows:
            r.setdefault("draft_s", 0.0)
        todo = [r for r in rows if r["drafts"] is None]
        answers = {id(r): [] for r in todo}
        turn = 0
        while todo:
            convs = [conversation(r, turn, answers[id(r)]) for r in todo]
            outs = self.drafter.answer(convs, seed_key=",".join(r["id"] for r in todo) + f"#{turn}",
                                       max_time=self.time_budget(len(todo)))
            for r, o in zip(todo, outs):
                if isinstance(o, Exception):
                    r["error"] = f"{self.name}: {type(o).__name__}: {o}"[:1000]
                else:
                    answers[id(r)].append(o[0])
                    r["draft_s"] += o[2]
                    r["draft_tokens"] = (r.get("draft_tokens") or 0) + o[1]
            turn += 1
            todo = [r for r in todo if not r.get("error") and turn < len(r["turns"])]
        for r in rows:
            if id(r) in answers and not r.get("error"):
                r["drafts"] = answers[id(r)]
        return rows
