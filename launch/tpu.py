"""Cloud TPU VM launcher: create a pod slice, install, run on every worker, survive preemption.

    python -m launch.tpu create NAME --zone=Z --accelerator-type=v4-32 [--project=P]
        [--spot | --reserved | --guaranteed | --best-effort] [--queued]
    python -m launch.tpu setup NAME --zone=Z [--ref=HEAD]     # code + pinned deps, all workers
    python -m launch.tpu run NAME --zone=Z -- python -m experiments.train --config=... --workdir=gs://...
    python -m launch.tpu supervise NAME --zone=Z --accelerator-type=v4-32 [--max-restarts=20]
        [--max-creates=0] -- CMD...
    python -m launch.tpu logs NAME --zone=Z [--lines=100] [--follow]
    python -m launch.tpu stop NAME --zone=Z     # the job checkpoints and exits, for good (76)
    python -m launch.tpu list --zone=Z
    python -m launch.tpu delete NAME --zone=Z [--queued]      # a queued resource with its node
    python -m launch.tpu delete --stale-queued --zone=Z       # SUSPENDED / FAILED queued resources

`run` starts the command on each worker detached (its own session, output to
~/gopher-logs/worker-N.log) and follows the log: a dropped connection, gcloud's rerun of the
command after one, or Ctrl-C leave the job running (`logs --follow` watches it, `stop` stops
it: it checkpoints first). A new `run` replaces the job still running, if any (SIGTERM, 60 s
to checkpoint, then SIGKILL), and whatever else still holds the chips. `run` runs the code
the last `setup` copied; a relative --workdir is relative to that code tree (~/gopher) and
must not lie under one of its top-level names (the next setup replaces those): use gs://,
an absolute path, or e.g. runs/NAME.

Every command takes --dry-run: it prints the exact argument lists (shlex-quoted, one a line)
and runs nothing. `supervise` is the restart loop: it waits for the node (recreating it when
PREEMPTED, SUSPENDED, TERMINATED, FAILED or gone), re-runs setup, and runs the same command
again, which resumes from its gs:// workdir. The train program's exit status decides: 0 done,
2 bad input, 3 diverged, 4 restore failed and 130 interrupted are final; 5 (the workdir is
locked, e.g. by the preempted node's run) is retried once its lock can have gone stale;
76 is final too: `launch.tpu stop` leaves a marker on the workers that turns the stopped
job's status (75) into 76 (a `stop` between two attempts finds no job: Ctrl-C supervise).
Anything else (75 preempted, 6 a peer died, 7 the storage failed a checkpoint's read or
write, or the workdir's write test) is retried as a new attempt (setup again, a
new run that replaces the job). 255 (this side's ssh gave up, e.g. a
laptop asleep) is not, unless the node had to be recreated: once it is READY, supervise
reruns the same run, which follows the live job or reports how it ended. Each retry counts
against --max-restarts.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from launch import gcloud as g

REPO = Path(__file__).resolve().parents[1]

READY = frozenset({"READY", "ACTIVE"})  # node / queued resource
# States from which the node will not come back by itself: delete and create anew.
GONE = frozenset({"PREEMPTED", "SUSPENDED", "TERMINATED", "FAILED", "STOPPED", "NOT_FOUND"})
# experiments.train's statuses that a rerun cannot change. 4 (no checkpoint could be
# restored) must never be retried: a fresh start would delete the unreadable checkpoints.
# g.STOPPED_EXIT: the remote run's, for a job that `launch.tpu stop` stopped.
FINAL_EXITS = {
    0: "done",
    2: "bad input",
    3: "diverged",
    4: "restore failed",
    130: "interrupted",
    g.STOPPED_EXIT: "stopped by launch.tpu stop",
}
# gcloud's status when its ssh connections failed (10 tries): the job may well run on.
SSH_LOST = 255
# experiments.train's status when another run holds the workdir's lock: after a hard
# preemption, the old node's lock, which goes stale after `LOCK_STALE_S` without heartbeat.
# supervise waits that long and retries, once: a second refusal is a live run (final).
WORKDIR_LOCKED = 5
LOCK_STALE_S = 600.0


class Runner:
    """Runs argv lists (never through a shell); with dry_run prints them instead."""

    def __init__(
        self, gcloud: str = "gcloud", dry_run: bool = False, out: TextIO | None = None
    ) -> None:
        self.gcloud = gcloud
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def _real(self, argv: Sequence[str]) -> list[str]:
        return [self.gcloud, *argv[1:]] if argv[0] == "gcloud" else list(argv)

    def __call__(self, argv: Sequence[str], cwd: Path | None = None) -> int:
        if self.dry_run:
            print(shlex.join(argv), file=self.out, flush=True)
            return 0
        return subprocess.run(self._real(argv), cwd=cwd, check=False).returncode

    def output(self, argv: Sequence[str]) -> tuple[int, str]:
        """Runs and returns (status, stdout); stderr passes through."""
        if self.dry_run:
            print(shlex.join(argv), file=self.out, flush=True)
            return 0, ""
        done = subprocess.run(self._real(argv), stdout=subprocess.PIPE, text=True, check=False)
        return done.returncode, done.stdout

    def output_and_errors(self, argv: Sequence[str]) -> tuple[int, str, str]:
        """Runs and returns (status, stdout, stderr); stderr is passed on as well."""
        if self.dry_run:
            print(shlex.join(argv), file=self.out, flush=True)
            return 0, "", ""
        done = subprocess.run(self._real(argv), capture_output=True, text=True, check=False)
        sys.stderr.write(done.stderr)
        return done.returncode, done.stdout, done.stderr


# describe's error for a node (queued resource) that does not exist: "ERROR:
# (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource '...' was not found."
NOT_FOUND_TEXT = ("NOT_FOUND", "was not found")
UNKNOWN = "UNKNOWN"  # describe failed otherwise (offline, an API hiccup): ask again later


def state(spec: g.TpuSpec, runner: Runner) -> str:
    """The node's (queued resource's) state; NOT_FOUND when gcloud says it does not exist,
    UNKNOWN when describe failed for another reason."""
    status, out, err = runner.output_and_errors(g.describe_argv(spec))
    if status != 0:
        return "NOT_FOUND" if any(t in err for t in NOT_FOUND_TEXT) else UNKNOWN
    return (out.strip().split() or ["NOT_FOUND"])[0].upper()


def wait_ready(
    spec: g.TpuSpec,
    runner: Runner,
    poll_s: float = 60.0,
    max_creates: int = 0,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> int | None:
    """Polls until the node is READY (queued resource ACTIVE), recreating it when gone;
    gives up after `max_creates` creates (0: never: spot capacity can take hours). A
    describe that fails other than with NOT_FOUND is asked again after `poll_s`.
    Returns how many creates succeeded (0: the node that was there, whose jobs may still
    run), or None after giving up."""
    creates = made = 0
    while True:
        now = state(spec, runner)
        if now in READY:
            return made
        if now in GONE:
            if max_creates and creates == max_creates:
                log(f"supervise: {spec.name} still {now} after {creates} creates; giving up")
                return None
            log(f"supervise: {spec.name} is {now}: recreating")
            if now != "NOT_FOUND":
                runner(g.delete_argv(spec))
            creates += 1
            if runner(g.create_argv(spec)) == 0:
                made += 1
            else:
                sleep(poll_s)  # e.g. no capacity right now
            continue
        if now == UNKNOWN:  # no create: that would count against --max-creates
            log(f"supervise: describing {spec.name} failed (see above); again in {poll_s:g}s")
        else:
            log(f"supervise: {spec.name} is {now}: waiting {poll_s:g}s")
        sleep(poll_s)


def setup(spec: g.TpuSpec, runner: Runner, tarball: str) -> int:
    """Copies the code to every worker and installs the lock there (idempotent)."""
    status = runner(g.scp_argv(spec, tarball, g.REMOTE_TARBALL))
    return status or runner(g.ssh_argv(spec, g.setup_command()))


def run(spec: g.TpuSpec, runner: Runner, train_argv: list[str], token: str = "") -> int:
    """Runs the train command on all workers, detached there (an ssh connection that
    drops and gcloud's rerun of the command do not stop it); the status is a failing
    worker's once all have finished (gcloud reports the lowest-numbered one's). The same
    `token` again follows the job that run started; none (a fresh token) replaces it."""
    return runner(g.ssh_argv(spec, g.run_command(train_argv, token)))


def supervise(
    spec: g.TpuSpec,
    runner: Runner,
    train_argv: list[str],
    tarball: str,
    max_restarts: int = 20,
    poll_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
    lock_wait_s: float = LOCK_STALE_S + 60.0,
    max_creates: int = 0,
) -> int:
    """Runs `train_argv` until it finishes, re-creating and re-installing after preemption.

    Returns the train command's last status: one of FINAL_EXITS at once; any other status is
    retried up to `max_restarts` times; 1 when the node could not be had.
    """
    restarts, locked = 0, False
    token = ""  # the current attempt's run, kept only after a lost ssh (255)
    while True:
        created = wait_ready(
            spec, runner, poll_s=poll_s, max_creates=max_creates, sleep=sleep, log=log
        )
        if created is None:
            return 1
        if created or not token:  # a new attempt: the code, then a new run
            token = ""
            status = setup(spec, runner, tarball)
            if status == 0:
                token = g.new_token()
        if token:
            status = run(spec, runner, train_argv, token)
            if status in FINAL_EXITS:
                log(f"supervise: exit {status} ({FINAL_EXITS[status]})")
                return status
            if status == WORKDIR_LOCKED:
                if locked:
                    log(
                        f"supervise: exit {status} (the workdir is still locked after "
                        f"{lock_wait_s:g} s: another live run holds it); stopping"
                    )
                    return status
                locked = True
                log(
                    f"supervise: exit {status} (workdir locked, maybe by the preempted "
                    f"node's run); waiting {lock_wait_s:g} s for its lock to go stale"
                )
                sleep(lock_wait_s)
            else:
                locked = False
            # Only our ssh gave up (a laptop asleep, a VPN down): the job may run on. Unless
            # the node has to be recreated, rerunning the same token follows it (or gets its
            # status) where a new attempt would set up (replacing the code under it) and
            # stop it, losing the steps since its last checkpoint. A job that is gone
            # (the host restarted) reports 1: then a new attempt.
            if status != SSH_LOST:
                token = ""
        if restarts == max_restarts:
            log(f"supervise: exit {status} and {restarts} restarts used; stopping")
            return status
        restarts += 1
        again = "reattaching to the job" if token else "restart"
        log(f"supervise: exit {status}; {again} {restarts}/{max_restarts}")


def stale_queued(zone: str, project: str | None, runner: Runner) -> list[str]:
    status, out = runner.output(g.stale_queued_argv(zone, project))
    return out.split() if status == 0 else []


def _archive(ref: str, name: str, runner: Runner) -> str | None:
    # A path of its own: two supervise loops for one NAME must not overwrite each other's.
    fd, tarball = tempfile.mkstemp(prefix=f"gopher-{name}-", suffix=".tar.gz")
    os.close(fd)
    if runner(g.archive_argv(ref, tarball), cwd=REPO) == 0:
        return tarball
    os.unlink(tarball)
    return None


def code_names(ref: str) -> set[str]:
    """The top-level names of the code tree at `ref` (empty when git cannot say: a bad ref
    is then reported by the archive step)."""
    done = subprocess.run(
        ["git", "ls-tree", "--name-only", "-z", "--end-of-options", ref],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return set(os.fsdecode(done.stdout).split("\0")) - {""} if done.returncode == 0 else set()


def workdir_flag(train_argv: Sequence[str]) -> str | None:
    """The train command's --workdir (absl's forms: -- or -, `=VALUE` or `NAME VALUE`; the
    last one wins; flags end at `--`)."""
    value = None
    for i, arg in enumerate(train_argv):
        if arg == "--":
            break
        for name in ("--workdir", "-workdir"):
            if arg.startswith(name + "="):
                value = arg[len(name) + 1 :]
            elif arg == name and i + 1 < len(train_argv):
                value = train_argv[i + 1]
    return value


def check_workdir(command: str, train_argv: Sequence[str], code: set[str]) -> None:
    """Refuses a relative --workdir under a top-level name of the code tree: the job runs
    in ~/gopher, and every setup (supervise's before each restart) replaces those names,
    the run's checkpoints with them. Names that are not code are carried over."""
    value = workdir_flag(train_argv)
    if not value or "://" in value or value.startswith(("/", "~")):
        return
    # Where it lands on a worker, relative to the code tree (`../gopher/x` included).
    code_dir = "/home/user/gopher"
    inside = posixpath.relpath(posixpath.normpath(posixpath.join(code_dir, value)), code_dir)
    first = inside.split("/")[0]
    if first in code:
        raise SystemExit(
            f"{command}: --workdir={value} lies in the code tree on the workers "
            f"(~/gopher/{first}, which every setup replaces); use a gs:// workdir, an "
            "absolute path, or a name that is not code, e.g. --workdir=runs/NAME"
        )


def _check_counts(args: argparse.Namespace) -> None:
    for flag in ("max_restarts", "max_creates", "poll_s", "lines"):
        value = getattr(args, flag, None)
        if value is not None and not 0 <= value < float("inf"):
            raise SystemExit(
                f"{args.command}: --{flag.replace('_', '-')}={value} must be a finite number >= 0"
            )


def _spec_flags(parser: argparse.ArgumentParser, name_nargs: str | None = None) -> None:
    parser.add_argument("name", nargs=name_nargs, help="TPU VM (or queued resource) name")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p)")
    parser.add_argument("--project", help="default: gcloud config get project")
    parser.add_argument("--accelerator-type", default="v4-32", help="e.g. v4-32, v5p-16")
    parser.add_argument("--runtime-version", help="default: from the TPU generation")
    tier = parser.add_mutually_exclusive_group()
    for option in g.PROVISIONING[1:]:
        queued_only = " (queued resources only: implies --queued)"
        tier.add_argument(
            f"--{option}",
            dest="provisioning",
            action="store_const",
            const=option,
            help=f"{option} capacity" + (queued_only if option in g.QUEUED_ONLY else ""),
        )
    parser.add_argument("--queued", action="store_true", help="through a queued resource")
    parser.add_argument("--queued-resource", help="its id; default: NAME")


