"""Starting a job: its command line, and Ray (local or an existing cluster)."""
from __future__ import annotations

import os
import sys

from jobs.common.config import REPO, ConfigError


def init_ray(address: str | None, num_cpus: int | None, extra_env: dict | None = None,
             log_to_driver: bool = False) -> None:
    """Start or join Ray for a job (no-op if the driver already did): workers get the repository on PYTHONPATH
    and the offline setting; a local Ray binds to 127.0.0.1 only and runs without the dashboard."""
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
        env["worker_process_setup_hook"] = "jobs.common.runtime.quiet_local_workers"
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=log_to_driver)


def quiet_local_workers() -> None:
    """Worker setup hook of a local Ray, which runs without the dashboard and so without the State API: Ray
    Train's placement-group cleaner would log a warning every few seconds that it cannot query it."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def run_job(module: str, errors: tuple = ()) -> None:
    """The command line of a job: run `jobs.<module>.main` imported under its module name (so Ray pickles the
    job's stage classes by reference, not from ``__main__``), and turn a config error (or one of `errors`)
    into one clear message and exit status 2."""
    import importlib

    main = importlib.import_module(f"jobs.{module}").main
    try:
        main()
    except (ConfigError, *errors) as e:
        print(f"[{module}] {e}", file=sys.stderr)
        sys.exit(2)
