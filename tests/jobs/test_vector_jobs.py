"""The alignment-vector jobs on tiny random models: extract_vector, search_knobs, and knobs in the batch job
(the vectors and checkpoints come from the `vector_ckpts` fixture in tests/conftest.py)."""
import json
import subprocess
import sys

import pytest

from jobs.common.config import REPO, ConfigError, load_config
from pipeline.models import load_model
from pipeline.vectors.extract import META_FILE, VECTOR_FILE, Compression, checkpoint_hash
from pipeline.vectors.knobs import load_knobbed

PROMPTS = [[{"role": "user", "content": "Say something about rivers."}],
           [{"role": "user", "content": "List two colors."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]]


def test_extract_job_end_to_end(vector_ckpts, tmp_path):
    from jobs.extract_vector import main

    c = vector_ckpts["llama"]
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
                        f"aligned={vector_ckpts['gpt2']['a1']}", f"out={tmp_path / 'bad'}"],
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


def test_search_knobs_on_tiny_models(vector_ckpts, tmp_path):
    import pandas as pd

    from jobs.search_knobs import main
    from pipeline.decoding.drafting import SamplingParams, generate_answers

    c = vector_ckpts["llama"]
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


def test_search_knobs_refine_mode_uses_the_refine_settings(vector_ckpts, tmp_path):
    """generation.mode=refine: the knobbed model refines each row's draft with `generation.refine`."""
    import pandas as pd

    from jobs.search_knobs import main
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.decoding.refiner import Refiner, RefineRequest

    c = vector_ckpts["llama"]
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


def test_search_knobs_config_errors(vector_ckpts, tmp_path):
    """Every problem in one ConfigError; a Jacobi setting outside `generation.refine` is named with its new key."""
    from jobs.search_knobs import main

    with pytest.raises(ConfigError) as e:
        main(["generation.block_size=16", "domains.one.score=bleu", "domains.one.grid=[]", "prompts.limit=0"])
    assert "generation.block_size: this key was renamed; use generation.refine.block_size" in e.value.problems
    assert {p.split(":")[0] for p in e.value.problems} >= {"domains.one.score", "domains.one.grid", "prompts.limit"}
    with pytest.raises(ConfigError) as e:
        main([f"domains.one.vector={tmp_path / 'none'}", f"domains.two.vector={vector_ckpts['llama']['v2']}",
              f"domains.two.prompts={tmp_path / 'none.jsonl'}", "generation.mode=refine",
              "generation.max_new_tokens=20", "generation.refine.block_size=0"])
    starts = ("domains.one.vector: no alignment vector", "domains.two.prompts: file not found",
              "generation.refine: block_size must be >= 1", "generation.max_new_tokens: caps generate mode only")
    assert len(e.value.problems) == len(starts), e.value.problems
    assert all(any(p.startswith(s) for p in e.value.problems) for s in starts), e.value.problems


def test_shipped_vector_configs_load(vector_ckpts):
    """conf/search_knobs.yaml and conf/extract_vector.yaml validate through load_config once given what they
    leave open (a domain's vector; the aligned checkpoint)."""
    from dataclasses import asdict

    from jobs.extract_vector import ExtractVectorConfig
    from jobs.search_knobs import SearchKnobsConfig

    c = vector_ckpts["llama"]
    s = load_config(SearchKnobsConfig, REPO / "conf/search_knobs.yaml", [f"domains.concise.vector={c['v1']}"])
    assert s.generation.refine.max_new_tokens == s.generation.max_new_tokens == 96
    assert s.domains["concise"].grid == [0.0, 0.5, 1.0] and s.prompts.path == "demo"
    e = load_config(ExtractVectorConfig, REPO / "conf/extract_vector.yaml", [f"aligned={c['a1']}"])
    assert e.base == "default" and e.out is None and asdict(e.compression) == asdict(Compression())


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_batch_job_applies_knobs_from_config(vector_ckpts, tmp_path, ray_local):
    import pandas as pd

    from jobs.align_dataset import main
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.decoding.refiner import Refiner, RefineRequest

    c = vector_ckpts["llama"]
    src = tmp_path / "in.jsonl"
    rows = [{"id": i, "prompt": p, "draft": d} for i, (p, d) in
            enumerate([("Say hi.", "Hello there!"), ("Name a fruit.", "An apple."), ("Count to two.", "One, two.")])]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"input.path={src}", f"aligner.model={c['base']}", "aligner.refine.max_new_tokens=16",
              "aligner.refine.block_size=8", "aligner.num_cpus=0.5", "ray.progress_bars=false", "show_samples=0",
              "aligner.engine=fast",
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
