"""Knob settings as LoRA adapters (`pipeline.vectors.lora`), checked against the dense merge the HF engines use, on
tiny random models through PEFT (the vLLM engine side: tests/serve_app/test_vllm_knobs.py)."""
import json

import pytest
import torch

from pipeline.models import load_model
from pipeline.vectors.extract import Compression, KnobError, VectorError, extract_vector
from pipeline.vectors.knobs import AlignmentVector, load_knobbed
from pipeline.vectors.lora import (AdapterCfg, AdapterStore, adapter_name, combine, engine_lora_kwargs, factor,
                                   parse_name, quantize)
from tests.conftest import moved_copy
from tests.pipeline.vectors.test_vectors import greedy_ids
from tests.tiny import save_tiny

LINEAR_ONLY = ("embed", "norm", "lm_head")  # frozen: a fine-tune that moved only the linear layers (what a LoRA expresses)


@pytest.fixture(scope="module")
def lora_ckpts(tmp_path_factory):
    """A tiny llama base, two linear-only vectors (one dense, one stored at rank 4) and one that moves the norms."""
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny("llama", root / "base")
    out = {"base": base}
    for k, (seed, frozen, comp) in {"one": (1, LINEAR_ONLY, None), "two": (2, LINEAR_ONLY, Compression(rank=4)),
                                    "norms": (3, ("embed",), None)}.items():
        moved = moved_copy(base, root / f"a-{k}", seed, frozen=frozen)
        out[k] = root / f"v-{k}"
        extract_vector(str(base), str(moved), out[k], k, comp, log=lambda *_: None)
    return out


def test_settings_are_quantized_named_by_their_values_and_validated(lora_ckpts, tmp_path):
    store = AdapterStore({"one": str(lora_ckpts["one"]), "two": str(lora_ckpts["two"])}, AdapterCfg(step=0.05),
                         tmp_path, bounds=(-1.0, 2.0))
    key = store.key({"two": -0.2612, "one": 0.5234})
    assert key == (("one", 0.5), ("two", -0.25)) and quantize(key, 0.05) == key
    assert store.key({"one": 0.01}) == (), "a λ under half a step is the base itself"
    assert adapter_name(key) == "av:one=0.5,two=-0.25" and parse_name(adapter_name(key)) == key
    assert store.key_of_name("av:two=-0.2612,one=0.5234") == key
    for bad, why in [({"three": 1.0}, "unknown alignment vector 'three'"), ({"one": float("nan")}, "finite number"),
                     ({"one": 3.0}, "outside the allowed range"), ({"one": True}, "finite number")]:
        with pytest.raises(KnobError, match=why):
            store.key(bad)
    with pytest.raises(KnobError, match="not <vector>=<number>"):
        parse_name("av:one=x")
    assert AdapterCfg(rank=0, step=0).validate() == ["rank must be >= 1 or null (full rank), got 0",
                                                     "step must be a positive number, got 0"]


