"""launch.tpu: the gcloud argv lists, the remote scripts, and the restart loop.

The argv lists are checked three ways: against hand-written expectations, by the real
`gcloud` parser offline (a valid list gets as far as "no active account"; a wrong flag
gets "unrecognized arguments"), and the remote scripts by running them in a local bash
with fake `sudo`/`curl`/`uv`. The restart loop runs against a scripted fake `gcloud`.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launch import gcloud as g
from launch import tpu

NASTY = ["python", "-c", "import sys; print(sys.argv[1:])", "a b", "it's", '"q"', "$HOME", "`x`"]
ZONE, PROJECT = "us-central2-b", "my-proj"


def spec(**kw) -> g.TpuSpec:
    return g.TpuSpec(**{"name": "t1", "zone": ZONE, "project": PROJECT, **kw})


# --- argv lists ------------------------------------------------------------------------

WHERE = [f"--zone={ZONE}", f"--project={PROJECT}"]
NODE = ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--accelerator-type=v4-32"]
QR = ["compute", "tpus", "queued-resources", "create", "t1", "--node-id=t1"]
QR_TAIL = ["--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", *WHERE]


@pytest.mark.parametrize(
    "kw, want",
    [
        ({}, [*NODE, "--version=tpu-ubuntu2204-base", *WHERE]),
        ({"provisioning": "spot"}, [*NODE, "--version=tpu-ubuntu2204-base", *WHERE, "--spot"]),
        ({"queued": True}, ["gcloud", *QR, *QR_TAIL]),
        ({"queued": True, "provisioning": "spot"}, ["gcloud", *QR, *QR_TAIL, "--spot"]),
        ({"queued": True, "provisioning": "reserved"}, ["gcloud", *QR, *QR_TAIL, "--reserved"]),
        # guaranteed and best-effort imply a queued resource; best-effort needs alpha.
        ({"provisioning": "guaranteed"}, ["gcloud", *QR, *QR_TAIL, "--guaranteed"]),
        ({"provisioning": "best-effort"}, ["gcloud", "alpha", *QR, *QR_TAIL, "--best-effort"]),
    ],
)
def test_create_argv(kw: dict, want: list[str]) -> None:
    assert g.create_argv(spec(**kw)) == want


def test_runtime_version_follows_the_generation_unless_given() -> None:
    assert "--version=v2-alpha-tpuv5" in g.create_argv(spec(accelerator_type="v5p-16"))
    assert "--version=mine" in g.create_argv(
        spec(accelerator_type="v5p-16", runtime_version="mine")
    )


def test_unknown_provisioning_is_rejected() -> None:
    with pytest.raises(ValueError, match="preemptible.*use one of"):
        spec(provisioning="preemptible")


def test_delete_describe_and_stale_queued_argv() -> None:
    qr = spec(queued=True, queued_resource="q 1")
    assert g.delete_argv(qr) == [
        *["gcloud", "compute", "tpus", "queued-resources", "delete", "q 1", *WHERE],
        *["--force", "--quiet"],
    ]
    assert g.delete_argv(spec())[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t1"]
    assert g.describe_argv(qr)[4:6] == ["describe", "q 1"]
    assert g.describe_argv(qr)[-1] == "--format=value(state.state)"
    assert "--filter=state.state:(SUSPENDED FAILED)" in g.stale_queued_argv(ZONE, PROJECT)


def untokened(argv: list[str]) -> list[str]:
    """An ssh argv with its run token (one per `launch.tpu run`) replaced by "TOKEN"."""
    out = []
    for a in argv:
        if a.startswith("--command=") and "gopher-run" in a:
            words = shlex.split(a.removeprefix("--command="))
            words[4] = "TOKEN"
            a = "--command=" + shlex.join(words)
        out.append(a)
    return out


def test_remote_command_is_one_argv_element_that_parses_back() -> None:
    argv = g.ssh_argv(spec(name="it's"), g.run_command(NASTY, token="t-1"))
    (command,) = [a for a in argv if a.startswith("--command=")]
    assert argv[5] == "it's" and "--worker=all" in argv
    assert shlex.split(command.removeprefix("--command=")) == [
        *["bash", "-c", g.RUN_SCRIPT, "gopher-run", "t-1"],
        *NASTY,
    ]
    assert g.run_command(NASTY) != g.run_command(NASTY)  # a fresh token each run
    with pytest.raises(ValueError, match="no train command"):
        g.run_command([])


# --- the remote scripts, run in a local bash as sshd would run them -----------------------


def _fake_tools(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    tools = {
        "sudo": 'echo "sudo $*" >> "$HOME/sudo.log"',  # records, runs nothing as root
        "curl": "echo 3",  # the metadata server's agent-worker-number
        "uv": textwrap.dedent("""\
            echo "uv $*" >> "$HOME/uv.log"
            [ "$1" = --version ] && echo "uv 0.13.9"
            [ "$1" = venv ] && mkdir -p "${@: -1}"
            exit 0"""),
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


def _remote(command: str, home: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": f"{home / 'bin'}:/usr/bin:/bin", **extra_env}
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30
    )


def test_run_script_passes_argv_verbatim_and_keeps_the_exit_status(tmp_path: Path) -> None:
    _fake_tools(tmp_path / "bin")
    (tmp_path / "gopher").mkdir()
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(75)", *NASTY[3:]]
    done = _remote(g.run_command(argv), tmp_path)
    assert done.returncode == 75, done.stderr
    assert done.stdout.splitlines()[-1] == f"[worker 3] {NASTY[3:]!r}"
    assert (tmp_path / "gopher-logs" / "worker-3.log").read_text() == f"{NASTY[3:]!r}\n"
    assert "rm -f /tmp/libtpu_lockfile" in (tmp_path / "sudo.log").read_text()


def test_a_dropped_ssh_connection_leaves_the_job_running_and_the_rerun_attaches(
    tmp_path: Path,
) -> None:
    """The session that started the job dies (ssh dropped: its bash, tail and sed killed);
    gcloud's rerun of the same command (the same token) follows the still-running job to
    its status instead of killing it and starting over; a rerun after it ended reports its
    status; a new run (another token) runs the command again."""
    _fake_tools(tmp_path / "bin")
    (tmp_path / "gopher").mkdir()
    count = tmp_path / "count"
    body = (
        "import pathlib, sys, time\n"
        f"c = pathlib.Path({str(count)!r}); c.write_text(c.read_text() + 'x' if c.exists() else 'x')\n"
        "for i in range(4): print('step', i, flush=True); time.sleep(0.4)\n"
        "sys.exit(75)\n"
    )
    argv = [sys.executable, "-c", body]
    env = {"HOME": str(tmp_path), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    session = subprocess.Popen(
        ["bash", "-c", g.run_command(argv, token="run-1")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = tmp_path / "gopher-logs" / "worker-3.log"
    deadline = time.monotonic() + 20
    while "step 1" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(session.pid, signal.SIGKILL)  # the ssh session is gone, with its children
    session.wait()
    again = _remote(g.run_command(argv, token="run-1"), tmp_path)  # gcloud's rerun
    assert again.returncode == 75, again.stderr
    assert "reattached to the running job" in again.stdout
    assert "[worker 3] step 3" in again.stdout and count.read_text() == "x"  # ran once
    after = _remote(g.run_command(argv, token="run-1"), tmp_path)
    assert after.returncode == 75 and "this run's job has ended" in after.stdout
    assert count.read_text() == "x"
    fresh = _remote(g.run_command(argv, token="run-2"), tmp_path)  # a new `launch.tpu run`
    assert fresh.returncode == 75 and count.read_text() == "xx"
    assert log.read_text().count("step 3") == 2


def test_stop_sends_the_job_sigterm_and_run_reports_its_status(tmp_path: Path) -> None:
    """`launch.tpu stop`: SIGTERM to the detached job's process group; the train program
    (here a stand-in that exits 75 on SIGTERM, as experiments.train does after its
    checkpoint) ends and the attached `run` exits STOPPED_EXIT, not the 75 of a
    preemption, which supervise would restart. The next run is not a stopped one."""
    _fake_tools(tmp_path / "bin")
    (tmp_path / "gopher").mkdir()
    body = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('checkpointed', flush=True), sys.exit(75)))\n"
        "print('training', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {"HOME": str(tmp_path), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    session = subprocess.Popen(
        ["bash", "-c", g.run_command([sys.executable, "-c", body])],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "gopher-logs" / "worker-3.log"
    deadline = time.monotonic() + 20
    while (
        "training" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    stopped = _remote(g.stop_command(), tmp_path)
    assert stopped.returncode == 0 and "stopping the job" in stopped.stdout
    out, _ = session.communicate(timeout=30)
    assert session.returncode == g.STOPPED_EXIT and "[worker 3] checkpointed" in out
    assert g.STOPPED_EXIT in tpu.FINAL_EXITS  # supervise stops there too
    assert "no job running" in _remote(g.stop_command(), tmp_path).stdout
    again = _remote(g.run_command([sys.executable, "-c", "raise SystemExit(75)"]), tmp_path)
    assert again.returncode == 75, again.stdout


def test_stop_keeps_a_final_status_and_matches_supervise() -> None:
    """The statuses a stop leaves as they are are exactly supervise's other final ones."""
    assert set(tpu.FINAL_EXITS) == {*g.KEPT_WHEN_STOPPED, g.STOPPED_EXIT}


