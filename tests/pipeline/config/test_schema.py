"""The config schema shared by the batch jobs and the Serve app: one error with every problem, keys of another
engine named as such, the closest valid keys for a misspelt one, `--help` with engines and descriptions, and
the same keys and defaults on both sides."""
import subprocess
import sys

import pytest
import yaml

from jobs.align_dataset import AlignDatasetConfig
from jobs.common.config import REPO, AlignerCfg, ConfigError, DraftCfg, as_engine, load_config
from pipeline.config.schema import _leaves, describe, engines_of
from serve_app import config as serve


def problems(argv: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml", argv)
    return e.value.problems


def serve_problems(args: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        serve.validate_args(args)
    return e.value.problems


def serve_args() -> dict:
    return yaml.safe_load((REPO / "conf" / "serve.yaml").read_text())["applications"][0]["args"]


def test_a_key_of_another_engine_is_an_error_that_names_the_engines_that_take_it():
    got = problems(["aligner.refine.block_size=8", "aligner.row_timeout_s=3", "aligner.prompt_lookup=2",
                    "base.base_url=http://x/v1", "base.engine=hf", "base.vllm.max_model_len=64"])
    assert "aligner.refine.block_size: engine vllm does not use this key; engines fast, reference take it" in got
    assert "aligner.row_timeout_s: engine vllm does not use this key; engines fast, reference, ar take it" in got
    assert "aligner.prompt_lookup: engine vllm does not use this key; engine ar takes it" in got
    assert "base.base_url: engine hf does not use this key; engine openai takes it" in got
    assert "base.vllm: engine hf does not use this key; engine vllm takes it" in got
    # the same keys are fine on the engines that use them
    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml",
                      ["aligner.engine=reference", "aligner.refine.block_size=8", "aligner.row_timeout_s=3"])
    assert cfg.aligner.settings().block_size == 8 and cfg.aligner.row_timeout_s == 3


def test_the_fast_engines_own_keys_are_refused_on_the_reference_loop():
    got = problems(["aligner.engine=reference", "aligner.refine.window=4"])
    assert got[0] == "aligner.refine.window: engine reference does not use this key; engine fast takes it"


def test_a_misspelt_key_names_the_closest_valid_keys_and_old_names_say_what_they_are_now():
    got = problems(["aligner.refine.max_new_token=3", "base.sampling.tempreature=1", "aligner.mode=fast",
                    "aligner.max_new_tokens=3", "base.kind=hf", "ouput.path=x"])
    assert "aligner.refine.max_new_token: unknown key; closest valid keys: aligner.refine.max_new_tokens" in got
    assert "base.sampling.tempreature: unknown key; closest valid keys: base.sampling.temperature" in got
    assert "aligner.mode: this key was renamed; use aligner.engine" in got
    assert "aligner.max_new_tokens: this key was renamed; use aligner.refine.max_new_tokens" in got
    assert "base.kind: this key was renamed; use base.engine" in got
    assert any(p.startswith("ouput: unknown key") and "output" in p for p in got), got


def test_one_error_lists_key_type_and_range_problems_with_config_paths():
    got = problems(["aligner.engine=magic", "base.batch_size=0", "base.sampling.top_p=x", "bogus=1"])
    assert "aligner.engine: must be one of vllm, fast, reference, ar, none (got 'magic')" in got
    assert any(p.startswith("base.batch_size: ") for p in got), got
    assert any(p.startswith("base.sampling.top_p: ") for p in got), "no engine tag inside the key"
    assert any(p.startswith("bogus: unknown key") for p in got)


def test_serve_args_are_checked_by_the_same_rules_in_one_error():
    args = serve_args()
    args["aligners"]["smollm2"].update(variant_cache_size=3, max_batch_size=2)
    args["aligners"]["smollm2-jacobi"]["refine"]["blok_size"] = 8
    args["bases"]["smollm2"]["seed"] = 1
    args["bases"]["smollm2"]["num_cpus"] = "many"
    got = serve_problems(args)
    assert ("aligners.smollm2.variant_cache_size: engine vllm does not use this key; engines fast, reference, ar take "
            "it") in got
    assert "aligners.smollm2.max_batch_size: engine vllm does not use this key; engines fast, reference, ar take it" in got
    assert ("aligners.smollm2-jacobi.refine.blok_size: unknown key; closest valid keys: "
            "aligners.smollm2-jacobi.refine.block_size") in got
    assert "bases.smollm2.seed: this key was renamed; use bases.smollm2.sampling.seed" in got
    assert any(p.startswith("bases.smollm2.num_cpus: ") for p in got), got


def test_serve_config_command_checks_a_file_and_prints_the_schema(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "serve_app.config", "conf/serve.yaml"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    doc = yaml.safe_load((REPO / "conf" / "serve.yaml").read_text())
    doc["applications"][0]["args"]["aligners"]["smollm2"]["refine"]["window"] = 8
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "serve_app.config", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "aligners.smollm2.refine.window: engine vllm does not use this key" in out.stderr
    helped = subprocess.run([sys.executable, "-m", "serve_app.config", "--help"], cwd=REPO, capture_output=True,
                            text=True)
    assert "aligners.<name>.refine.block_size = 256    # [fast, reference] draft tokens per Jacobi block" in helped.stdout


def test_help_shows_each_key_once_with_its_engines_and_a_description():
    text = describe(AlignDatasetConfig)
    assert "aligner.refine.window = 16    # [fast] tokens recomputed past the converged frontier" in text
    assert "aligner.vllm.max_model_len = None    # [vllm]" in text
    assert text.index("aligner.engine = 'vllm'") < text.index("aligner.model = 'default'")
    keys = [line.split(" = ")[0] for line in text.splitlines()]
    assert len(keys) == len(set(keys)), "each key once"


@pytest.mark.parametrize("stage", [DraftCfg, AlignerCfg, serve.BaseArgs, serve.AlignerArgs],
                         ids=["jobs.base", "jobs.aligner", "serve.base", "serve.aligner"])
def test_every_model_stage_key_has_a_description(stage):
    missing = [key for key, _, desc, _ in _leaves(stage, "") if not desc]
    assert not missing, f"keys without a description: {missing}"


@pytest.mark.parametrize("job, served", [(DraftCfg, serve.BaseArgs), (AlignerCfg, serve.AlignerArgs)],
                         ids=["base", "aligner"])
def test_jobs_and_serve_have_the_same_engines_and_the_same_defaults(job, served):
    jobs, serving = engines_of(job), engines_of(served)
    assert set(jobs.variants) == set(serving.variants) and jobs.default == serving.default == "vllm"
    for engine in jobs.variants:
        a = {k: d for k, d, _, _ in _leaves(jobs.variants[engine], "")}
        b = {k: d for k, d, _, _ in _leaves(serving.variants[engine], "")}
        shared = set(a) & set(b)
        assert {"model", "engine"} <= shared
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}, engine


def test_a_stage_moves_to_another_engine_with_the_keys_both_take():
    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml",
                      ["aligner.refine.max_new_tokens=40", "aligner.num_cpus=0.25", "aligner.in_context=true"])
    fast = as_engine(cfg.aligner, "fast")
    assert (fast.engine, fast.refine.max_new_tokens, fast.num_cpus, fast.in_context) == ("fast", 40, 0.25, True)
    assert fast.refine.window == 16, "a key the vLLM section lacks gets its default"
    assert as_engine(cfg.base, "hf", concurrency=1).concurrency == 1
