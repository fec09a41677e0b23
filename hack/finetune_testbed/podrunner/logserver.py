"""The kubelet-style log endpoint `kubectl logs` reaches (HTTPS, the API server's client certificate)."""

from __future__ import annotations

import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any


class LogServer:
    """The slice of the kubelet API that `kubectl logs` needs: /containerLogs/<ns>/<pod>/<container>.

    HTTPS on loopback with the node's serving certificate; only clients with a certificate
    from the cluster CA (the apiserver) are served. `follow` streams until the container ends.
    """

    def __init__(self, *, logs_dir: Path, tls_dir: Path, port: int, live: set[Path]) -> None:
        import http.server
        import ssl

        logs, live_logs = logs_dir, live

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container> is served")
                    return
                query = urllib.parse.parse_qs(url.query)
                path = logs / f"{parts[1]}_{parts[2]}_{parts[3]}.log"
                if not path.exists():
                    self.send_error(404, f"no log for container {parts[3]} of pod {parts[1]}/{parts[2]}")
                    return
                data = path.read_bytes()
                if "tailLines" in query:
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-int(query["tailLines"][0]) :]) if int(query["tailLines"][0]) else b""
                if "limitBytes" in query:
                    data = data[: int(query["limitBytes"][0])]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(data)
                if query.get("follow", ["false"])[0] != "true":
                    return
                offset = path.stat().st_size
                try:
                    while True:
                        self.wfile.flush()
                        with open(path, "rb") as f:
                            f.seek(offset)
                            chunk = f.read()
                        offset += len(chunk)
                        if chunk:
                            self.wfile.write(chunk)
                        elif path not in live_logs:
                            return
                        else:
                            time.sleep(0.2)
                except (BrokenPipeError, ConnectionResetError):
                    return

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls_dir / "kubelet.crt"), str(tls_dir / "kubelet.key"))
        ctx.load_verify_locations(str(tls_dir / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="log-server", daemon=True).start()