def _train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ref", default="HEAD", help="the commit to copy to the workers")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0])
    top.add_argument("--gcloud", default="gcloud", help="the gcloud binary")
    commands = top.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true", help="print the argv lists only")
    for name in ("create", "setup", "run", "supervise", "logs", "stop"):
        sub = commands.add_parser(name, parents=[common])
        _spec_flags(sub)
        if name in ("setup", "supervise"):  # `run` runs the code the last setup copied
            _train_flags(sub)
        if name == "supervise":
            sub.add_argument("--max-restarts", type=int, default=20)
            sub.add_argument("--poll-s", type=float, default=60.0)
            sub.add_argument(
                "--max-creates",
                type=int,
                default=0,
                help="failed creates before giving up on capacity (0: never give up)",
            )
        if name == "logs":
            sub.add_argument("--lines", type=int, default=100)
            sub.add_argument("--follow", action="store_true")
    listing = commands.add_parser("list", parents=[common])
    listing.add_argument("--zone", required=True)
    listing.add_argument("--project")
    delete = commands.add_parser("delete", parents=[common])
    _spec_flags(delete, name_nargs="?")
    delete.add_argument("--stale-queued", action="store_true", help="SUSPENDED/FAILED ones too")
    return top


def spec_from(args: argparse.Namespace) -> g.TpuSpec:
    return g.TpuSpec(
        name=args.name,
        zone=args.zone,
        accelerator_type=args.accelerator_type,
        runtime_version=args.runtime_version,
        project=args.project,
        provisioning=args.provisioning or "on-demand",
        queued=args.queued,
        queued_resource=args.queued_resource,
    )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    try:
        return _main(argv, out)
    except KeyboardInterrupt:  # one line, not a traceback; the detached job is not stopped
        print(
            "launch.tpu: interrupted; a job already started on the workers keeps running "
            "(`python -m launch.tpu logs --follow` watches it, `stop` stops it)",
            file=sys.stderr,
        )
        return 130


