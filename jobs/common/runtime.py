"""Starting a job: its command line, and Ray (local or an existing cluster)."""
from __future__ import annotations

import os
import sys

from jobs.common.config import REPO, ConfigError


STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def init_ray(address: str | None, num_cpus: int | None, extra_env: dict | None = None,
             log_to_driver: bool = False) -> None:
    """Start or join Ray for a job (no-op if the driver already did): workers get the repository on PYTHONPATH
    and the offline setting; a local Ray binds to 127.0.0.1 only and runs without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # where the object store is (an S3-compatible server's endpoint, the region) goes to the job's workers too;
    # credentials do not travel in the runtime env: workers take theirs from their node (or its environment)
    store = {k: os.environ[k] for k in STORE_ENV if k in os.environ}
    env = {"env_vars": {**store, "HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"],
                        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}}
    if not address and os.environ.get("RAY_ADDRESS"):
        # a driver started by `ray job submit` (or in a shell that names a cluster): join that cluster
        address = os.environ["RAY_ADDRESS"]
    if address:
        if num_cpus is not None:
            print(f"[ray] joining the cluster at {address}: ray.num_cpus={num_cpus} is for a local Ray, ignored",
                  flush=True)
        ray.init(address=address, runtime_env=env, log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env["worker_process_setup_hook"] = "jobs.common.runtime.quiet_local_workers"
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=log_to_driver)


PROGRESS_LOG_INTERVAL_S = 30


class _ProgressLines:
    """A logging filter for Ray Data's progress in a log (stdout not a terminal): of each ~10-line block it keeps
    one line per stage, with rows/s and an ETA computed from the stage's previous line."""

    def __init__(self):
        self.last: dict[str, tuple[float, int]] = {}

    def filter(self, record) -> bool:
        import re
        import time

        msg = record.getMessage()
        m = re.fullmatch(r"(?P<name>[^:=][^:]*): (?P<done>\d+)/(?P<total>\d+|\?)", msg.strip())
        if not m or msg.startswith(" "):
            return False  # the delimiters, blank lines and per-stage resource summaries
        name, done, total = m["name"].strip(), int(m["done"]), m["total"]
        now = time.monotonic()
        t0, d0 = self.last.get(name, (now, done))
        self.last[name] = (now, done)
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        eta = (f", ETA {max(0, int(total) - done) / rate:.0f} s" if rate > 0 and total != "?" else "")
        record.msg, record.args = f"[progress] {name}: {done}/{total} rows, {rate:.1f} rows/s{eta}", ()
        return True


def quiet_progress_log() -> None:
    """Ray Data's progress in a log (not a terminal): a compact line per stage every PROGRESS_LOG_INTERVAL_S
    seconds instead of a 10-line block every 10 s. Call before the first dataset runs."""
    import logging

    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(PROGRESS_LOG_INTERVAL_S))
    log = logging.getLogger("ray.data._internal.progress.logging_progress")
    if not any(isinstance(f, _ProgressLines) for f in log.filters):
        log.addFilter(_ProgressLines())


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
