"""The `gcloud` argument lists and remote scripts for Cloud TPU VMs, as pure functions.

Nothing here runs anything: every function returns an argv list (for `subprocess.run`,
never a shell string) or the one string that `tpu-vm ssh --command=` sends to every
worker. Arguments the user gave reach the remote shell as positional arguments of a
fixed `bash -c SCRIPT` (each piece `shlex.quote`d), so names with spaces or quotes
survive and `shlex.split(command)[4:]` gives the original argv back.

Remote layout (on every worker, in the ssh user's home):
    ~/gopher.tar.gz   the commit to run (`git archive` here, scp'd to all workers)
    ~/gopher/         that commit, unpacked afresh by every setup
    ~/gopher-venv/    uv's Python 3.11 venv, synced from requirements-tpu.lock
    ~/gopher-logs/    worker-<N>.log, appended by every run; job.* (the running job's pid,
                      token and status) and `stop`'s marker
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
import uuid

# How a TPU is obtained. `guaranteed` and `best-effort` exist only for queued resources,
# and `--best-effort` only under `gcloud alpha` (checked against gcloud 528).
PROVISIONING = ("on-demand", "spot", "reserved", "guaranteed", "best-effort")
QUEUED_ONLY = ("guaranteed", "best-effort")

# TPU VM base images by generation; v4's Ubuntu 22.04 image also serves older chips.
RUNTIME_VERSIONS = {
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"

UV_VERSION = "0.13.9"
PYTHON_VERSION = "3.11"  # jax 0.10 needs >= 3.11; TPU VM images ship 3.10
TPU_LOCK = "requirements-tpu.lock"
REMOTE_TARBALL = "gopher.tar.gz"


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """One TPU VM (or the queued resource that owns it)."""

    name: str
    zone: str
    accelerator_type: str = "v4-32"
    runtime_version: str | None = None  # None: chosen from the accelerator generation
    project: str | None = None  # None: gcloud's configured project
    provisioning: str = "on-demand"
    queued: bool = False  # ask through a queued resource (waits for capacity)
    queued_resource: str | None = None  # its id; None: the same as `name`

    def __post_init__(self) -> None:
        if self.provisioning not in PROVISIONING:
            raise ValueError(
                f"provisioning={self.provisioning!r}; use one of {', '.join(PROVISIONING)}"
            )

    @property
    def is_queued(self) -> bool:
        # Guaranteed and best-effort capacity can only be had through the queue.
        return self.queued or self.provisioning in QUEUED_ONLY

    @property
    def qr_id(self) -> str:
        return self.queued_resource or self.name

    @property
    def runtime(self) -> str:
        generation = self.accelerator_type.split("-")[0]
        return self.runtime_version or RUNTIME_VERSIONS.get(generation, DEFAULT_RUNTIME)


def _where(zone: str, project: str | None) -> list[str]:
    return [f"--zone={zone}"] + ([f"--project={project}"] if project else [])


def _tpus(*group: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *group]


def create_argv(spec: TpuSpec) -> list[str]:
    """`tpu-vm create`, or `queued-resources create` (under `alpha` for best-effort)."""
    where = _where(spec.zone, spec.project)
    if spec.is_queued:
        track = ["alpha"] if spec.provisioning == "best-effort" else []
        tier = [] if spec.provisioning == "on-demand" else [f"--{spec.provisioning}"]
        return [
            "gcloud",
            *track,
            "compute",
            "tpus",
            "queued-resources",
            "create",
            spec.qr_id,
            f"--node-id={spec.name}",
            f"--accelerator-type={spec.accelerator_type}",
            f"--runtime-version={spec.runtime}",
            *where,
            *tier,
        ]
    tier = [] if spec.provisioning == "on-demand" else [f"--{spec.provisioning}"]
    return [
        *_tpus("tpu-vm", "create"),
        spec.name,
        f"--accelerator-type={spec.accelerator_type}",
        f"--version={spec.runtime}",
        *where,
        *tier,
    ]


def describe_argv(spec: TpuSpec) -> list[str]:
    """Prints one word: the node's state, or the queued resource's."""
    where = _where(spec.zone, spec.project)
    if spec.is_queued:
        return [
            *_tpus("queued-resources", "describe"),
            spec.qr_id,
            *where,
            "--format=value(state.state)",
        ]
    return [*_tpus("tpu-vm", "describe"), spec.name, *where, "--format=value(state)"]


def delete_argv(spec: TpuSpec) -> list[str]:
    """Deletes the node; for a queued resource `--force` deletes its node with it."""
    where = _where(spec.zone, spec.project)
    if spec.is_queued:
        return [
            *_tpus("queued-resources", "delete"),
            spec.qr_id,
            *where,
            "--force",
            "--quiet",
        ]
    return [*_tpus("tpu-vm", "delete"), spec.name, *where, "--quiet"]


def list_argvs(zone: str, project: str | None = None) -> list[list[str]]:
    """The nodes, then the queued resources (which hold quota even when suspended)."""
    where = _where(zone, project)
    return [
        ["gcloud", "compute", "tpus", "tpu-vm", "list", *where],
        ["gcloud", "compute", "tpus", "queued-resources", "list", *where],
    ]


def stale_queued_argv(zone: str, project: str | None = None) -> list[str]:
    """Lists, one id a line, the queued resources that are SUSPENDED or FAILED."""
    return [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "list",
        *_where(zone, project),
        "--filter=state.state:(SUSPENDED FAILED)",
        "--format=value(name.basename())",
    ]


def delete_queued_argv(qr_id: str, zone: str, project: str | None = None) -> list[str]:
    return delete_argv(TpuSpec(name=qr_id, zone=zone, project=project, queued=True))


def scp_argv(spec: TpuSpec, local: str, remote: str) -> list[str]:
    """Copies one local file to `remote` (relative to the home) on every worker."""
    return [
        *_tpus("tpu-vm", "scp"),
        local,
        f"{spec.name}:{remote}",
        "--worker=all",
        *_where(spec.zone, spec.project),
    ]


def ssh_argv(spec: TpuSpec, command: str, worker: str = "all") -> list[str]:
    """Runs `command` on the workers at once; exits with the first non-zero status."""
    return [
        *_tpus("tpu-vm", "ssh"),
        spec.name,
        f"--worker={worker}",
        f"--command={command}",
        *_where(spec.zone, spec.project),
    ]


def archive_argv(ref: str, output: str) -> list[str]:
    """Packs a commit (not the work tree: uncommitted edits do not travel)."""
    # --end-of-options: a ref that starts with "-" is a ref (git then says it is unknown),
    # never an option such as --remote or --exec.
    return ["git", "archive", "--format=tar.gz", f"--output={output}", "--end-of-options", ref]


# The scripts are one statement a line, joined with "; " so that a dry run prints each
# argv on one line. Every setup unpacks the new code (keeping what runs wrote beside it);
# the install itself is skipped when the stamp for this lock's sha256 is there, so a re-run
# with the same lock does nothing.
# `uv pip sync` makes the venv exactly the lock (removing what it lacks), hashes checked.
SETUP_SCRIPT = "; ".join(
    [
        "set -euo pipefail",
        'tarball="$1"; uv_version="$2"; python_version="$3"; lock_name="$4"',
        'code="$HOME/gopher"; venv="$HOME/gopher-venv"',
        'rm -rf "$code.new" && mkdir -p "$code.new" && tar -xzf "$HOME/$tarball" -C "$code.new"',
        # What a run wrote beside the code (a relative --workdir such as runs/44m, its
        # checkpoints) is not code: carried into the new tree, never deleted. The code's
        # top-level names are listed in .gopher-code (before a first list: the new tree's).
        'tar -tzf "$HOME/$tarball" | sed "s#^\\./##" | cut -d/ -f1 | sort -u > "$code.new/.gopher-code"',
        'known="$code/.gopher-code"; [ -f "$known" ] || known="$code.new/.gopher-code"',
        'for p in "$code"/* "$code"/.[!.]*; do [ -e "$p" ] || continue; n="${p##*/}";'
        ' [ "$n" = .gopher-code ] || grep -qxF "$n" "$known" || [ -e "$code.new/$n" ] ||'
        ' mv "$p" "$code.new/"; done',
        'rm -rf "$code" && mv "$code.new" "$code"',
        'lock="$code/$lock_name"',
        'stamp="$venv/.gopher-lock-$(sha256sum "$lock" | cut -d" " -f1)"',
        'if [ -f "$stamp" ]; then echo "setup: $(hostname): up to date"; exit 0; fi',
        'export PATH="$HOME/.local/bin:$PATH"',
        # Ubuntu 22.04's pip installs --user; 24.04's wants --break-system-packages too.
        'if [ "$(uv --version 2>/dev/null | cut -d" " -f2)" != "$uv_version" ]; then'
        ' python3 -m pip install --user -q "uv==$uv_version" ||'
        ' python3 -m pip install --user -q --break-system-packages "uv==$uv_version"; fi',
        'uv python install "$python_version"',
        'uv venv --allow-existing --python "$python_version" "$venv"',
        'uv pip sync --python "$venv/bin/python" --require-hashes "$lock"',
        'uv pip install --python "$venv/bin/python" --no-deps -e "$code"',
        'rm -f "$venv"/.gopher-lock-* && touch "$stamp"',
        'echo "setup: $(hostname): installed $lock_name"',
    ]
)

# A run starts the command detached (its own session, output to the worker's log) and
# follows the log until it ends, then exits with its status. gcloud itself runs the whole
# command again on a worker whose ssh connection dropped (up to 10 times), and supervise
# reruns it after gcloud gave up (255) on a node still READY: such a rerun carries the same
# token (one per `launch.tpu run` or supervise attempt), finds the job it started still
# running and follows it, or reports how it ended, instead of starting another. A new run
# (another token) first stops the previous job: TERM to its process group and up to
# STOP_GRACE_S to checkpoint and exit (75), then kill -9; then anything else that still
# holds the chips: a killed run leaves libtpu's lock file, and maybe a process on
# /dev/accel* (v4) or /dev/vfio/* (v5p), and the next run would fail "TPU in use".
METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
STOP_GRACE_S = 60  # the remote GOPHER_STOP_GRACE_S overrides it (the tests shorten it)
# `launch.tpu stop` leaves this file in ~/gopher-logs: the job it stops then ends with
# STOPPED_EXIT (its own status were it one of KEPT_WHEN_STOPPED), which supervise treats
# as final; a TERM alone gives 75, which supervise retries. A new run removes the file.
STOP_MARKER = "stop-requested"
STOPPED_EXIT = 76
KEPT_WHEN_STOPPED = (0, 2, 3, 4, 130)  # launch.tpu.FINAL_EXITS: already final, kept
JOB_WRAPPER = (  # $1 log, $2 job file prefix, then the command; in its own session
    # HUP ignored (nohup: the job outlives the ssh session); TERM trapped, not ignored, so
    # the command gets the default and this shell survives `stop` to write the status.
    'trap "" HUP; trap ":" TERM; echo $$ > "$2.pid.new" && mv "$2.pid.new" "$2.pid"; '
    '"${@:3}" >> "$1" 2>&1 < /dev/null; echo $? > "$2.status"'
)
RUN_SCRIPT = "; ".join(
    [
        "set -u",
        'token="$1"; shift',
        f"worker=$(curl -sf -H Metadata-Flavor:Google {METADATA}/agent-worker-number || hostname)",
        'logs="$HOME/gopher-logs"; mkdir -p "$logs" || exit 1',
        'log="$logs/worker-$worker.log"; job="$logs/job"; touch "$log"; from=$(stat -c %s "$log")',
        f'stop="$logs/{STOP_MARKER}"; grace="${{GOPHER_STOP_GRACE_S:-{STOP_GRACE_S}}}"',
        f"wrapper={shlex.quote(JOB_WRAPPER)}",
        # The wrapper leads its own process group (setsid), so its pid names the group. A
        # job whose status is written has ended (and its pid may since be another's).
        'stop_job() { old=$(cat "$job.pid" 2>/dev/null || true);'
        ' if [ -z "$old" ] || [ -e "$job.status" ] || ! kill -0 -- "-$old" 2>/dev/null;'
        " then return 0; fi;"
        ' echo "worker $worker: stopping the previous job (pid $old): TERM, up to ${grace}s'
        ' to checkpoint";'
        ' kill -TERM -- "-$old" 2>/dev/null;'
        ' for _ in $(seq $((grace * 10))); do kill -0 -- "-$old" 2>/dev/null || return 0;'
        " sleep 0.1; done;"
        ' echo "worker $worker: the previous job still runs after ${grace}s: killing it";'
        ' kill -9 -- "-$old" 2>/dev/null; sleep 1; }',
        # The token first, before the old job is stopped: the older run still following it
        # then sees it replaced when it ends, rather than report its status as its own.
        'start() { echo "$token" > "$job.token"; stop_job;'
        " pids=$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u);"
        ' if [ -n "$pids" ]; then echo "worker $worker: killing stale TPU users: $pids";'
        " sudo kill -9 $pids; sleep 2; fi; sudo rm -f /tmp/libtpu_lockfile;"
        ' cd "$HOME/gopher" || return 1; export PATH="$HOME/gopher-venv/bin:$PATH";'
        ' rm -f "$job.pid" "$job.status" "$stop";'
        ' (setsid bash -c "$wrapper" gopher-job "$log" "$job" "$@" > /dev/null 2>&1 < /dev/null &);'
        ' for _ in $(seq 300); do [ -s "$job.pid" ] && return 0; sleep 0.1; done; return 1; }',
        # The job's status; after `launch.tpu stop`, STOPPED_EXIT unless already final.
        # Once a newer run has replaced the job, the job files are that run's: not ours.
        'finish() { if [ "$(cat "$job.token" 2>/dev/null)" != "$token" ]; then'
        ' echo "worker $worker: this run\'s job was replaced by a newer run"; exit 1; fi;'
        ' status=$(cat "$job.status" 2>/dev/null || echo 1);'
        ' if [ -e "$stop" ]; then case "$status" in'
        f" {'|'.join(map(str, KEPT_WHEN_STOPPED))}) ;;"
        f' *) echo "worker $worker: stopped by launch.tpu stop (exit $status)";'
        f" status={STOPPED_EXIT};; esac; fi;"
        ' exit "$status"; }',
        'pid=$(cat "$job.pid" 2>/dev/null || true)',
        # A rerun of this very run: follow its job, or say how it ended; else start
        'if [ "$(cat "$job.token" 2>/dev/null)" = "$token" ]; then'
        ' if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then'
        ' echo "worker $worker: reattached to the running job (pid $pid)";'
        ' else echo "worker $worker: this run\'s job has ended"; finish; fi;'
        ' else start "$@" || exit 1; pid=$(cat "$job.pid"); fi',
        # -s 0.2: notice the job's end within 0.2 s, not tail's default 1 s.
        'tail -s 0.2 -c +$((from + 1)) -f --pid="$pid" "$log" | sed -u "s/^/[worker $worker] /"',
        "finish",
    ]
)

# SIGTERM to the job's process group (the wrapper leads its own session): the train
# program checkpoints at a step every host agrees on and exits 75. The marker, left
# first, makes that the end of a supervise loop too (see STOP_MARKER).
STOP_SCRIPT = "; ".join(
    [
        'logs="$HOME/gopher-logs"; pid=$(cat "$logs/job.pid" 2>/dev/null || true)',
        'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then'
        f' touch "$logs/{STOP_MARKER}"; kill -TERM -- "-$pid";'
        ' echo "$(hostname): stopping the job (pid $pid): it checkpoints, then exits";'
        ' else echo "$(hostname): no job running"; fi',
    ]
)

# Each line carries the worker's prefix, as `run` shows it: --worker=all interleaves them.
LOGS_SCRIPT = "; ".join(
    [
        "set -o pipefail",
        'lines="$1"; follow="$2"',
        f"worker=$(curl -sf -H Metadata-Flavor:Google {METADATA}/agent-worker-number || hostname)",
        'cd "$HOME/gopher-logs" 2>/dev/null || { echo "[worker $worker] no logs yet"; exit 0; }',
        'if [ "$follow" = 1 ]; then tail -n "$lines" -F worker-*.log;'
        ' else tail -n "$lines" worker-*.log; fi | sed -u "s/^/[worker $worker] /"',
    ]
)


def _bash(script: str, name: str, *args: str) -> str:
    # `bash -c SCRIPT NAME ARGS...`: the script sees ARGS as "$@", never re-parsed.
    return shlex.join(["bash", "-c", script, name, *args])


def setup_command(lock_name: str = TPU_LOCK) -> str:
    return _bash(
        SETUP_SCRIPT, "gopher-setup", REMOTE_TARBALL, UV_VERSION, PYTHON_VERSION, lock_name
    )


def run_command(train_argv: list[str], token: str = "") -> str:
    """The remote command of one `run`; `token` tells gcloud's own reruns of it (which
    attach to its job) from a new run (which replaces the job). Default: a fresh one."""
    if not train_argv:
        raise ValueError(
            "no train command; add one after `--`, e.g. -- python -m experiments.train"
        )
    return _bash(RUN_SCRIPT, "gopher-run", token or new_token(), *train_argv)


def new_token() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def stop_command() -> str:
    return _bash(STOP_SCRIPT, "gopher-stop")


def logs_command(lines: int = 100, follow: bool = False) -> str:
    return _bash(LOGS_SCRIPT, "gopher-logs", str(lines), "1" if follow else "0")