def _main(argv: Sequence[str] | None, out: TextIO | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the train command, options and all (argparse's
    # REMAINDER would also swallow our own options that follow NAME).
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, train = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    _check_counts(args)
    runner = Runner(args.gcloud, dry_run=args.dry_run, out=out)
    if args.command == "list":
        return max(runner(a) for a in g.list_argvs(args.zone, args.project))
    if args.command == "delete":
        if args.name is None and not args.stale_queued:
            raise SystemExit("delete: give NAME, --stale-queued, or both")
        status = runner(g.delete_argv(spec_from(args))) if args.name else 0
        if args.stale_queued:
            # Dry run: show the delete each listed id would get.
            ids = stale_queued(args.zone, args.project, runner) or (
                ["QUEUED_RESOURCE"] if args.dry_run else []
            )
            for qr in ids:
                status = runner(g.delete_queued_argv(qr, args.zone, args.project)) or status
        return status
    spec = spec_from(args)
    if args.command == "create":
        return runner(g.create_argv(spec))
    if args.command == "logs":
        return runner(g.ssh_argv(spec, g.logs_command(args.lines, args.follow)))
    if args.command == "stop":
        return runner(g.ssh_argv(spec, g.stop_command()))
    if args.command in ("run", "supervise"):
        if not train:
            raise SystemExit(f"{args.command}: add the command after `--`")
        check_workdir(args.command, train, code_names(getattr(args, "ref", "HEAD")))
    if args.command == "run":
        return run(spec, runner, train)
    tarball = _archive(args.ref, spec.name, runner)
    if tarball is None:
        return 1
    try:
        if args.command == "setup":
            return setup(spec, runner, tarball)
        if args.dry_run:  # the loop's commands, each once, in the order it uses them
            for argv in (g.describe_argv(spec), g.delete_argv(spec), g.create_argv(spec)):
                runner(argv)
            setup(spec, runner, tarball)
            return run(spec, runner, train)
        return supervise(
            spec,
            runner,
            train,
            tarball,
            args.max_restarts,
            args.poll_s,
            max_creates=args.max_creates,
        )
    finally:
        os.unlink(tarball)


if __name__ == "__main__":
    sys.exit(main())
