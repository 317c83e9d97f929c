"""Alignment vectors on tiny random models: extraction checks, exact application, mixing, compression.

"Aligned" checkpoints are the tiny base with its weights moved (some tensors left untouched, as a fine-tune
with frozen parts would), saved with the same tokenizer: exactly what `extract_vector` sees after training.
"""
import json

import pytest
import torch

from pipeline.models import load_model
from tests.conftest import moved_copy
from tests.tiny import tiny_model, tiny_tokenizer
from pipeline.vectors.extract import META_FILE, VECTOR_FILE, Compression, KnobError, VectorError, extract_vector
from pipeline.vectors.knobs import AlignmentVector, KnobbedModel, load_knobbed

PROMPTS = [[{"role": "user", "content": "Say something about rivers."}],
           [{"role": "user", "content": "List two colors."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]]


@torch.inference_mode()
def greedy_ids(model, tok, max_new=24) -> list[list[int]]:
    from pipeline.prompts import chat_prompt_ids

    outs = []
    for conv in PROMPTS:
        ids = torch.tensor([chat_prompt_ids(tok, conv)])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=1, pad_token_id=0, temperature=None, top_p=None, top_k=None)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


def state(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lambda_zero_is_base_and_one_is_aligned_token_for_token(vector_ckpts, arch, tmp_path):
    c = vector_ckpts[arch]
    lm, aligned = load_model(str(c["base"])), load_model(str(c["a1"]))
    base_out = greedy_ids(lm.model, lm.tokenizer)
    want = greedy_ids(aligned.model, aligned.tokenizer)
    assert base_out != want, "the aligned model must answer differently, or the test shows nothing"
    km = load_knobbed(lm, {"one": c["v1"]})
    assert km.apply({"one": 1.0}).cache == "miss"
    assert greedy_ids(lm.model, lm.tokenizer) == want
    a_sd = dict(aligned.model.named_parameters())
    worst = max(float((p.detach() - a_sd[n].detach()).abs().max()) for n, p in lm.model.named_parameters())
    assert worst <= 1e-6, f"λ=1 weights differ from the aligned checkpoint by {worst}"
    assert km.apply({"one": 0.0}).cache == "base"
    assert greedy_ids(lm.model, lm.tokenizer) == base_out
    b_sd = state(c["base"])
    for n, p in lm.model.named_parameters():  # back on the very tensors loaded from disk
        if n in b_sd:
            assert torch.equal(p, b_sd[n]), n
    meta = json.loads((c["v1"] / META_FILE).read_text())
    if arch == "gpt2":  # tied head: noted; the embedding did not move here, so no warning
        assert meta["tied"] == {"lm_head.weight": "transformer.wte.weight"} and not meta["warnings"]
        moved = moved_copy(c["base"], tmp_path / "all", 5, frozen=())
        m2 = extract_vector(str(c["base"]), str(moved), tmp_path / "v", "all", log=lambda *_: None)
        assert "transformer.wte.weight" in m2["tensors"] and "lm_head.weight" not in m2["tensors"]
        assert any("also moves the output head" in w for w in m2["warnings"])
        km2 = load_knobbed(lm, {"all": tmp_path / "v"})
        km2.apply({"all": 1.0})
        assert lm.model.lm_head.weight is lm.model.transformer.wte.weight  # still one tied parameter
        want_all = load_model(str(moved))
        assert greedy_ids(lm.model, lm.tokenizer) == greedy_ids(want_all.model, want_all.tokenizer)
    assert set(meta["unchanged"]) == {n for n in b_sd if any(f in n for f in ("embed", "wte", "wpe"))}
    assert not set(meta["unchanged"]) & set(meta["tensors"])


def test_two_vectors_add_exactly_and_switch_without_reload(vector_ckpts):
    from safetensors.torch import load_file

    c = vector_ckpts["llama"]
    lm = load_model(str(c["base"]))
    km = load_knobbed(lm, {"one": c["v1"], "two": c["v2"]}, cache_size=2)
    b = state(c["base"])
    d1, d2 = load_file(str(c["v1"] / VECTOR_FILE)), load_file(str(c["v2"] / VECTOR_FILE))
    a1 = state(c["a1"])
    for n in d1:  # the stored vector is the difference of the checkpoints (fp32-rounded)
        assert torch.equal(d1[n], (a1[n].double() - b[n].double()).float()), n
    setting = {"one": 0.7, "two": -0.4}
    km.apply(setting)
    params = dict(lm.model.named_parameters())
    for n, p in params.items():
        expect = b[n]
        if n in d1 or n in d2:
            expect = b[n].float()
            if n in d1:
                expect = expect + d1[n] * 0.7
            if n in d2:
                expect = expect + d2[n] * -0.4
        assert torch.equal(p.data, expect), n
    # the two vectors add: the mix equals the sum of the individual moves
    mixed = {n: p.data.clone() for n, p in params.items()}
    km.apply({"one": 0.7})
    only1 = {n: p.data.clone() for n, p in params.items()}
    km.apply({"two": -0.4})
    only2 = {n: p.data.clone() for n, p in params.items()}
    for n in mixed:
        torch.testing.assert_close(mixed[n], only1[n] + only2[n] - b[n], rtol=0, atol=1e-6)
    # LRU: setting (one .7, two -.4) was evicted by the two single settings (cache_size=2)
    assert km.stats()["cached"] == 2 and km.misses == 3
    ptr = params["model.layers.0.mlp.up_proj.weight"].data_ptr()
    assert km.apply({"one": 0.7}).cache == "hit"
    assert params["model.layers.0.mlp.up_proj.weight"].data_ptr() != ptr
    assert km.apply({"one": 0.7, "two": -0.4}).cache == "miss"
    assert km.apply({"two": -0.4}).cache == "miss"  # evicted by the line above
    assert km.apply({"two": -0.4, "one": 0}).cache == "hit"  # zeros are dropped: the same setting
    with pytest.raises(KnobError, match="unknown alignment vector 'three'"):
        km.normalize({"three": 1})
    bounded = KnobbedModel(lm.model, {"one": c["v1"]}, bounds=(-1, 2))
    with pytest.raises(KnobError, match="outside the allowed range"):
        bounded.normalize({"one": 2.5})
    with pytest.raises(KnobError, match="finite number"):
        bounded.normalize({"one": float("nan")})


def test_mismatched_checkpoints_are_refused_with_what_differs(vector_ckpts, tmp_path):
    c = vector_ckpts["llama"]
    with pytest.raises(VectorError, match=r"architecture differs: base is LlamaForCausalLM .* aligned is GPT2LMHeadModel"):
        extract_vector(str(c["base"]), str(vector_ckpts["gpt2"]["a1"]), tmp_path / "x", "x")
    # same architecture, other sizes
    tok = tiny_tokenizer()
    small = tiny_model("llama", len(tok), hidden=32)
    small.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    with pytest.raises(VectorError, match=r"config hidden_size: base 64 vs aligned 32[\s\S]*shapes differ"):
        extract_vector(str(c["base"]), str(tmp_path / "small"), tmp_path / "x", "x")
    # dtype differs
    from transformers import AutoModelForCausalLM

    half = AutoModelForCausalLM.from_pretrained(c["a1"], dtype=torch.float16)
    half.save_pretrained(tmp_path / "half")
    tok.save_pretrained(tmp_path / "half")
    with pytest.raises(VectorError, match=r"dtypes differ .*F32 vs F16"):
        extract_vector(str(c["base"]), str(tmp_path / "half"), tmp_path / "x", "x")
    # tokenizer differs
    moved_copy(c["base"], tmp_path / "tok", 3)
    t2 = tiny_tokenizer()
    t2.add_tokens(["<extra>"])
    t2.save_pretrained(tmp_path / "tok")
    with pytest.raises(VectorError, match=r"tokenizer vocabulary differs: 1 tokens only in aligned \('<extra>'\)"):
        extract_vector(str(c["base"]), str(tmp_path / "tok"), tmp_path / "x", "x")
    assert not (tmp_path / "x" / VECTOR_FILE).exists()
    # a vector applied to a model that is not its base
    other = load_model(str(vector_ckpts["llama"]["a2"]))
    with pytest.raises(VectorError, match="was extracted from base"):
        load_knobbed(other, {"one": c["v1"]})
    gpt = load_model(str(vector_ckpts["gpt2"]["base"]))
    with pytest.raises(VectorError, match="has tensors the model lacks"):
        load_knobbed(gpt, {"one": c["v1"]}, check_base=False)


@pytest.mark.parametrize("comp", [Compression(rank=3), Compression(energy=0.8)], ids=["rank3", "energy0.8"])
def test_compressed_vector_error_is_what_the_metadata_says(vector_ckpts, tmp_path, comp):
    c = vector_ckpts["llama"]
    meta = extract_vector(str(c["base"]), str(c["a1"]), tmp_path / "v", "one", comp, log=lambda *_: None)
    b, a = state(c["base"]), state(c["a1"])
    v = AlignmentVector(tmp_path / "v")
    err2 = norm2 = 0.0
    for n, e in meta["tensors"].items():
        exact = a[n].double() - b[n].double()
        rel = float(torch.linalg.vector_norm(v.delta(n, torch.float64) - exact) / torch.linalg.vector_norm(exact))
        assert rel <= e["rel_error"] * (1 + 1e-4) + 1e-7, (n, rel, e)
        if e["kind"] == "low_rank":
            m, k = e["shape"]
            assert v.parts[n][0].shape == (m, e["rank"]) and v.parts[n][1].shape == (e["rank"], k)
            if comp.rank:
                assert e["rank"] == 3
            else:  # the kept singular values hold >= 80% of the energy: error <= sqrt(0.2)
                assert rel <= 0.2 ** 0.5 + 1e-5
        err2 += (rel * e["norm"]) ** 2
        norm2 += e["norm"] ** 2
    cm = meta["compression"]
    assert cm["low_rank_tensors"] > 0 and cm["stored_bytes"] < cm["dense_bytes"]
    assert abs((err2 / norm2) ** 0.5 - cm["rel_error_total"]) < 1e-5
    assert 0 < cm["rel_error_total"] <= cm["max_rel_error"]
    # applying it is base + λ·(A @ B), exactly
    lm = load_model(str(c["base"]))
    load_knobbed(lm, {"one": tmp_path / "v"}).apply({"one": 0.5})
    for n, p in lm.model.named_parameters():
        if n in v.parts:
            expect = b[n].float() + v.delta(n) * 0.5
            assert torch.equal(p.data, expect), n


