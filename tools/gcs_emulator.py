"""A local GCS for tests and benchmarks: `gcp-storage-emulator` on 127.0.0.1, plus an optional fault proxy.

Three gaps of the emulator package against a real bucket are closed when it is started from here (nothing
else of it is changed):

* it serves one request at a time (``http.server.HTTPServer``). ArrayRecord's GCS reader keeps a download
  stream open while it opens the next ranged read, so against a one-request server it deadlocks; a real
  bucket serves requests concurrently. Started here it runs on ``ThreadingHTTPServer``.
* it ignores suffix ranges (``Range: bytes=-N``, "the last N bytes"), returning the whole object, which
  ArrayRecord's reader asks for to prefetch a shard's footer. Here they are answered as GCS does.
* it ignores generation preconditions (``ifGenerationMatch``) on uploads and deletes, which the trainer's
  workdir lease (train/workdir_lock.py) relies on, and sends no ``x-goog-generation`` with a download, on
  which tensorstore's conditional writes build. Here both are as GCS does them (a failed precondition: 412).

`FaultProxy` sits between a client and the emulator (also on 127.0.0.1) and, when armed, cuts media
downloads after a few body bytes (the "killed read" of a flaky network) or answers 503 a given number of
times, counting what it did, so the tests can check that the reader retried and got the right bytes.

    python tools/gcs_emulator.py --port 9023 --bucket my-bucket   # serve until interrupted
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http import server as http_server

LOOPBACK = "127.0.0.1"


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _patch_emulator() -> None:
    """Threaded serving and suffix ranges (see the module docstring)."""
    import gcp_storage_emulator.server as emulator_server
    from gcp_storage_emulator.handlers import objects

    class ThreadingServer(http_server.ThreadingHTTPServer):
        daemon_threads = True

    emulator_server.server.HTTPServer = ThreadingServer
    original_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        wanted = request.get_header("range", None)
        match = re.fullmatch(r"\s*bytes=-(\d+)\s*", wanted or "")
        if match:
            try:
                size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
            except Exception:  # noqa: BLE001 - the original handler answers a missing object
                size = 0
            headers = request._request_handler.headers
            headers.replace_header("Range", f"bytes={max(0, size - int(match.group(1)))}-")
        try:  # GCS names the generation read (tensorstore's conditional writes build on it)
            response["x-goog-generation"] = str(storage.get_file_obj(
                request.params["bucket_name"], request.params["object_id"])["generation"])
        except Exception:  # noqa: BLE001 - the original handler answers a missing object
            pass
        return original_download(request, response, storage, *args, **kwargs)

    objects.download = download  # objects.get(alt=media) calls it by module name
    original_insert, original_delete = objects.insert, objects.delete
    preconditions = threading.Lock()  # the check and the write as one step, as GCS does them

    def generation_mismatch(request, response, storage, object_id: str | None) -> bool:
        """GCS's ``ifGenerationMatch`` (0: only if no live object); answers 412 when it does not hold."""
        wanted = request.query.get("ifGenerationMatch")
        if not wanted or object_id is None:
            return False
        try:
            current = int(storage.get_file_obj(request.params["bucket_name"], object_id)["generation"])
        except Exception:  # noqa: BLE001 - the emulator's NotFound: no live object
            current = 0
        if current == int(wanted[0]):
            return False
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "conditionNotMet",
                                 "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}]}})
        return True

    def insert(request, response, storage, *args, **kwargs):
        name = request.query.get("name", [None])[0]
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("meta") or {}).get("name")
        with preconditions:
            if not generation_mismatch(request, response, storage, name):
                return original_insert(request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        with preconditions:
            if not generation_mismatch(request, response, storage, request.params.get("object_id")):
                return original_delete(request, response, storage, *args, **kwargs)

    replaced = {original_download: download, original_insert: insert, original_delete: delete}
    emulator_server.HANDLERS = tuple(
        (pattern, {method: replaced.get(handler, handler) for method, handler in handlers.items()})
        for pattern, handlers in emulator_server.HANDLERS)


def _wait_for_port(port: int, process: subprocess.Popen | None, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited with code {process.returncode} before serving")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the GCS emulator did not listen on {LOOPBACK}:{port} within {timeout_s:.0f} s")


@contextlib.contextmanager
def running_emulator(bucket: str, port: int | None = None) -> Iterator[str]:
    """Start the emulator (in-memory, one bucket) in a child process on a free loopback port; yields its
    endpoint URL (``http://127.0.0.1:PORT``) and stops it on exit."""
    port = port or free_loopback_port()
    command = [sys.executable, os.path.abspath(__file__), "--port", str(port), "--bucket", bucket,
               "--parent-pid", str(os.getpid())]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process)
        yield f"http://{LOOPBACK}:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that can be armed to fail media downloads.

    ``cut_downloads(n, after_bytes)``: the next n media responses send their headers (with the full
    Content-Length) and ``after_bytes`` body bytes, then the connection is closed: a read killed mid-record.
    ``fail_downloads(n, status)``: the next n media requests are answered ``status`` (e.g. 503) at once.
    ``cuts`` / ``failures`` count what was done; ``media_requests`` counts media downloads seen.
    """

    def __init__(self, upstream: str):
        match = re.fullmatch(r"http://([^:/]+):(\d+)/?", upstream)
        if not match or match.group(1) != LOOPBACK:
            raise ValueError(f"FaultProxy forwards to a loopback endpoint only, got {upstream!r}")
        self._upstream = (match.group(1), int(match.group(2)))
        self._lock = threading.Lock()
        self._cut_left = self._fail_left = 0
        self._cut_after = 0
        self._fail_status = 503
        self.cuts = self.failures = self.media_requests = 0
        self._denied: set[str] = set()
        proxy = self

        class Handler(http_server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                media = "alt=media" in self.path or self.path.startswith("/download/")
                action = proxy._take_action(media) if self.command == "GET" else None
                status = proxy._fail_status
                if any(part in urllib.parse.unquote(self.path) for part in proxy._denied):
                    action, status = "fail", 403
                if action == "fail":
                    payload = json.dumps({"error": {"code": status, "message": "injected"}}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                connection.request(self.command, self.path, body=body, headers=headers)
                upstream = connection.getresponse()
                data = upstream.read()
                connection.close()
                self.send_response(upstream.status)
                for key, value in upstream.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server",
                                           "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                if action == "cut":
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[:proxy._cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

            def do_HEAD(self):
                self._forward()

        class Server(http_server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that hung up on a cut: expected
                pass

        self._server = Server((LOOPBACK, 0), Handler)
        self.endpoint = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _take_action(self, media: bool) -> str | None:
        if not media:
            return None
        with self._lock:
            self.media_requests += 1
            if self._fail_left:
                self._fail_left -= 1
                self.failures += 1
                return "fail"
            if self._cut_left:
                self._cut_left -= 1
                self.cuts += 1
                return "cut"
        return None

    def cut_downloads(self, count: int, after_bytes: int = 100) -> None:
        with self._lock:
            self._cut_left, self._cut_after = int(count), int(after_bytes)

    def fail_downloads(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._fail_left, self._fail_status = int(count), int(status)

    def deny(self, object_name: str) -> None:
        """Answer 403 to every request naming ``object_name`` (as a bucket whose IAM refuses it would)."""
        with self._lock:
            self._denied.add(object_name)

    def allow_all(self) -> None:
        with self._lock:
            self._denied.clear()
            self._cut_left = self._fail_left = 0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Exit once ``parent_pid`` is no longer our parent: a test run killed (SIGKILL, or SIGTERM to pytest
    alone) never runs the fixture's finaliser, and an orphaned emulator would hold its port for ever."""
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True, help="bucket created at start (names need >= 3 characters)")
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="exit when this process is gone (a test run killed before its fixture stops us)")
    args = parser.parse_args(argv)
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    _patch_emulator()
    from gcp_storage_emulator.__main__ import main as emulator_main

    return int(emulator_main(["start", "--host", LOOPBACK, "--port", str(args.port), "--in-memory",
                              "--default-bucket", args.bucket, "--quiet"]) or 0)


if __name__ == "__main__":
    sys.exit(main())
