"""Config loading shared by the jobs: typed schema <- YAML file <- `key=value` command-line overrides.

`load_config(Schema, "conf/x.yaml", argv)` merges the three with OmegaConf, so an unknown key or a value
of the wrong type fails at start-up, and `config=path.yaml` on the command line picks another file.
Each job adds its own semantic checks and reports them all at once through `ConfigError`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO = Path(__file__).resolve().parents[1]


# ---- schema pieces shared by the jobs ---------------------------------------------------------------------
@dataclass
class RayCfg:
    address: Optional[str] = None  # null = start a local Ray; "auto" = join the running cluster
    num_cpus: Optional[int] = None  # local Ray only; null = all


@dataclass
class DataRayCfg(RayCfg):
    """`ray` section of a Ray Data job (`start_data_job`)."""
    torch_threads: int = 1  # per actor
    progress_bars: bool = True


@dataclass
class StageCfg:
    """A model stage of a Ray Data job: which model, and the actor pool that runs it."""
    model: str = "default"  # "default" (the embedded SmolLM2-135M-Instruct), an HF folder, a .gguf or a hub id
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    batch_size: int = 4  # rows per actor call
    num_cpus: float = 0.5  # per actor
    num_gpus: float = 0.0  # per actor
    concurrency: int = 1  # actors


@dataclass
class DraftCfg(StageCfg):
    """A base model that drafts answers (`pipeline.decoding.drafting.Drafter`): in the job's actors or at an endpoint."""
    kind: str = "hf"  # hf: `model` runs in the actors | openai: `model` is the name at an OpenAI-compatible endpoint
    base_url: Optional[str] = None  # kind=openai: e.g. http://10.0.0.5:8000/v1
    api_key_env: Optional[str] = None  # kind=openai: environment variable holding the key
    timeout_s: float = 60.0
    max_retries: int = 3
    parallel_requests: int = 8  # kind=openai: concurrent HTTP requests per actor
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    do_sample: bool = True


class ConfigError(ValueError):
    """Everything wrong with a config, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def load_config(schema, default_yaml: str | Path, argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        raise ConfigError([f"arguments must be key=value overrides, got {a!r}" for a in bad])
    path = Path(default_yaml)
    rest = []
    for a in argv:
        k, v = a.split("=", 1)
        if k == "config":
            path = Path(v)
        else:
            rest.append(a)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    if not path.exists():
        raise ConfigError([f"config file not found: {path}"])
    try:
        cfg = OmegaConf.structured(schema)
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        # OmegaConf names the key and the value; keep its first line, it is the useful one
        key = getattr(e, "full_key", None)
        where = f"{key}: " if key else ""
        raise ConfigError([f"{where}{str(e).splitlines()[0]}  (config file {path})"]) from None
    return cfg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)


def expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def init_ray(address: str | None, num_cpus: int | None, extra_env: dict | None = None,
             log_to_driver: bool = False) -> None:
    """Start or join Ray for a job (no-op if the driver already did): workers get the repo on PYTHONPATH and
    the offline setting; a local Ray binds to 127.0.0.1 only."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"],
                        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env["worker_process_setup_hook"] = "jobs.config.quiet_local_workers"
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=log_to_driver)


def quiet_local_workers() -> None:
    """Worker setup hook of a local Ray, which runs without the dashboard and so without the State API: Ray
    Train's placement-group cleaner would log a warning every few seconds that it cannot query it."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def start_data_job(name: str, cfg, out: Path, preserve_order: bool = True):
    """The common start of a Ray Data job: record the resolved config next to the outputs (and print it),
    start or join Ray (`cfg.ray.address`, `cfg.ray.num_cpus`) and set this driver's Ray Data context
    (progress bars per `cfg.ray.progress_bars`; `preserve_order` so that `limit` picks the same rows on
    every run). Returns the context for job-specific settings, which must come before the first read."""
    from ray.data import DataContext

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    print(f"[{name}] resolved config:\n" + to_yaml(cfg), flush=True)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.execution_options.preserve_order = preserve_order
    return ctx


def run_job(module: str, errors: tuple = ()) -> None:
    """The command line of a job: run `jobs.<module>.main` imported under its module name (so Ray pickles the
    job's stage classes by reference, not from ``__main__``), and turn a config error (or one of `errors`) into
    one clear message and exit status 2."""
    import importlib

    main = importlib.import_module(f"jobs.{module}").main
    try:
        main()
    except (ConfigError, *errors) as e:
        print(f"[{module}] {e}", file=sys.stderr)
        sys.exit(2)
