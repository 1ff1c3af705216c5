"""The path layer on local paths, and gs:// without credentials (no network needed)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

from gopher import paths
from gopher import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """An environment with no Google Cloud credentials and no metadata-server probes."""
    for var in (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "CLOUDSDK_CONFIG",
        "STORAGE_EMULATOR_HOST",
        "GCE_METADATA_HOST",
        "GCE_METADATA_ROOT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("CLOUDSDK_CORE_CHECK_GCE_METADATA", "false")
    return tmp_path / "home"


def test_local_paths_are_absolute_and_urls_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("run") == paths.resolve(str(tmp_path / "run"))
    assert os.fspath(paths.resolve("run")) == str(tmp_path / "run")
    assert os.fspath(paths.resolve("gs://bucket/a/b")) == "gs://bucket/a/b"
    assert paths.join("gs://bucket/run", "tensorboard", "x") == "gs://bucket/run/tensorboard/x"
    assert paths.is_remote("gs://b/x") and not paths.is_remote(str(tmp_path))
    assert paths.split_gcs("gs://bucket/a/b/") == ("bucket", "a/b")
    assert list(tmp_path.iterdir()) == []  # nothing resolved created anything


def test_write_atomic_and_record_config_local(tmp_path):
    paths.write_atomic(str(tmp_path / "sub" / "f.bin"), b"one")
    paths.write_atomic(str(tmp_path / "sub" / "f.bin"), b"two")
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"two"
    config = {"model": {"d_model": 8}, "train": {"steps": 1}}
    workdir_lib.record_config(str(tmp_path), config)
    workdir_lib.record_config(str(tmp_path), {**config, "train": {"steps": 5}})  # extended
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 5
    with pytest.raises(ValueError, match="different experiment"):
        workdir_lib.record_config(str(tmp_path), {**config, "model": {"d_model": 16}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "sub"]  # no temp files


def test_gcs_without_credentials_is_one_line_naming_the_bucket(no_credentials, tmp_path):
    start = time.time()
    with pytest.raises(ValueError) as e:
        workdir_lib.check_writable("gs://some-bucket/run")
    msg = str(e.value)
    assert time.time() - start < 2  # decided without asking any server
    assert "\n" not in msg and msg.startswith("gs://some-bucket: no Google Cloud credentials")
    assert "gcloud auth application-default login" in msg
    assert "GOOGLE_APPLICATION_CREDENTIALS" in msg


def test_gcs_credentials_found_where_google_auth_looks(no_credentials, tmp_path, monkeypatch):
    missing = tmp_path / "missing-key.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    with pytest.raises(ValueError, match=f"GOOGLE_APPLICATION_CREDENTIALS={missing}"):
        paths.check_credentials("gs://b/run")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    adc = no_credentials / ".config" / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text("{}")
    paths.check_credentials("gs://b/run")  # gcloud's application-default file
    adc.unlink()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    paths.check_credentials("gs://b/run")  # an emulator takes anonymous requests


@contextlib.contextmanager
def _answering(status: int | None, message: str, monkeypatch):
    """A real HTTP server on 127.0.0.1 answering every GCS request with `status` and a
    JSON error holding `message` (None: nothing listens on the port), named as the
    emulator; yields the methods of the requests it got."""
    import http.server
    import threading

    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    got = []

    class Answering(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            got.append(self.command)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answering)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
    if status is None:
        server.server_close()
        yield got
        return
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield got
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "status, message",
    [
        (401, "Anonymous caller does not have storage.objects.create access to the object."),
        (400, "Bad Request"),
    ],
)
def test_gcs_http_errors_of_the_probe_are_one_line(monkeypatch, status, message):
    """gcsfs raises its own HttpError (neither OSError nor ValueError) for a 401 or 400:
    against a real HTTP server answering every request with it, the workdir check is one
    line naming the workdir and the fix, not a traceback."""
    with _answering(status, message, monkeypatch), pytest.raises(ValueError) as e:
        workdir_lib.check_writable("gs://bucket/run")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("gs://bucket: cannot write gs://bucket/run"), msg
    assert message in msg and str(status) in msg  # the server's own words
    assert "permissions" in msg and "gcloud auth application-default login" in msg


@pytest.mark.parametrize("status", [503, 429, None])
def test_gcs_outage_in_the_probe_is_storage_unavailable(monkeypatch, status):
    """A bucket that answers 503 or 429 to every request after gcsfs's retries, or no
    server at all (connection refused), is the storage's fault: StorageUnavailable (exit 7,
    which launch.tpu supervise retries) in one line, not the ValueError (exit 2, final) of
    a refusal. gcsfs's back-off sleeps are skipped; its six tries still happen."""
    import asyncio
    import types

    import gcsfs.retry

    from gopher import checkpoint_errors

    async def no_wait(_seconds):
        await asyncio.sleep(0)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait))
    with (
        _answering(status, "Service Unavailable", monkeypatch) as tries,
        pytest.raises(checkpoint_errors.StorageUnavailable) as e,
    ):
        workdir_lib.check_writable("gs://bucket/run")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("gs://bucket: the storage did not answer"), msg
    assert "nothing was written" in msg and "exit 7" in msg, msg
    if status is not None:
        assert str(status) in msg and len(tries) == 6, (msg, tries)  # gcsfs's six tries


def test_train_cli_gs_workdir_without_credentials(no_credentials, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(PYTHONPATH=ROOT, HOME=str(no_credentials), NO_GCE_CHECK="true")
    start = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            f"--config={ROOT}/experiments/configs/gopher.py:test",
            "--workdir=gs://some-bucket/run",
            "--config.data.source=stdlib",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.time() - start < 30
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "gs://some-bucket" in lines[0], out.stderr
    assert "gcloud auth application-default login" in lines[0]
    assert list(cwd.iterdir()) == []  # no `gs:` folder, nothing at all