def _alive(pid: int) -> bool:
    try:  # a zombie has exited; only its parent has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(path: Path, text: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text() if path.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)


def _job_home(tmp_path: Path) -> tuple[Path, dict]:
    _fake_tools(tmp_path / "bin")
    (tmp_path / "gopher").mkdir()
    return tmp_path / "gopher-logs" / "worker-3.log", {
        "HOME": str(tmp_path),
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
    }


def _start_job(tmp_path: Path, code: str, token: str, ready: str):
    """A run of `python -c code` under `token`, followed until its log shows `ready`:
    (the worker's log, the following run's process)."""
    log, env = _job_home(tmp_path)
    run = subprocess.Popen(
        ["bash", "-c", g.run_command([sys.executable, "-c", code], token=token)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    _wait_for(log, ready)
    return log, run


def test_a_new_run_stops_the_previous_job_with_sigterm_first(tmp_path: Path) -> None:
    """A new run (another token) sends the still-running job SIGTERM and waits for it to
    checkpoint and exit before it starts its own; the old run, still following its job,
    then says it was replaced rather than report the new job's status."""
    polite = (
        "import signal, sys, time\n"
        "def stop(*_): time.sleep(0.3); print('checkpointed', flush=True); sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('training', flush=True)\n"
        "time.sleep(60)\n"
    )
    log, first = _start_job(tmp_path, polite, "a", "training")
    second = _remote(g.run_command([sys.executable, "-c", "print('second')"], "b"), tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "stopping the previous job" in second.stdout
    text = log.read_text()
    assert "checkpointed" in text and text.index("checkpointed") < text.index("second")
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 1 and "replaced by a newer run" in out


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    pid_file = tmp_path / "stubborn.pid"
    stubborn = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('stubborn', flush=True)\n"
        "time.sleep(60)\n"
    )
    _, third = _start_job(tmp_path, stubborn, "c", "stubborn")
    pid = int(pid_file.read_text())
    begun = time.monotonic()
    fourth = _remote(
        g.run_command([sys.executable, "-c", "print('fourth')"], "d"),
        tmp_path,
        GOPHER_STOP_GRACE_S="1",
    )
    assert fourth.returncode == 0 and "killing it" in fourth.stdout, fourth.stdout
    assert not _alive(pid) and time.monotonic() - begun < 15
    third.communicate(timeout=30)


def test_logs_lines_carry_the_worker_prefix(tmp_path: Path) -> None:
    """`logs` on all workers interleaves their lines: each says whose it is, as in `run`."""
    _fake_tools(tmp_path / "bin")
    assert _remote(g.logs_command(), tmp_path).stdout == "[worker 3] no logs yet\n"
    (tmp_path / "gopher-logs").mkdir()
    (tmp_path / "gopher-logs" / "worker-3.log").write_text("step 1\nstep 2\nstep 3\n")
    done = _remote(g.logs_command(lines=2), tmp_path)
    assert done.returncode == 0 and done.stdout == "[worker 3] step 2\n[worker 3] step 3\n"


def _tarball(path: Path, lock: str, *extra: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in ((g.TPU_LOCK, lock), *((e, "code") for e in extra)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_setup_script_installs_once_per_lock_hash(tmp_path: Path) -> None:
    _fake_tools(tmp_path / "bin")
    uv_log = tmp_path / "uv.log"

    def setup(lock: str, *extra: str) -> list[str]:
        _tarball(tmp_path / g.REMOTE_TARBALL, lock, *extra)
        uv_log.unlink(missing_ok=True)
        done = _remote(g.setup_command(), tmp_path)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "gopher" / g.TPU_LOCK).read_text() == lock  # fresh code each time
        return uv_log.read_text().splitlines() if uv_log.exists() else []

    calls = setup("jax==0.10.2\n")
    venv, lock = tmp_path / "gopher-venv", tmp_path / "gopher" / g.TPU_LOCK
    assert calls == [
        "uv --version",
        f"uv python install {g.PYTHON_VERSION}",
        f"uv venv --allow-existing --python {g.PYTHON_VERSION} {venv}",
        f"uv pip sync --python {venv}/bin/python --require-hashes {lock}",
        f"uv pip install --python {venv}/bin/python --no-deps -e {tmp_path / 'gopher'}",
    ]
    # A run's relative workdir beside the code survives the next setup (supervise re-runs
    # setup before every restart); code the new commit dropped does not.
    assert setup("jax==0.10.2\n", "old_module.py", "pkg/a.py") == []  # same lock: no install
    ckpt = tmp_path / "gopher" / "runs" / "44m" / "checkpoints" / "1000"
    ckpt.mkdir(parents=True)
    (ckpt / "state").write_text("weights")
    assert setup("jax==0.10.2\n", "pkg/a.py") == []
    assert (ckpt / "state").read_text() == "weights"
    assert not (tmp_path / "gopher" / "old_module.py").exists()
    assert (tmp_path / "gopher" / "pkg" / "a.py").read_text() == "code"
    assert len(setup("jax==0.10.3\n")) == 5  # new lock: install again
    assert len(list(venv.glob(".gopher-lock-*"))) == 1


# --- the real gcloud, offline: valid lists reach the credentials check -----------------

NO_ACCOUNT = "You do not currently have an active account selected"
GCLOUD_CASES = {
    "create-spot": g.create_argv(spec(provisioning="spot")),
    "queued-guaranteed": g.create_argv(spec(provisioning="guaranteed")),
    "queued-reserved": g.create_argv(spec(queued=True, provisioning="reserved")),
    "queued-spot": g.create_argv(spec(queued=True, provisioning="spot", name="a b")),
    "best-effort": g.create_argv(spec(provisioning="best-effort")),
    "describe-queued": g.describe_argv(spec(queued=True)),
    "delete-queued": g.delete_argv(spec(queued=True)),
    "stale-queued": g.stale_queued_argv(ZONE, PROJECT),
    "scp": g.scp_argv(spec(), "/etc/hostname", g.REMOTE_TARBALL),
    "ssh-run": g.ssh_argv(spec(name="it's"), g.run_command(NASTY)),
}
# The negative controls: the same check must be able to fail.
GCLOUD_WRONG = {
    "wrong-flag": [*g.create_argv(spec()), "--no-such-flag"],
    "best-effort-without-alpha": [a for a in GCLOUD_CASES["best-effort"] if a != "alpha"],
}


@pytest.fixture(scope="module")
def gcloud_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    binary = shutil.which("gcloud")
    if binary is None:
        pytest.skip("the Google Cloud SDK (gcloud) is not installed")
    home = tmp_path_factory.mktemp("home")  # ssh/scp must not touch the real ~/.ssh

    def call(argv: list[str]) -> tuple[int, str]:
        env = {
            **os.environ,
            "HOME": str(home),
            "CLOUDSDK_CONFIG": str(tmp_path_factory.mktemp("gcloud-config")),
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "NO_GCE_CHECK": "True",
            "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        }
        done = subprocess.run(
            [binary, *argv[1:]], env=env, capture_output=True, text=True, timeout=120
        )
        return done.returncode, done.stderr

    cases = {**GCLOUD_CASES, **GCLOUD_WRONG}
    with ThreadPoolExecutor(2) as pool:  # gcloud takes ~1.5 s of CPU to start
        return dict(zip(cases, pool.map(call, cases.values()), strict=True))


@pytest.mark.parametrize("case", sorted(GCLOUD_CASES))
def test_real_gcloud_accepts_the_argv(case: str, gcloud_results: dict) -> None:
    status, stderr = gcloud_results[case]
    if case == "best-effort" and "Invalid choice: 'alpha'" in stderr:
        pytest.skip("the gcloud `alpha` component is not installed")
    assert status != 0 and NO_ACCOUNT in stderr, stderr
    assert "unrecognized arguments" not in stderr and "Invalid choice" not in stderr


@pytest.mark.parametrize("case", sorted(GCLOUD_WRONG))
def test_real_gcloud_rejects_a_wrong_flag(case: str, gcloud_results: dict) -> None:
    status, stderr = gcloud_results[case]
    assert status == 2 and "unrecognized arguments" in stderr, stderr
    assert NO_ACCOUNT not in stderr


# --- the restart loop against a scripted fake gcloud -----------------------------------

FAKE_GCLOUD = """\
import json, os, shutil, sys
here = os.path.dirname(os.path.abspath(__file__))
plan = json.load(open(os.path.join(here, "plan.json")))
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")

def take(key):  # the next scripted value; the last one repeats
    path = os.path.join(here, key + ".n")
    n = int(open(path).read()) if os.path.exists(path) else 0
    open(path, "w").write(str(n + 1))
    return plan[key][min(n, len(plan[key]) - 1)]

args = sys.argv[1:]
if "describe" in args:
    state = take("states")
    if state == "NOT_FOUND":  # gcloud's words (marin-community/marin#3404)
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
                 "'projects/p/locations/z/nodes/t1' was not found.")
    if state == "OFFLINE":
        sys.exit("ERROR: gcloud crashed (ConnectionError): HTTPSConnectionPool("
                 "host='tpu.googleapis.com', port=443): Max retries exceeded")
    print(state)
elif "ssh" in args and any("gopher-run" in a for a in args):
    sys.exit(take("runs"))
elif "create" in args and "creates" in plan:
    sys.exit(take("creates"))
elif "scp" in args and args[4].endswith(".tar.gz"):  # keep what would be copied
    shutil.copy(args[4], os.path.join(here, "copied.tar.gz"))
"""


@pytest.fixture
def fake_gcloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def start(states: list[str], runs: list[int], **more: list) -> Path:
        plan = {"states": states, "runs": runs, **more}
        (bin_dir / "plan.json").write_text(json.dumps(plan))
        return bin_dir / "calls.jsonl"

    return start


def kinds(calls: Path) -> list[str]:
    """Each gcloud call as a word: describe, delete, create, scp, setup, run."""
    out = []
    for line in calls.read_text().splitlines():
        args = json.loads(line)
        if "ssh" in args:
            out.append("run" if any("gopher-run" in a for a in args) else "setup")
        else:
            out.append(next(a for a in ("describe", "delete", "create", "scp") if a in args))
    return out


def supervise(train: list[str], **kw) -> tuple[int, list[float]]:
    slept: list[float] = []
    status = tpu.supervise(
        spec(), tpu.Runner(), train, "/dev/null", poll_s=7, sleep=slept.append, log=print, **kw
    )
    return status, slept


def test_restart_loop_recreates_after_preemption_and_stops_when_done(fake_gcloud) -> None:
    calls = fake_gcloud(["READY", "PREEMPTED", "SUSPENDED", "READY"], runs=[75, 0])
    assert supervise(NASTY)[0] == 0
    assert kinds(calls) == [
        *["describe", "scp", "setup", "run"],  # first try: preempted (75)
        *["describe", "delete", "create"],  # PREEMPTED
        *["describe", "delete", "create"],  # SUSPENDED
        *["describe", "scp", "setup", "run"],  # READY again: the same command, exits 0
    ]
    runs = [json.loads(x) for x in calls.read_text().splitlines() if "gopher-run" in x]
    want = untokened(g.ssh_argv(spec(), g.run_command(NASTY))[1:])
    assert untokened(runs[0]) == untokened(runs[1]) == want
    # After a preemption the job is gone: a new attempt, a new run (another token).
    assert runs[0] != runs[1]


def _runs(calls: Path) -> list[list[str]]:
    return [json.loads(x) for x in calls.read_text().splitlines() if "gopher-run" in x]


def test_lost_ssh_on_a_ready_node_reattaches_to_the_job(fake_gcloud) -> None:
    """gcloud gave up on ssh (255) while the node stays READY: the job may run on, so the
    rerun is the same run (same token: it follows the job or gets its status), without a
    setup that would replace the code under it."""
    calls = fake_gcloud(["READY"], runs=[255, 255, 0])
    assert supervise(NASTY)[0] == 0
    assert kinds(calls) == [
        *["describe", "scp", "setup", "run"],
        *["describe", "run", "describe", "run"],  # READY each time: reattach
    ]
    runs = _runs(calls)
    assert runs[0] == runs[1] == runs[2]


def test_lost_ssh_on_a_preempted_node_is_a_new_attempt(fake_gcloud) -> None:
    calls = fake_gcloud(["READY", "PREEMPTED", "READY"], runs=[255, 0])
    assert supervise(NASTY)[0] == 0
    assert kinds(calls) == [
        *["describe", "scp", "setup", "run"],  # 255; then the node is PREEMPTED
        *["describe", "delete", "create"],
        *["describe", "scp", "setup", "run"],
    ]
    first, second = _runs(calls)
    assert first != second and untokened(first) == untokened(second)


def test_lost_ssh_while_offline_still_reattaches(fake_gcloud) -> None:
    """Offline, describe fails without NOT_FOUND: supervise asks again (no create, which
    would start the job over); once back, the node is READY and its job is followed."""
    calls = fake_gcloud(["READY", "OFFLINE", "READY"], runs=[255, 0])
    status, slept = supervise(NASTY)
    assert status == 0 and slept == [7]
    assert kinds(calls) == [
        *["describe", "scp", "setup", "run"],
        *["describe", "describe", "run"],
    ]
    first, second = _runs(calls)
    assert first == second


def test_failed_describes_do_not_use_up_max_creates(fake_gcloud) -> None:
    """Describe failures (offline, an API hiccup) are not a node that is gone: with
    --max-creates=1 the one create is left for the NOT_FOUND that follows them."""
    calls = fake_gcloud(["OFFLINE"] * 3 + ["NOT_FOUND", "READY"], runs=[0])
    status, slept = supervise(NASTY, max_creates=1)
    assert status == 0 and slept == [7, 7, 7]
    assert kinds(calls)[:6] == ["describe"] * 4 + ["create", "describe"]


def test_a_failed_create_on_a_node_said_gone_still_reattaches(fake_gcloud) -> None:
    """describe says NOT_FOUND and the create fails (e.g. the node exists after all):
    once the node is READY, its job, there all along, is followed again."""
    calls = fake_gcloud(["READY", "NOT_FOUND", "READY"], runs=[255, 0], creates=[1])
    status, slept = supervise(NASTY)
    assert status == 0 and slept == [7]
    assert kinds(calls) == [
        *["describe", "scp", "setup", "run"],
        *["describe", "create", "describe", "run"],
    ]
    first, second = _runs(calls)
    assert first == second


@pytest.mark.parametrize("final", [2, 3, 4, g.STOPPED_EXIT])
def test_bad_input_divergence_and_failed_restore_are_not_retried(fake_gcloud, final: int) -> None:
    calls = fake_gcloud(["READY"], runs=[final, 0])
    assert supervise(NASTY)[0] == final
    assert kinds(calls) == ["describe", "scp", "setup", "run"]


def test_a_locked_workdir_is_waited_for_once(fake_gcloud) -> None:
    """Exit 5 (another run's lock, e.g. the preempted node's): wait for it to go stale and
    retry; a second 5 in a row is a live run holding it: final."""
    calls = fake_gcloud(["READY"], runs=[5, 0])
    status, slept = supervise(NASTY)
    assert status == 0 and kinds(calls).count("run") == 2
    assert slept == [tpu.LOCK_STALE_S + 60.0]
    calls = fake_gcloud(["READY"], runs=[5, 5, 0])
    for f in calls.parent.glob("*.n"):
        f.unlink()  # the scripted answers start over
    calls.unlink()
    status, slept = supervise(NASTY, lock_wait_s=3)
    assert status == 5 and kinds(calls).count("run") == 2 and slept == [3]


def test_max_restarts_bounds_the_loop(fake_gcloud) -> None:
    calls = fake_gcloud(["READY"], runs=[75])
    assert supervise(NASTY, max_restarts=2)[0] == 75
    assert kinds(calls).count("run") == 3


def test_waits_while_provisioning_and_creates_a_missing_node(fake_gcloud) -> None:
    calls = fake_gcloud(["NOT_FOUND", "CREATING", "READY"], runs=[0])
    status, slept = supervise(NASTY)
    assert status == 0 and slept == [7]
    assert kinds(calls)[:4] == ["describe", "create", "describe", "describe"]


def test_creates_are_retried_until_capacity_unless_bounded(fake_gcloud) -> None:
    """A spot stock-out (the node stays NOT_FOUND): by default supervise keeps creating
    (30 here, then capacity); with --max-creates=3 it gives up after 3 (status 1)."""
    calls = fake_gcloud(["NOT_FOUND"] * 30 + ["READY"], runs=[0])
    status, slept = supervise(NASTY)
    assert status == 0 and kinds(calls).count("create") == 30
    for f in calls.parent.glob("*.n"):
        f.unlink()
    calls.unlink()
    status, _ = supervise(NASTY, max_creates=3)
    assert status == 1 and kinds(calls).count("create") == 3 and "run" not in kinds(calls)


def test_cli_supervise_end_to_end(fake_gcloud, tmp_path: Path) -> None:
    calls = fake_gcloud(["READY"], runs=[0])
    name = f"e2e-{os.getpid()}"
    argv = ["supervise", name, f"--zone={ZONE}", "--poll-s=0", "--", *NASTY]
    assert tpu.main(argv) == 0
    tarball = Path(json.loads(calls.read_text().splitlines()[1])[4])
    assert tarball.name.startswith(f"gopher-{name}-") and tarball.name.endswith(".tar.gz")
    assert not tarball.exists()  # removed once the loop is done
    with tarfile.open(calls.parent / "copied.tar.gz") as tar:  # the committed tree
        assert {"setup.py", g.TPU_LOCK, "launch/tpu.py"} <= set(tar.getnames())


def test_each_invocation_archives_to_its_own_tarball() -> None:
    """Two supervise loops for one NAME (or a setup beside one) must not overwrite the
    tarball the other is copying."""
    paths = [
        next(a[3] for a in dry("setup", "t1", f"--zone={ZONE}") if a[:2] == ["git", "archive"])
        for _ in range(2)
    ]
    assert paths[0] != paths[1] and all("/gopher-t1-" in p for p in paths)
    assert not any(Path(p.removeprefix("--output=")).exists() for p in paths)


def test_a_ref_that_looks_like_an_option_is_never_one(tmp_path: Path) -> None:
    """`git archive ... --list` would list the formats and succeed with no tarball."""
    out = tmp_path / "code.tar.gz"
    done = subprocess.run(
        g.archive_argv("--list", str(out)), cwd=tpu.REPO, capture_output=True, text=True
    )
    assert done.returncode != 0 and "--list" in done.stderr, done.stdout
    assert subprocess.run(g.archive_argv("HEAD", str(out)), cwd=tpu.REPO).returncode == 0
    assert tarfile.is_tarfile(out)


def test_workdir_in_the_code_tree_is_refused_where_setup_would_delete_it(
    tmp_path: Path,
) -> None:
    """The oracle is the real setup script on the real HEAD tarball: a run's output under
    each workdir (relative to ~/gopher, where the job runs) either survives the next setup
    or is deleted by it; `run` and `supervise` refuse exactly the latter."""
    _fake_tools(tmp_path / "bin")
    subprocess.run(
        g.archive_argv("HEAD", str(tmp_path / g.REMOTE_TARBALL)), cwd=tpu.REPO, check=True
    )
    assert _remote(g.setup_command(), tmp_path).returncode == 0
    candidates = [
        *["results/44m", "./experiments/runs/x", "gopher/../benchmarks/b", "../gopher/tests/x"],
        *["runs/44m", "mine/x", ".", "../elsewhere/x"],
    ]
    for i, workdir in enumerate(candidates):
        (tmp_path / "gopher" / workdir).mkdir(parents=True, exist_ok=True)
        (tmp_path / "gopher" / workdir / f"ckpt-{i}").write_text("weights")
    assert _remote(g.setup_command(), tmp_path).returncode == 0
    survives = {
        w: (tmp_path / "gopher" / w / f"ckpt-{i}").exists() for i, w in enumerate(candidates)
    }

    def refused(command: str, *flag: str) -> str | None:
        argv = [command, "t1", f"--zone={ZONE}", "--dry-run", "--", "python", "-m", "x", *flag]
        try:
            tpu.main(["--gcloud=/nonexistent/gcloud", *argv], out=io.StringIO())
        except SystemExit as e:
            return str(e)
        return None

    for workdir, kept in survives.items():
        assert (refused("run", f"--workdir={workdir}") is None) == kept, workdir
        assert (refused("supervise", "--workdir", workdir) is None) == kept, workdir
    assert not survives["results/44m"] and survives["runs/44m"]  # both kinds are here
    message = refused("supervise", "--workdir=results/44m")
    assert "--workdir=results/44m" in message and "gs://" in message and "\n" not in message


def test_run_has_no_ref_flag(capsys: pytest.CaptureFixture) -> None:
    """`run` copies no code: a --ref there would be silently ignored."""
    with pytest.raises(SystemExit):
        tpu.main(["run", "t1", f"--zone={ZONE}", "--ref=v2", "--dry-run", "--", "x"])
    assert "unrecognized arguments: --ref=v2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, flag",
    [
        ("supervise", "--max-restarts=-1"),
        ("supervise", "--max-creates=-2"),
        ("supervise", "--poll-s=-5"),
        ("supervise", "--poll-s=nan"),
        ("logs", "--lines=-3"),
    ],
)
def test_negative_counts_are_refused_in_one_line(command: str, flag: str) -> None:
    argv = [command, "t1", f"--zone={ZONE}", flag, "--dry-run", "--", "x"]
    with pytest.raises(SystemExit) as e:
        tpu.main(argv[: -2 if command == "logs" else None], out=io.StringIO())
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_ctrl_c_ends_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tpu.subprocess, "run", interrupted)
    try:
        status = tpu.main(["stop", "t1", f"--zone={ZONE}"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended in a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert status == 130 and "interrupted" in err and err.count("\n") == 1


# --- the CLI's dry run -----------------------------------------------------------------


def dry(*argv: str) -> list[list[str]]:
    out = io.StringIO()
    # A gcloud that does not exist: a dry run must not call it.
    argv = ["--gcloud=/nonexistent/gcloud", argv[0], "--dry-run", *argv[1:]]
    assert tpu.main(argv, out=out) == 0
    return [shlex.split(line) for line in out.getvalue().splitlines()]


def test_dry_run_prints_the_exact_argv_lists() -> None:
    s = g.TpuSpec(name="a b", zone=ZONE, provisioning="best-effort")
    assert dry("create", "a b", f"--zone={ZONE}", "--best-effort") == [g.create_argv(s)]
    (printed,) = dry("run", "a b", f"--zone={ZONE}", "--", *NASTY)
    assert untokened(printed) == untokened(g.ssh_argv(s, g.run_command(NASTY)))
    printed = dry("setup", "a b", f"--zone={ZONE}")
    tar = printed[0][3].removeprefix("--output=")
    assert Path(tar).parent == Path(tpu.tempfile.gettempdir())
    assert printed == [
        g.archive_argv("HEAD", tar),
        g.scp_argv(s, tar, g.REMOTE_TARBALL),
        g.ssh_argv(s, g.setup_command()),
    ]
    supervised = dry("supervise", "a b", f"--zone={ZONE}", "--guaranteed", "--", *NASTY)
    assert [a[4] if a[0] == "gcloud" else a[1] for a in supervised] == [
        *["archive", "describe", "delete", "create", "scp", "ssh", "ssh"],
    ]
    assert supervised[3] == g.create_argv(spec(provisioning="guaranteed", name="a b", project=None))


def test_dry_run_delete_covers_stale_queued_resources() -> None:
    assert dry("delete", "--stale-queued", f"--zone={ZONE}") == [
        g.stale_queued_argv(ZONE),
        g.delete_queued_argv("QUEUED_RESOURCE", ZONE),
    ]
    assert dry("list", f"--zone={ZONE}") == g.list_argvs(ZONE)