def test_full_rank_adapter_gives_the_dense_merge_token_for_token(lora_ckpts, tmp_path):
    """rank=None: ΔW = AV @ I exactly; through PEFT the answers are the dense merge's (KnobbedModel) token for token
    and the logits agree to float rounding."""
    from peft import PeftModel

    vectors = {"one": str(lora_ckpts["one"]), "two": str(lora_ckpts["two"])}
    store = AdapterStore(vectors, AdapterCfg(rank=None), tmp_path / "cache", base=str(lora_ckpts["base"]))
    key = store.key({"one": 0.8, "two": -0.5})
    a = store.adapter(key)
    assert a.built and a.dropped_fraction == 0.0 and a.name == "av:one=0.8,two=-0.5"
    cfg = json.loads((a.path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == a.rank and cfg["bias"] == "none"
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    dense = load_model(str(lora_ckpts["base"]))
    base_out = greedy_ids(dense.model, dense.tokenizer)
    load_knobbed(dense, vectors).apply(dict(key))
    want = greedy_ids(dense.model, dense.tokenizer)
    assert want != base_out, "the setting must change the answers, or the test shows nothing"
    lm = load_model(str(lora_ckpts["base"]))
    peft = PeftModel.from_pretrained(lm.model, str(a.path)).eval()
    assert greedy_ids(peft, lm.tokenizer) == want
    ids = torch.tensor([[5, 9, 13, 21, 7, 3]])
    with torch.no_grad():
        gap = (peft(input_ids=ids).logits - dense.model(input_ids=ids).logits).abs().max().item()
    assert gap < 1e-4, f"full-rank adapter logits differ from the dense merge by {gap}"

    again = AdapterStore(vectors, AdapterCfg(rank=None), tmp_path / "cache")  # another process: the folder is reused
    b = again.adapter(key)
    assert not b.built and b.path == a.path


def test_rank_per_domain_bounds_the_error_and_domains_add_up_along_the_rank(lora_ckpts):
    vec = AlignmentVector(lora_ckpts["one"])
    errs = {r: max(factor(vec, r).rel_error.values()) for r in (2, 8, 32)}
    assert errs[2] > errs[8] > errs[32] >= 0 and max(factor(vec, None).rel_error.values()) < 1e-6
    two = factor(AlignmentVector(lora_ckpts["two"]), 8)  # stored at rank 4: its own factors, exact to the vector
    assert {A.shape[1] for A, _ in two.modules.values()} == {4} and max(two.rel_error.values()) < 1e-6
    one = factor(vec, 8)
    modules, r = combine([(one, 0.5), (two, -1.0)])
    assert r == 8 + 4
    mod = "model.layers.0.self_attn.q_proj"
    A, B = modules[mod]
    want = 0.5 * one.modules[mod][0] @ one.modules[mod][1] - two.modules[mod][0] @ two.modules[mod][1]
    assert torch.allclose(A @ B, want, atol=1e-6)


def test_deltas_a_lora_cannot_express_are_dropped_with_their_share_or_refused(lora_ckpts, tmp_path, capsys):
    vectors = {"norms": str(lora_ckpts["norms"])}
    a = AdapterStore(vectors, AdapterCfg(rank=8), tmp_path / "d").adapter((("norms", 1.0),))
    assert 0 < a.dropped_fraction < 1
    assert "leaves out" in capsys.readouterr().out
    info = json.loads((a.path / "diffpo_adapter.json").read_text())
    assert any("norm" in t for t in info["dropped_tensors"])
    with pytest.raises(VectorError, match="a LoRA adapter cannot express"):
        AdapterStore(vectors, AdapterCfg(rank=8, unsupported="refuse"), tmp_path / "r").adapter((("norms", 1.0),))


def test_engine_limits_come_from_the_vectors_metadata(lora_ckpts):
    """vLLM's max_lora_rank is the smallest allowed value that holds a setting of every vector: full rank by default
    (exact; the tiny model's layers have rank 64), a vector stored at rank 4 at its own rank; past 512, a clear no."""
    vectors = {"one": str(lora_ckpts["one"]), "two": str(lora_ckpts["two"])}
    assert AdapterCfg().rank is None, "the default is exact"
    kw = engine_lora_kwargs(vectors, None, max_loras=4, max_cpu_loras=2)
    assert kw == {"enable_lora": True, "max_lora_rank": 128, "max_loras": 4, "max_cpu_loras": 4}  # 64 + 4 -> 128
    assert engine_lora_kwargs(vectors, 8, 1, 1)["max_lora_rank"] == 16  # 8 + 4 -> 16
    many = {f"v{i}": str(lora_ckpts["one"]) for i in range(9)}  # 9 x 64 = 576 > 512
    with pytest.raises(VectorError, match="past vLLM's largest"):
        engine_lora_kwargs(many, None, 1, 1)
