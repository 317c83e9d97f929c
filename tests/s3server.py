"""A real S3 API on 127.0.0.1 for tests: moto's server (`moto_server`, from the `moto[server]` test extra) in a
subprocess, reached through plain `s3://bucket/key` URIs.

The fixture puts the endpoint and dummy credentials into os.environ (AWS_ENDPOINT_URL & co., which pyarrow 26's
AWS SDK honours), so `pyarrow.fs.FileSystem.from_uri("s3://bucket/x")` and Ray Data's path resolution reach it
with no extra arguments, exactly as job code does against real S3. Ray workers only see those variables if they
are set before `ray.init` (the raylet, and every worker it spawns, inherits the driver's environment then), so
request `s3_server` before `ray_local` (or make `ray_local` depend on it); `s3_server` fails fast if it finds a
running Ray whose workers lack the endpoint.

A subprocess rather than moto's ThreadedMotoServer: an in-process server shares the test's GIL, and pyarrow calls
that keep the GIL while they talk to S3 (e.g. an output stream closed from its destructor) then stall until
curl's timeout. Start-up is about 0.8 s.
"""
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    env: dict = field(default_factory=dict)  # what the fixture put into os.environ (pass to subprocesses / Ray)

    def filesystem(self, **kw):
        """An explicit pyarrow S3FileSystem for this server (works without the env vars, e.g. pickled to Ray)."""
        import pyarrow.fs as pafs

        opts = dict(endpoint_override=self.endpoint, scheme="http", access_key="test", secret_key="test",
                    region=REGION, allow_bucket_creation=True)
        return pafs.S3FileSystem(**(opts | kw))

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` (3-63 chars, lowercase; moto rejects shorter names) if missing; returns `s3://name`."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST"), timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_ray_workers_see(env: dict) -> None:
    """If a Ray is already running, its workers were started without `env`: fail with the fix."""
    import ray

    if not ray.is_initialized():
        return

    @ray.remote(num_cpus=0)
    def endpoint():
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != env["AWS_ENDPOINT_URL"]:
        pytest.fail("s3_server started after Ray: Ray workers cannot see AWS_ENDPOINT_URL. Request `s3_server` "
                    "before `ray_local` in the test's arguments (or make `ray_local` depend on `s3_server`).")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for the session; os.environ points pyarrow / boto3 / Ray workers at it."""
    port = _free_port()
    log = Path(tmp_path_factory.mktemp("moto")) / "moto_server.log"
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    import urllib.error
    import urllib.request

    while True:  # ready when its API answers
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start (exit {proc.poll()}); log {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
    env = {"AWS_ENDPOINT_URL": endpoint,  # pyarrow (AWS SDK C++), boto3; AWS_ENDPOINT_URL_S3 works too
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",  # moto checks no signature
           "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
           "AWS_EC2_METADATA_DISABLED": "true"}  # never wait on the EC2 metadata service for credentials
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _check_ray_workers_see(env)
        yield S3Server(endpoint=endpoint, env=env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
