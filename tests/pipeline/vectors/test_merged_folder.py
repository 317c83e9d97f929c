"""A fixed knob setting for engines that load weights from disk (vLLM): θ + Σ λ·AV written once as a model folder,
cached by the base's and the vectors' files and the knob values."""
import torch

from pipeline.models import load_model
from pipeline.vectors.knobs import load_knobbed, merged_folder


def test_merged_folder_holds_the_knobbed_weights_and_is_written_once(tmp_path, vector_ckpts):
    c = vector_ckpts["llama"]
    vectors = {"one": str(c["v1"]), "two": str(c["v2"])}
    knobs = {"one": 1.0, "two": -0.5}
    path = merged_folder(str(c["base"]), vectors, knobs, root=tmp_path)
    assert (path / ".complete").exists() and (path / "config.json").exists() and (path / "tokenizer.json").exists()

    lm = load_model(str(c["base"]), dtype="float32")
    load_knobbed(lm, vectors, cache_size=0).apply(knobs)
    merged = load_model(str(path), dtype="float32")
    want, got = lm.model.state_dict(), merged.model.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), "θ + Σ λ·AV, exactly"
    assert merged.stop_ids == lm.stop_ids

    stamp = (path / ".complete").stat().st_mtime_ns
    assert merged_folder(str(c["base"]), vectors, dict(knobs), root=tmp_path) == path, "cached: same setting"
    assert (path / ".complete").stat().st_mtime_ns == stamp, "not written again"
    other = merged_folder(str(c["base"]), vectors, {"one": 0.5}, root=tmp_path)
    assert other != path and (other / ".complete").exists(), "another setting, another folder"
