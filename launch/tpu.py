"""Cloud TPU VM launcher: create a pod slice, install, run on every worker, survive preemption.

    python -m launch.tpu create NAME --zone=Z --accelerator-type=v4-32 [--project=P]
        [--spot | --reserved | --guaranteed | --best-effort] [--queued]
    python -m launch.tpu setup NAME --zone=Z [--ref=HEAD]     # code + pinned deps, all workers
    python -m launch.tpu run NAME --zone=Z -- python -m experiments.train --config=... --workdir=gs://...
    python -m launch.tpu supervise NAME --zone=Z --accelerator-type=v4-32 [--max-restarts=20]
        [--max-creates=0] -- CMD...
    python -m launch.tpu logs NAME --zone=Z [--lines=100] [--follow]
    python -m launch.tpu stop NAME --zone=Z     # the running job checkpoints and exits (75)
    python -m launch.tpu list --zone=Z
    python -m launch.tpu delete NAME --zone=Z [--queued]      # a queued resource with its node
    python -m launch.tpu delete --stale-queued --zone=Z       # SUSPENDED / FAILED queued resources

`run` starts the command on each worker detached (its own session, output to
~/gopher-logs/worker-N.log) and follows the log: a dropped connection, gcloud's rerun of the
command after one, or Ctrl-C leave the job running (`logs --follow` watches it, `stop` stops
it: it checkpoints first). A new `run` replaces whatever still holds the chips.

Every command takes --dry-run: it prints the exact argument lists (shlex-quoted, one a line)
and runs nothing. `supervise` is the restart loop: it waits for the node (recreating it when
PREEMPTED, SUSPENDED, TERMINATED, FAILED or gone), re-runs setup, and runs the same command
again, which resumes from its gs:// workdir. The train program's exit status decides: 0 done,
2 bad input, 3 diverged, 4 restore failed and 130 interrupted are final; 5 (the workdir is
locked, e.g. by the preempted node's run) is retried once its lock can have gone stale;
anything else (75 preempted, 6 a peer died, 255 ssh lost) is retried.
"""

from __future__ import annotations

import argparse
import os
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
FINAL_EXITS = {0: "done", 2: "bad input", 3: "diverged", 4: "restore failed", 130: "interrupted"}
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


def state(spec: g.TpuSpec, runner: Runner) -> str:
    status, out = runner.output(g.describe_argv(spec))
    # describe fails for a node that is gone (or, rarely, for an API hiccup: then the
    # create that follows fails too and the wait below retries it).
    return (out.strip().split() or ["NOT_FOUND"])[0].upper() if status == 0 else "NOT_FOUND"


def wait_ready(
    spec: g.TpuSpec,
    runner: Runner,
    poll_s: float = 60.0,
    max_creates: int = 0,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> bool:
    """Polls until the node is READY (queued resource ACTIVE), recreating it when gone;
    gives up after `max_creates` creates (0: never: spot capacity can take hours)."""
    creates = 0
    while True:
        now = state(spec, runner)
        if now in READY:
            return True
        if now in GONE:
            if max_creates and creates == max_creates:
                log(f"supervise: {spec.name} still {now} after {creates} creates; giving up")
                return False
            log(f"supervise: {spec.name} is {now}: recreating")
            if now != "NOT_FOUND":
                runner(g.delete_argv(spec))
            creates += 1
            if runner(g.create_argv(spec)) != 0:
                sleep(poll_s)  # e.g. no capacity right now
            continue
        log(f"supervise: {spec.name} is {now}: waiting {poll_s:g}s")
        sleep(poll_s)


def setup(spec: g.TpuSpec, runner: Runner, tarball: str) -> int:
    """Copies the code to every worker and installs the lock there (idempotent)."""
    status = runner(g.scp_argv(spec, tarball, g.REMOTE_TARBALL))
    return status or runner(g.ssh_argv(spec, g.setup_command()))


def run(spec: g.TpuSpec, runner: Runner, train_argv: list[str]) -> int:
    """Runs the train command on all workers, detached there (an ssh connection that
    drops and gcloud's rerun of the command do not stop it); the status is a failing
    worker's once all have finished (gcloud reports the lowest-numbered one's)."""
    return runner(g.ssh_argv(spec, g.run_command(train_argv)))  # a fresh run token


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
    while True:
        if not wait_ready(
            spec, runner, poll_s=poll_s, max_creates=max_creates, sleep=sleep, log=log
        ):
            return 1
        status = setup(spec, runner, tarball)
        if status == 0:
            status = run(spec, runner, train_argv)
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
        if restarts == max_restarts:
            log(f"supervise: exit {status} and {restarts} restarts used; stopping")
            return status
        restarts += 1
        log(f"supervise: exit {status}; restart {restarts}/{max_restarts}")


def stale_queued(zone: str, project: str | None, runner: Runner) -> list[str]:
    status, out = runner.output(g.stale_queued_argv(zone, project))
    return out.split() if status == 0 else []


def _archive(ref: str, name: str, runner: Runner) -> str | None:
    tarball = os.path.join(tempfile.gettempdir(), f"gopher-{name}.tar.gz")
    return tarball if runner(g.archive_argv(ref, tarball), cwd=REPO) == 0 else None


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
        if name in ("setup", "run", "supervise"):
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the train command, options and all (argparse's
    # REMAINDER would also swallow our own options that follow NAME).
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, train = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
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
    if args.command in ("run", "supervise") and not train:
        raise SystemExit(f"{args.command}: add the command after `--`")
    if args.command == "run":
        return run(spec, runner, train)
    tarball = _archive(args.ref, spec.name, runner)
    if tarball is None:
        return 1
    if args.command == "setup":
        return setup(spec, runner, tarball)
    if args.dry_run:  # the loop's commands, each once, in the order it uses them
        for argv in (g.describe_argv(spec), g.delete_argv(spec), g.create_argv(spec)):
            runner(argv)
        setup(spec, runner, tarball)
        return run(spec, runner, train)
    return supervise(
        spec, runner, train, tarball, args.max_restarts, args.poll_s, max_creates=args.max_creates
    )


if __name__ == "__main__":
    sys.exit(main())
