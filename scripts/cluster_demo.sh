#!/usr/bin/env bash
# The main job the way it runs on a cluster, on a one-node cluster on this machine: start a Ray head, submit
# jobs.align_dataset with `ray job submit`, follow its logs, print its status, stop the head. Exits 0 only if
# the job SUCCEEDED. Takes a few minutes (Ray start-up, two loads of the small default model, 2 prompts).
#   bash scripts/cluster_demo.sh                       # extra key=value arguments go to the job
# Ports: DIFFPO_RAY_PORT (default 6379) and DIFFPO_DASHBOARD_PORT (default 8265, the job API), each replaced by
# a free port if taken; the head's own helper ports are picked free (other Ray sessions on a shared machine
# hold the defaults, e.g. the dashboard agent's 52365, and a head whose job agent cannot bind never takes a job).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
REPO=$PWD
free_port() {  # $1 if it can be bound on 127.0.0.1, else any free port
  .venv/bin/python - "$1" <<'PY'
import socket, sys
for port in (int(sys.argv[1]), 0):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
PY
}
RAY_PORT=$(free_port "${DIFFPO_RAY_PORT:-6379}")
DASHBOARD_PORT=$(free_port "${DIFFPO_DASHBOARD_PORT:-8265}")
AGENT_PORT=$(free_port 0)
CLIENT_PORT=$(free_port 0)

# 1. The environment the head starts in is the one every job on it gets. Ray runs a job's entrypoint
#    (`python -m ...`) and its workers with the PATH of the process that ran `ray start`, so the venv's bin
#    must come first *before* `ray start` (otherwise `python` is the system one: "No module named 'pandas'").
#    On a real cluster the node image has the pinned stack installed and `ray start` runs from it.
export PATH="$REPO/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

# 2. Authentication. Ray 2.60 has token authentication, switched by RAY_AUTH_MODE (token | disabled) and
#    nothing else. Left unset, the two sides decide differently: `ray start --head` turns token auth ON by
#    itself whenever a token already exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, which
#    any earlier `ray.init()` on this machine writes), while the `ray job` CLI sends the token only when
#    RAY_AUTH_MODE=token is set in its own environment -> "AuthenticationError: ... Missing authentication
#    token". What a real cluster does, and what this script does: RAY_AUTH_MODE=token on the head, on every
#    node that joins it and in every shell that submits, all with the same token. `ray get-auth-token
#    --generate` prints the token in ~/.ray/auth_token and creates it first if there is none; copy it to
#    the other nodes and clients as RAY_AUTH_TOKEN (or that file). (RAY_AUTH_MODE=disabled would also work
#    on a head reachable from 127.0.0.1 only, but it leaves the job API open to anyone who can reach it.)
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  ray get-auth-token --generate >/dev/null   # prints the token; keep it off the terminal
fi

# 3. The head. `--block` keeps `ray start` in the foreground (here: in the background of this script) and
#    makes it stop every process of this head when it gets SIGTERM, so the trap below stops this head and
#    nothing else. (`ray stop --force` would SIGKILL every Ray process of this user on the machine, other
#    Ray sessions included; on a dedicated head node `ray stop` is the usual way.) No Serve traffic to drain
#    here, so the head skips the drain wait (30 s by default) that SIGTERM starts with.
#    On a loaded machine a head can fail to come up (its processes wait at most 30 s for each other), so a
#    start is retried up to 3 times; "Ray runtime started." in its log means the node is registered.
log_dir=$(mktemp -d)
head_pid=
stop_head() {
  if [ -n "$head_pid" ] && kill -0 "$head_pid" 2>/dev/null; then
    echo "[cluster_demo] stopping the head (pid $head_pid)" >&2
    kill -TERM "$head_pid" 2>/dev/null || true
  fi
  [ -z "$head_pid" ] || wait "$head_pid" 2>/dev/null || true
  # `ray start` records the head in /tmp/ray/ray_current_cluster and only `ray stop` removes it; left behind,
  # every later `ray.init()` on this machine would try to join this (gone) head instead of starting its own.
  if [ "$(cat /tmp/ray/ray_current_cluster 2>/dev/null)" = "127.0.0.1:$RAY_PORT" ]; then
    rm -f /tmp/ray/ray_current_cluster
  fi
}
trap 'stop_head; rm -rf "$log_dir"' EXIT
export RAY_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"   # where `ray job ...` sends its requests (the job API)

head_up() {  # the head logged its start, is alive, and its job API answers (any HTTP status)
  kill -0 "$head_pid" 2>/dev/null && grep -q "Ray runtime started" "$log_dir/head.log" &&
    curl -s -o /dev/null --max-time 5 "$RAY_ADDRESS/api/version"
}
for attempt in 1 2 3; do
  echo "[cluster_demo] starting the head (attempt $attempt), job API at $RAY_ADDRESS" >&2
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 ray start --head --block --port="$RAY_PORT" \
    --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --disable-usage-stats >"$log_dir/head.log" 2>&1 &
  head_pid=$!
  for _ in $(seq 1 90); do
    head_up && break
    kill -0 "$head_pid" 2>/dev/null || break
    sleep 2
  done
  if head_up && sleep 5 && head_up; then break; fi
  echo "[cluster_demo] the head did not come up; its log ends with:" >&2
  tail -n 15 "$log_dir/head.log" >&2
  stop_head
  head_pid=
  [ "$attempt" -lt 3 ] || exit 1
done

# 4. Submit. The working directory is uploaded to the cluster (the venv and earlier outputs are left out) and
#    the job runs in that copy, so the output path must be absolute: on a multi-node cluster, storage every
#    node can write to (Ray Data's write tasks run on any node); here, this checkout's outputs/. A rerun with
#    the same output.path would resume (skip every row already written), so the demo starts afresh.
#    Right after start-up the head may answer "No available agent to submit job, please try again later"
#    until its job agent has registered; the submission is retried for that (nothing has been created yet).
job_id="diffpo-cluster-demo-$(date +%Y%m%d-%H%M%S)"
rm -rf "$REPO/outputs/cluster_demo"
for try in $(seq 1 30); do
  if ray job submit --no-wait --log-style record --submission-id "$job_id" --working-dir . \
      --runtime-env-json '{"excludes": [".venv", "outputs", ".git", "**/__pycache__"]}' \
      -- python -m jobs.align_dataset ray.address=auto input.limit=2 output.path="$REPO/outputs/cluster_demo" \
      ray.progress_bars=false "$@" 2>"$log_dir/submit.err"; then
    break
  fi
  if ! grep -q "No available agent" "$log_dir/submit.err" || [ "$try" -eq 30 ]; then
    cat "$log_dir/submit.err" >&2
    exit 1
  fi
  echo "[cluster_demo] the head's job agent is not ready yet; retrying in 5 s" >&2
  sleep 5
done

# 5. Wait for it: follow its logs until it ends, then its status as the cluster records it.
ray job logs --follow --log-style record "$job_id" || true
status=$(python -c 'import sys, time; from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient()
while not (status := client.get_job_status(sys.argv[1])).is_terminal():  # in case the log stream broke off
    time.sleep(2)
print(status.value)' "$job_id")
ray job status --log-style record "$job_id" || true
echo "[cluster_demo] job $job_id: $status; outputs in $REPO/outputs/cluster_demo" >&2
[ "$status" = SUCCEEDED ]
