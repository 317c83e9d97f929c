"""Every file in conf/ loads and validates against the schema of the job (or the Serve app) it configures.

A file may name data that is not on this machine (../shared/data, a model trained earlier under outputs/): those
problems are allowed, and only those. Anything else (an unknown or renamed key, a wrong type, a broken cross-key
rule) fails the test.
"""
import importlib
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jobs.common.config import REPO, ConfigError, load_config

CONF = sorted((REPO / "conf").glob("*.yaml"))
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if not p.stem.startswith("_"))
# keys a file leaves to the command line, as its header says
REQUIRED = {"extract_vector.yaml": ["aligned=outputs/demo_vectors/concise/model"],
            "search_knobs.yaml": ["domains.concise.vector=outputs/vectors/concise"]}
MISSING = re.compile(r"not found|no .*input .*found|no alignment vector at|no \.jsonl")


def schema_for(conf: Path):
    """The job whose name the file starts with (conf/train_aligner_gpu.yaml -> jobs.train_aligner)."""
    job = max((j for j in JOBS if conf.stem == j or conf.stem.startswith(j + "_")), key=len, default=None)
    if job is None:
        return None
    module = importlib.import_module(f"jobs.{job}")
    return next(v for k, v in vars(module).items() if k.endswith("Config") and isinstance(v, type)
                and v.__module__ == module.__name__)


SERVE = ["serve.yaml", "serve_gpu.yaml"]  # Ray Serve configs: their args are serve_app.config.AppArgs


def test_every_conf_file_has_a_schema():
    assert len(CONF) >= 12
    for conf in CONF:
        assert conf.name in SERVE or schema_for(conf) is not None, f"no job for {conf.name}"


@pytest.mark.parametrize("conf", [c for c in CONF if c.name not in SERVE], ids=lambda p: p.name)
def test_conf_file_validates(conf):
    try:
        load_config(schema_for(conf), conf, REQUIRED.get(conf.name, []))
    except ConfigError as e:
        others = [p for p in e.problems if not MISSING.search(p)]
        assert not others, f"{conf.name}: {others}"
        for p in e.problems:  # the missing data really is missing here
            named = re.findall(r"(?:\.\./|outputs/|/)[\w./-]+", p)
            assert named and not any((REPO / n).exists() or Path(n).exists() for n in named), p


@pytest.mark.parametrize("name", SERVE)
def test_serve_conf_validates(name):
    from serve_app.config import AppArgs

    conf = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / name))
    for app in conf["applications"]:
        args = AppArgs.model_validate(app["args"])
        assert args.models and all(r.base in args.bases for r in args.models.values())


def test_one_error_lists_every_problem_and_names_renamed_keys():
    from jobs.align_dataset import AlignDatasetConfig

    with pytest.raises(ConfigError) as e:
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml",
                    ["aligner.window=4", "base.temperature=0.1", "aligner.refine.block_size=x", "bogus=1"])
    text = str(e.value)
    assert "aligner.window: this key was renamed; use aligner.refine.window" in text
    assert "base.temperature: this key was renamed; use base.sampling.temperature" in text
    assert "aligner.refine.block_size" in text and "bogus: unknown key" in text


def test_help_lists_every_key_with_its_default(capsys):
    from jobs.align_dataset import AlignDatasetConfig

    with pytest.raises(SystemExit):
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["--help"])
    out = capsys.readouterr().out
    assert "aligner.refine.block_size = 256" in out and "base.sampling.temperature = 0.7" in out


def test_switching_an_engine_drops_the_files_keys_the_new_engine_does_not_take():
    from jobs.align_dataset import AlignDatasetConfig

    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["aligner.engine=none"])
    assert cfg.aligner.engine == "none", "the file's aligner.model and aligner.refine were for its own engine"
    with pytest.raises(ConfigError, match="aligner.model: engine none does not use this key"):
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["aligner.engine=none", "aligner.model=x"])
