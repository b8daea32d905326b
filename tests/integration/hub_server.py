"""A local server speaking the three Hub endpoints a small model upload uses (create the repo,
ask the upload mode of each file, commit), storing commits under a local folder. The real
``huggingface_hub`` client talks to it over HTTP; every file is answered "regular" (inline in
the commit), the Hub's mode for small files, so no LFS or Xet storage is involved."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LocalHub:
    """``with LocalHub(root) as hub``: ``hub.endpoint`` to pass as the Hub URL; pushed files
    land in ``root/<owner>/<name>/``; ``hub.requests`` lists (method, path, headers)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.created: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, payload: dict, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                self._reply({"error": "not served"}, 404)

            def do_POST(self):
                hub.requests.append(("POST", self.path, dict(self.headers)))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/repos/create":
                    spec = json.loads(body)
                    hub.created.append(spec)
                    repo = f"{spec.get('organization')}/{spec['name']}"
                    return self._reply({"url": f"{hub.endpoint}/{repo}"})
                parts = self.path.split("/")  # /api/models/<owner>/<name>/<what>/<revision>
                if len(parts) == 7 and parts[5] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in files]  # fmt: skip
                    return self._reply({"files": modes})
                if len(parts) == 7 and parts[5] == "commit":
                    repo_dir = hub.root / parts[3] / parts[4]
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "file":
                            target = repo_dir / entry["value"]["path"]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(base64.b64decode(entry["value"]["content"]))
                    url = f"{hub.endpoint}/{parts[3]}/{parts[4]}/commit/{'0' * 40}"
                    return self._reply({"commitUrl": url, "commitOid": "0" * 40})
                self._reply({"error": "not served"}, 404)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
