"""Alignment vectors on tiny random models: extraction checks, exact application, mixing, compression, the jobs.

"Aligned" checkpoints are the tiny base with its weights moved (some tensors left untouched, as a fine-tune
with frozen parts would), saved with the same tokenizer: exactly what `extract_vector` sees after training.
"""
import json
import subprocess
import sys

import pytest
import torch

from jobs.common.config import REPO, ConfigError, load_config
from pipeline.models import load_model
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer
from pipeline.vectors.extract import META_FILE, VECTOR_FILE, Compression, KnobError, VectorError, checkpoint_hash, extract_vector
from pipeline.vectors.knobs import AlignmentVector, KnobbedModel, load_knobbed

PROMPTS = [[{"role": "user", "content": "Say something about rivers."}],
           [{"role": "user", "content": "List two colors."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]]


def moved_copy(base_dir, out_dir, seed: int, scale: float = 0.5, frozen=("embed", "wte", "wpe")):
    """The base's weights plus seeded noise on every tensor except `frozen` ones, saved as a checkpoint."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not any(f in n for f in frozen):
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    m.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vec")
    out = {}
    for arch in ("llama", "gpt2"):  # gpt2 ties its input and output embeddings
        base = save_tiny(arch, root / f"{arch}-base")
        out[arch] = {"base": base, "a1": moved_copy(base, root / f"{arch}-a1", 1),
                     "a2": moved_copy(base, root / f"{arch}-a2", 2)}
        out[arch]["v1"] = root / f"{arch}-v1"
        out[arch]["v2"] = root / f"{arch}-v2"
        extract_vector(str(base), str(out[arch]["a1"]), out[arch]["v1"], "one", log=lambda *_: None)
        extract_vector(str(base), str(out[arch]["a2"]), out[arch]["v2"], "two", log=lambda *_: None)
    return out


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
def test_lambda_zero_is_base_and_one_is_aligned_token_for_token(ckpts, arch, tmp_path):
    c = ckpts[arch]
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


def test_two_vectors_add_exactly_and_switch_without_reload(ckpts):
    from safetensors.torch import load_file

    c = ckpts["llama"]
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


def test_mismatched_checkpoints_are_refused_with_what_differs(ckpts, tmp_path):
    c = ckpts["llama"]
    with pytest.raises(VectorError, match=r"architecture differs: base is LlamaForCausalLM .* aligned is GPT2LMHeadModel"):
        extract_vector(str(c["base"]), str(ckpts["gpt2"]["a1"]), tmp_path / "x", "x")
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
    other = load_model(str(ckpts["llama"]["a2"]))
    with pytest.raises(VectorError, match="was extracted from base"):
        load_knobbed(other, {"one": c["v1"]})
    gpt = load_model(str(ckpts["gpt2"]["base"]))
    with pytest.raises(VectorError, match="has tensors the model lacks"):
        load_knobbed(gpt, {"one": c["v1"]}, check_base=False)


@pytest.mark.parametrize("comp", [Compression(rank=3), Compression(energy=0.8)], ids=["rank3", "energy0.8"])
def test_compressed_vector_error_is_what_the_metadata_says(ckpts, tmp_path, comp):
    c = ckpts["llama"]
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


def test_extract_job_end_to_end(ckpts, tmp_path):
    from jobs.extract_vector import main

    c = ckpts["llama"]
    out = tmp_path / "job"
    meta = main([f"base={c['base']}", f"aligned={c['a1']}", "domain=concise", f"out={out}", "compression.rank=4",
                 "compression.exclude=[lm_head]"])
    assert (out / VECTOR_FILE).exists() and (out / META_FILE).exists()
    assert meta == json.loads((out / META_FILE).read_text())
    assert meta["domain"] == "concise" and meta["base"]["hash"] == checkpoint_hash(c["base"])
    assert meta["aligned"]["hash"] == checkpoint_hash(c["a1"])
    assert meta["tensors"]["lm_head.weight"]["kind"] == "dense"
    assert meta["tensors"]["model.layers.0.mlp.up_proj.weight"]["kind"] == "low_rank"
    with pytest.raises(ConfigError, match="aligned: the aligned checkpoint folder is required"):
        main([f"base={c['base']}"])
    # the command line: a clear message and exit status 2 for a mismatched pair
    r = subprocess.run([sys.executable, "-m", "jobs.extract_vector", f"base={c['base']}",
                        f"aligned={ckpts['gpt2']['a1']}", f"out={tmp_path / 'bad'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "architecture differs" in r.stderr, r.stderr[-2000:]


def test_extract_config_lists_every_problem(tmp_path):
    from jobs.extract_vector import main

    with pytest.raises(ConfigError) as e:  # the schema's own checks, together
        main(["domain=a b", "dtype=int8", "compression.rnk=4"])
    assert [p.split(":")[0] for p in e.value.problems[:3]] == ["domain", "dtype", "compression.rnk"], e.value.problems
    with pytest.raises(ConfigError) as e:  # then the rules across keys, together
        main(["compression.rank=4", "compression.energy=0.9", "compression.exclude=['(']"])
    assert e.value.problems == ["aligned: the aligned checkpoint folder is required (aligned=path/to/model)",
                                "compression: give rank or energy, not both",
                                "compression.exclude: bad regex '(': missing ), unterminated subpattern at position 0"]


def test_search_knobs_on_tiny_models(ckpts, tmp_path):
    import pandas as pd

    from jobs.search_knobs import main
    from pipeline.decoding.drafting import SamplingParams, generate_answers

    c = ckpts["llama"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p[-1]["content"], "reference": "a reference"}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    common = [f"model={c['base']}", f"prompts.path={prompts}", "generation.max_new_tokens=10"]
    s = main(common + [f"domains.one.vector={c['v1']}", "domains.one.grid=[0,1]", "domains.one.score=length_tokens",
                       f"domains.two.vector={c['v2']}", "domains.two.grid=[0,0.5,1]", "domains.two.target=3",
                       "domains.two.score=length_tokens", f"out={tmp_path / 's2'}"])
    t = pd.read_csv(tmp_path / "s2" / "table.csv")
    assert len(t) == 6 and s["points"] == 6
    assert set(t.columns) >= {"lambda_one", "lambda_two", "score_one", "score_two", "objective"}
    assert (tmp_path / "s2" / "knobs.png").stat().st_size > 1000
    # scores at a grid point are those of the model with those knobs, computed independently
    lm = load_model(str(c["base"]))
    params = SamplingParams(max_new_tokens=10, do_sample=False)
    for knobs in ({}, {"one": 1.0, "two": 0.5}):
        load_knobbed(lm, {"one": c["v1"], "two": c["v2"]}).apply(knobs)
        ans = generate_answers(lm, [[{"role": "user", "content": p[-1]["content"]}] for p in PROMPTS], params)
        want = sum(len(lm.tokenizer(a[0], add_special_tokens=False)["input_ids"]) for a in ans) / len(ans)
        row = t[(t["lambda_one"] == knobs.get("one", 0)) & (t["lambda_two"] == knobs.get("two", 0))].iloc[0]
        assert row["score_one"] == pytest.approx(want) and row["score_two"] == pytest.approx(want)
        assert row["objective"] == pytest.approx(-want + abs(want - 3))
    best = json.loads((tmp_path / "s2" / "best.json").read_text())
    assert best["objective"] == pytest.approx(t["objective"].min())
    # one domain: a curve
    s1 = main(common + [f"domains.one.vector={c['v1']}", "domains.one.grid=[-0.5,0,1]", f"out={tmp_path / 's1'}"])
    assert s1["figure"] and (tmp_path / "s1" / "knobs.png").exists()
    assert len(pd.read_csv(tmp_path / "s1" / "table.csv")) == 3


def test_search_knobs_refine_mode_uses_the_refine_settings(ckpts, tmp_path):
    """generation.mode=refine: the knobbed model refines each row's draft with `generation.refine`."""
    import pandas as pd

    from jobs.search_knobs import main
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.decoding.refiner import Refiner, RefineRequest

    c = ckpts["llama"]
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": i, "prompt": p[-1]["content"], "draft": f"A draft answer number {i}."}
            for i, p in enumerate(PROMPTS)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main([f"model={c['base']}", f"prompts.path={prompts}", "generation.mode=refine",
          "generation.refine.max_new_tokens=12", "generation.refine.block_size=8", f"domains.one.vector={c['v1']}",
          "domains.one.grid=[0,1]",
          "domains.one.score=length_tokens", f"out={tmp_path / 'r'}"])
    t = pd.read_csv(tmp_path / "r" / "table.csv")
    lm = load_model(str(c["base"]))
    refiner = Refiner(lm, RefineSettings(max_new_tokens=12, block_size=8), mode="fast")
    for lam in (0.0, 1.0):
        load_knobbed(lm, {"one": c["v1"]}).apply({"one": lam})
        got = refiner.refine([RefineRequest([{"role": "user", "content": r["prompt"]}], r["draft"], key=str(r["id"]))
                              for r in rows])
        want = sum(len(lm.tokenizer(x.text, add_special_tokens=False)["input_ids"]) for x in got) / len(got)
        assert t[t["lambda_one"] == lam].iloc[0]["score_one"] == pytest.approx(want)


def test_search_knobs_config_errors(ckpts, tmp_path):
    """Every problem in one ConfigError; a Jacobi setting outside `generation.refine` is named with its new key."""
    from jobs.search_knobs import main

    with pytest.raises(ConfigError) as e:
        main(["generation.block_size=16", "domains.one.score=bleu", "domains.one.grid=[]", "prompts.limit=0"])
    assert "generation.block_size: this key was renamed; use generation.refine.block_size" in e.value.problems
    assert {p.split(":")[0] for p in e.value.problems} >= {"domains.one.score", "domains.one.grid", "prompts.limit"}
    with pytest.raises(ConfigError) as e:
        main([f"domains.one.vector={tmp_path / 'none'}", f"domains.two.vector={ckpts['llama']['v2']}",
              f"domains.two.prompts={tmp_path / 'none.jsonl'}", "generation.mode=refine",
              "generation.max_new_tokens=20", "generation.refine.block_size=0"])
    starts = ("domains.one.vector: no alignment vector", "domains.two.prompts: file not found",
              "generation.refine: block_size must be >= 1", "generation.max_new_tokens: caps generate mode only")
    assert len(e.value.problems) == len(starts), e.value.problems
    assert all(any(p.startswith(s) for p in e.value.problems) for s in starts), e.value.problems


def test_shipped_vector_configs_load(ckpts):
    """conf/search_knobs.yaml and conf/extract_vector.yaml validate through load_config once given what they
    leave open (a domain's vector; the aligned checkpoint)."""
    from dataclasses import asdict

    from jobs.extract_vector import ExtractVectorConfig
    from jobs.search_knobs import SearchKnobsConfig

    c = ckpts["llama"]
    s = load_config(SearchKnobsConfig, REPO / "conf/search_knobs.yaml", [f"domains.concise.vector={c['v1']}"])
    assert s.generation.refine.max_new_tokens == s.generation.max_new_tokens == 96
    assert s.domains["concise"].grid == [0.0, 0.5, 1.0] and s.prompts.path == "demo"
    e = load_config(ExtractVectorConfig, REPO / "conf/extract_vector.yaml", [f"aligned={c['a1']}"])
    assert e.base == "default" and e.out is None and asdict(e.compression) == asdict(Compression())


@pytest.mark.timeout(300)
def test_batch_job_applies_knobs_from_config(ckpts, tmp_path, ray_local):
    import pandas as pd

    from jobs.align_dataset import main
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.decoding.refiner import Refiner, RefineRequest

    c = ckpts["llama"]
    src = tmp_path / "in.jsonl"
    rows = [{"id": i, "prompt": p, "draft": d} for i, (p, d) in
            enumerate([("Say hi.", "Hello there!"), ("Name a fruit.", "An apple."), ("Count to two.", "One, two.")])]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"input.path={src}", f"aligner.model={c['base']}", "aligner.refine.max_new_tokens=16",
              "aligner.refine.block_size=8", "aligner.num_cpus=0.5", "ray.progress_bars=false", "show_samples=0",
              f"aligner.vectors.one={c['v1']}", f"aligner.vectors.two={c['v2']}"]
    s = main(common + [f"output.path={tmp_path / 'k'}", "aligner.knobs.one=1.0"])
    assert s["rows_out"] == 3
    got = pd.read_parquet(tmp_path / "k" / "aligned.parquet").sort_values("id")
    settings = RefineSettings(max_new_tokens=16, block_size=8)
    want = {}
    for name, model in (("aligned", c["a1"]), ("base", c["base"])):
        ref = Refiner(load_model(str(model)), settings, mode="fast")
        want[name] = [x.text for x in ref.refine([RefineRequest([{"role": "user", "content": r["prompt"]}], r["draft"],
                                                                key=str(r["id"])) for r in rows])]
    assert list(got["aligned"]) == want["aligned"] != want["base"]  # λ=1: the aligned model's answers
    with pytest.raises(ConfigError, match="aligner.knobs.three: no vector named 'three'"):
        main(common + [f"output.path={tmp_path / 'bad'}", "aligner.knobs.three=1"])
