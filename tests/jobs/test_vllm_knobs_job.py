"""Alignment knobs in the batch job on vLLM: `aligner.knobs` for the whole job and each row's own `alignment`, every
row on its setting's LoRA adapter in the same engine pool, each answer the fast Jacobi engine's on the dense merge of
that setting (full rank, fp32); bad knobs are error rows with the reason."""
import json

import pandas as pd
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_job_and_row_knobs_on_vllm_give_the_dense_merges_answers(tmp_path, vllm_tiny, vllm_vectors, ray_local):
    from jobs.align_dataset import main
    from pipeline.decoding.refiner import Refiner, RefineRequest
    from pipeline.decoding.settings import RefineSettings
    from pipeline.models import load_model
    from pipeline.vectors.knobs import load_knobbed

    rows = [{"id": i, "prompt": f"Question {i}?", "draft": f"An answer to {i}, with some words."} for i in range(6)]
    rows[1]["alignment"] = {"two": -0.25}  # on top of the job's one=0.5
    rows[2]["alignment"] = {"one": 0.0}  # the job's knob turned off for this row: the base model
    rows[3]["alignment"] = {"one": 1.0, "two": 0.5}
    rows.append({"id": 6, "prompt": "Q?", "draft": "A.", "alignment": {"three": 1.0}})  # no such vector
    rows.append({"id": 7, "prompt": "Q?", "draft": "A.", "alignment": "concise"})  # not an object
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    s = main([f"input.path={src}", f"output.path={out}", f"aligner.model={vllm_tiny}", "aligner.engine=vllm",
              f"aligner.vectors={json.dumps(vllm_vectors)}", "aligner.knobs={one: 0.5}", "aligner.adapters.rank=null",
              f"aligner.adapters.cache_dir={tmp_path / 'adapters'}", "aligner.num_cpus=0.5",
              "aligner.refine.max_new_tokens=16", "base.engine=hf", "ray.progress_bars=false", "show_samples=0"])
    ok = pd.read_parquet(out / "aligned.parquet").set_index("id")
    errors = {e["id"]: e["error"] for e in map(json.loads, open(out / "errors.jsonl"))}
    assert s["rows_in"] == 8 and len(ok) == 6 and set(errors) == {"6", "7"}
    assert "unknown alignment vector 'three'" in errors["6"] and "alignment must be an object" in errors["7"]
    want = {"0": {"one": 0.5}, "1": {"one": 0.5, "two": -0.25}, "2": {}, "3": {"one": 1.0, "two": 0.5},
            "4": {"one": 0.5}, "5": {"one": 0.5}}
    for rid, knobs in want.items():
        assert dict(ok.loc[rid, "alignment"] or []) == knobs, rid
    lm = load_model(str(vllm_tiny), dtype="float32")
    km = load_knobbed(lm, vllm_vectors, cache_size=0)
    fast = Refiner(lm, RefineSettings(max_new_tokens=16), mode="fast")
    for rid, knobs in want.items():
        km.apply(knobs)
        r = ok.loc[rid]
        req = RefineRequest([{"role": "user", "content": r["prompt"]}], r["draft"], key=rid)
        assert fast.refine([req])[0].text == r["aligned"], f"row {rid} ({knobs}): vLLM adapter == dense merge"
    assert len({ok.loc[i, "aligned"] for i in want}) > 2, "the settings change the answers"
