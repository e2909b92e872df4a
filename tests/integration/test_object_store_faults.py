"""Storage faults, made for real: a disk that fills up mid-run (a size-limited tmpfs this test mounts) and an
object store that fails for a while (moto's S3 server behind a proxy that answers 503 to every write for a time)."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sd3ray.checkpoint import upload_checkpoint
from tests.support import MICRO, REPO_ROOT


class FlakyS3Proxy:
    """Forwards HTTP to an S3 server, but answers 503 SlowDown to every write during its first `outage_s` seconds
    (counted from the first write), longer than the S3 client's own retries last."""

    def __init__(self, upstream: str, outage_s: float) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self
        self.refused = 0
        self.first_write: float | None = None

        class Handler(BaseHTTPRequestHandler):
            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""  # the S3 client streams writes in HTTP chunks: reassemble them
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return body

            def _forward(self) -> None:
                body = self._body()
                if self.command in ("PUT", "POST"):
                    proxy.first_write = proxy.first_write or time.monotonic()
                    if time.monotonic() - proxy.first_write < outage_s:
                        proxy.refused += 1
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body, headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_checkpoint_upload_rides_out_a_failing_object_store(s3, tmp_path: Path, capsys, monkeypatch) -> None:
    import torch

    from sd3ray.checkpoint import CheckpointData, write_checkpoint
    from sd3ray.config import load_config

    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", MICRO)
    local = write_checkpoint(tmp_path / "step_00000007", CheckpointData(7, cfg, {"w": torch.arange(4.0)},
                                                                       {"w": torch.arange(4.0)}, {}, {}, {}))
    proxy = FlakyS3Proxy(s3["endpoint"], outage_s=10.0)  # the S3 client alone gives up after ~6 s
    for key, value in s3["env"].items():
        monkeypatch.setenv(key, value)
    destination = f"s3://sd3ray/flaky/step_00000007?endpoint_override=127.0.0.1:{proxy.port}&scheme=http"
    try:
        upload_checkpoint(local, destination, attempts=6, first_wait_s=0.5)
    finally:
        proxy.server.shutdown()
    assert proxy.refused > 0
    assert "retrying in 0.5 s (1/6)" in capsys.readouterr().out
    for path in local.iterdir():
        stored = s3["client"].get_object(Bucket="sd3ray", Key=f"flaky/step_00000007/{path.name}")["Body"].read()
        assert stored == path.read_bytes(), path.name
