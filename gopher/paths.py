"""One path layer for local files and gs:// objects.

Everything the project reads or writes (workdir, metrics, TensorBoard, tokenizer,
corpus manifest, config.json) goes through `resolve`, which returns an etils
`epath.Path`: the same type Orbax uses, so a workdir may be a local folder or a
`gs://bucket/prefix` alike. Without TensorFlow, epath reaches GCS through fsspec's
gcsfs; the few operations a filesystem API cannot express (create-if-absent with a
generation precondition, append by compose) are plain GCS JSON API calls below.

Emulator: with STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT, gcsfs talks to it
anonymously (no credentials are needed or looked for).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any
from urllib.parse import quote

from etils import epath

# gcsfs >= 2025 asks a gRPC control API for each bucket's layout first (60 s of
# retries against an emulator); the plain JSON API serves every bucket we use.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

ADC_HELP = "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs (gs://, s3://, ...): never apply os.path functions to those."""
    return "://" in os.fspath(path)


def is_gcs(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith("gs://")


def resolve(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: absolute (and ~-expanded) for local paths, unchanged for URLs."""
    text = os.fspath(path)
    if is_remote(text):
        if is_gcs(text):
            _configure_gcsfs()
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves directory src to dst (which must not exist), creating dst's parents.

    Locally a rename. On gs:// each object is copied, then deleted: GCS has no
    directories, so the rename of epath, which first checks that dst's parent exists,
    refused any parent without objects (a fresh quarantine/ folder)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if is_gcs(src) != is_gcs(dst) or (is_remote(src) and not is_gcs(src)):
        raise ValueError(f"cannot move {src} to {dst}: both must be local or both gs://")
    if not is_gcs(src):
        target = resolve(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        resolve(src).rename(target)
        return
    fs = gcs_filesystem()
    src, dst = src.rstrip("/"), dst.rstrip("/")
    if fs.exists(dst):
        raise FileExistsError(f"{dst} exists")
    # Copy everything, then delete: a failure part way leaves src whole.
    fs.copy(src, dst, recursive=True)
    fs.rm(src, recursive=True)


def join(base: str | os.PathLike, *parts: str) -> str:
    """base/part/...: a string, for APIs that take one (Orbax, tensorboard)."""
    return os.fspath(resolve(base).joinpath(*parts))


def split_gcs(url: str | os.PathLike) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    text = os.fspath(url)
    if not is_gcs(text):
        raise ValueError(f"{text!r} is not a gs:// URL")
    bucket, _, key = text[len("gs://") :].partition("/")
    return bucket, key.strip("/")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Readers see the old or the new content, never a part (a GCS upload is atomic)."""
    p = resolve(path)
    if is_remote(p):
        p.write_bytes(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    os.replace(tmp, p)


# ---- credentials ------------------------------------------------------------------


def _adc_file() -> str:
    config = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(
        os.path.expanduser("~"), ".config", "gcloud"
    )
    return os.path.join(config, "application_default_credentials.json")


def _on_google_cloud_vm() -> bool:
    """Compute Engine / TPU VMs say so in DMI; reading it needs no network probe."""
    if os.environ.get("NO_GCE_CHECK", "").lower() == "true":
        return False
    if os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_ROOT"):
        return True
    try:
        with open("/sys/class/dmi/id/product_name", encoding="utf-8") as f:
            return f.read().strip().startswith("Google")
    except OSError:
        return False


def check_credentials(url: str) -> None:
    """Raises a one-line ValueError if no Google Cloud credentials can be found.

    Looks where google-auth and tensorstore look (the key file named by
    GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default file, a Google Cloud
    VM's metadata server) without contacting anything, so it never hangs on
    169.254.169.254. An emulator (STORAGE_EMULATOR_HOST) needs none.
    """
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    bucket = split_gcs(url)[0]
    key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file:
        if os.path.isfile(key_file):
            return
        raise ValueError(
            f"gs://{bucket}: GOOGLE_APPLICATION_CREDENTIALS={key_file} does not exist; "
            f"point it at a service-account key file or {ADC_HELP.split(' or ')[0]}"
        )
    if os.path.isfile(_adc_file()) or _on_google_cloud_vm():
        return
    raise ValueError(
        f"gs://{bucket}: no Google Cloud credentials (no GOOGLE_APPLICATION_CREDENTIALS, "
        f"no {_adc_file()}, not a Google Cloud VM); {ADC_HELP}"
    )


def check_access(url: str) -> None:
    """Credentials, then a probe object written and deleted: one line if either fails."""
    from gcsfs.retry import HttpError  # 401, 400, 429, 5xx: neither OSError nor ValueError

    check_credentials(url)
    bucket = split_gcs(url)[0]
    probe = f"{url.rstrip('/')}/.write-test-{uuid.uuid4().hex[:12]}"
    try:
        # 412 on a unique name: our own create, which gcsfs retried after its reply was lost
        with contextlib.suppress(FileExistsError):
            write(probe, b"gopher write test", if_generation_match=0)
        delete(probe)
    except FileNotFoundError:
        raise ValueError(
            f"gs://{bucket} does not exist; create it or pass another --workdir"
        ) from None
    except (OSError, RuntimeError, ValueError, HttpError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if storage_unreachable(e):  # gcsfs already retried it for about half a minute
            from gopher.checkpoint_errors import StorageUnavailable

            raise StorageUnavailable(
                f"gs://{bucket}: the storage did not answer the write test of {url} "
                f"({type(e).__name__}: {first[:160]}); nothing was written; rerun as it is "
                "(exit 7: launch.tpu supervise retries it)"
            ) from None
        raise ValueError(
            f"gs://{bucket}: cannot write {url} ({first[:160]}); check the bucket's "
            f"permissions or {ADC_HELP}"
        ) from None


def storage_unreachable(e: BaseException) -> bool:
    """Whether a failed GCS request is the service's or the network's fault, worth running
    again as it is: 408, 429 and 5xx answers (gcsfs raises a 502 as a requests ProxyError),
    a connection or a timeout that failed. Not 4xx refusals (credentials, permissions, a
    bad name), which a rerun would meet again."""
    import asyncio

    import aiohttp
    import requests
    from gcsfs.retry import HttpError

    if isinstance(e, HttpError):
        return str(e.code) in {"408", "429", *map(str, range(500, 600))}
    if isinstance(e, aiohttp.ClientResponseError):
        return e.status in (408, 429) or e.status >= 500
    return isinstance(
        e,
        ConnectionError
        | TimeoutError
        | asyncio.TimeoutError
        | aiohttp.ClientConnectionError
        | aiohttp.ClientPayloadError
        | requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | requests.exceptions.ChunkedEncodingError,
    )


# ---- GCS objects with generations (JSON API through gcsfs) -------------------------


def _configure_gcsfs() -> None:
    # An emulator takes anonymous requests; without this gcsfs would look for
    # credentials (and, unless NO_GCE_CHECK=true, probe the metadata server).
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        import fsspec

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"


# Orbax may open gs:// paths through epath before any call here does.
_configure_gcsfs()


def gcs_filesystem() -> Any:
    """The gcsfs filesystem epath uses (fsspec caches one instance per options)."""
    _configure_gcsfs()
    import fsspec

    return fsspec.filesystem("gcs", finalize_on_close=True)


def _object_url(bucket: str, key: str) -> str:
    return f"b/{quote(bucket, safe='')}/o/{quote(key, safe='')}"


def stat(url: str) -> dict | None:
    """The object's metadata (with an int 'generation'), or None if it is absent."""
    fs = gcs_filesystem()
    bucket, key = split_gcs(url)
    try:
        meta = fs.call("GET", fs.base + _object_url(bucket, key), json_out=True)
    except FileNotFoundError:
        return None
    meta["generation"] = int(meta["generation"])
    return meta


def read(url: str) -> tuple[bytes, int] | None:
    """(content, generation) of one object version, or None if it is absent."""
    meta = stat(url)
    if meta is None:
        return None
    fs = gcs_filesystem()
    bucket, key = split_gcs(url)
    try:
        _, data = fs.call(
            "GET",
            fs.base + _object_url(bucket, key),
            alt="media",
            generation=str(meta["generation"]),
        )
    except FileNotFoundError:
        return None
    return data, meta["generation"]


def write(url: str, data: bytes, if_generation_match: int | None = None) -> int:
    """Uploads one object; returns its new generation.

    if_generation_match=0 creates only if absent; =G replaces only version G. A
    failed precondition raises FileExistsError (HTTP 412).
    """
    fs = gcs_filesystem()
    bucket, key = split_gcs(url)
    kw = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
    meta = fs.call(
        "POST",
        f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
        uploadType="media",
        name=key,
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        json_out=True,
        **kw,
    )
    return int(meta["generation"])


def delete(url: str, if_generation_match: int | None = None) -> bool:
    """Deletes the object (only version G if given); False if absent or replaced."""
    fs = gcs_filesystem()
    bucket, key = split_gcs(url)
    kw = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
    try:
        fs.call("DELETE", fs.base + _object_url(bucket, key), **kw)
    except (FileNotFoundError, FileExistsError):
        return False
    return True


def append(url: str, data: bytes, generation: int | None) -> int:
    """Appends bytes to an object without re-uploading it; returns the new generation.

    GCS objects are immutable, so the new bytes go up as a temporary object and
    `compose([url, tmp]) -> url` concatenates server-side. `generation` is the version
    we last wrote (None: the object must not exist yet), so two writers cannot
    interleave silently: a mismatch raises FileExistsError.
    """
    if generation is None:
        return write(url, data, if_generation_match=0)
    fs = gcs_filesystem()
    bucket, key = split_gcs(url)
    tmp_key = f"{key}.append-{uuid.uuid4().hex[:12]}"
    write(f"gs://{bucket}/{tmp_key}", data)
    try:
        meta = fs.call(
            "POST",
            fs.base + _object_url(bucket, key) + "/compose",
            ifGenerationMatch=str(generation),
            headers={"Content-Type": "application/json"},
            json={
                "kind": "storage#composeRequest",
                "sourceObjects": [{"name": key}, {"name": tmp_key}],
                "destination": {"name": key, "bucket": bucket},
            },
            json_out=True,
        )
    finally:
        delete(f"gs://{bucket}/{tmp_key}")
    return int(meta["generation"])


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends text to a local file or a gs:// object (by compose: gcsfs's "a" mode
    overwrites on GCS), retrying when another writer appended in between."""
    if not is_gcs(path):
        with open(path, "a") as f:
            f.write(text)
        return
    url = str(path)
    for _ in range(5):
        meta = stat(url)
        try:
            append(url, text.encode(), meta["generation"] if meta else None)
            return
        except FileExistsError:  # another writer got there first: read its version again
            continue
    raise OSError(f"{url} kept changing under 5 appends; retry")
