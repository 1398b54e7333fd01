"""A Hugging Face hub-shaped HTTP server on 127.0.0.1 for tests (issue #27: no mocks).

It serves model repos from a folder (``<root>/<org>/<name>/<path in repo>``) the way the hub's
``/{repo_id}/resolve/{revision}/{path}`` endpoint does, with the headers ``huggingface_hub`` reads
(``X-Repo-Commit``, ``ETag``, ``Content-Length``) and the error codes it turns into exceptions
(``X-Error-Code: RepoNotFound`` / ``EntryNotFound``), and byte ranges (SAELens reads a safetensors
header with two ``Range`` requests before it downloads). Point ``HF_ENDPOINT`` (and
``huggingface_hub.constants.ENDPOINT`` in a process that has imported it) at :attr:`HubServer.endpoint`.

Also a writer for a Gemma Scope 2-layout repo: ``<folder>/params.safetensors`` holding ``w_enc``
``[d_in, d_sae]``, ``w_dec`` ``[d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold`` (the layout
SAELens' ``gemma_3`` loader reads, ENVIRONMENT.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import torch

_RESOLVE = re.compile(r"^/(?P<org>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class HubServer:
    """Serve ``root`` as hub model repos until :meth:`stop`. ``requests`` logs ``(method, path)``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

            def _error(self, code: int, error_code: str, msg: str) -> None:
                data = msg.encode()
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", msg)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            def _serve(self, body: bool) -> None:
                server.requests.append((self.command, self.path))
                m = _RESOLVE.match(unquote(self.path.split("?", 1)[0]))
                if m is None:
                    return self._error(404, "EntryNotFound", f"not served: {self.path}")
                repo = server.root / m["org"] / m["name"]
                if not repo.is_dir():
                    return self._error(404, "RepoNotFound", f"Repository not found: {m['org']}/{m['name']}")
                f = (repo / m["path"]).resolve()
                if repo.resolve() not in f.parents or not f.is_file():
                    return self._error(404, "EntryNotFound", f"Entry not found: {m['path']}")
                data = f.read_bytes()
                size, start, end, status = len(data), 0, len(data) - 1, 200
                rng = self.headers.get("Range")
                if rng and (r := _RANGE.match(rng.strip())):
                    if r[1]:
                        start, end = int(r[1]), min(int(r[2]) if r[2] else size - 1, size - 1)
                    else:  # suffix range: the last N bytes
                        start = max(0, size - int(r[2]))
                    status = 206
                part = data[start:end + 1]
                self.send_response(status)
                self.send_header("X-Repo-Commit", server.commit(repo))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(part)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if body:
                    self.wfile.write(part)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def commit(self, repo: Path) -> str:
        """A 40-hex commit id of the repo's current content (changes when any file changes)."""
        h = hashlib.sha1()
        for f in sorted(p for p in repo.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(repo)).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def gets(self) -> int:
        """How many GET requests the server has answered (downloads and range reads)."""
        return sum(1 for method, _ in self.requests if method == "GET")


def write_gemma_scope_folder(folder: Path, d_in: int, d_sae: int, seed: int = 0,
                             threshold_range: tuple[float, float] = (0.5, 1.0),
                             config: dict | None = None) -> dict[str, torch.Tensor]:
    """Write ``folder/params.safetensors`` in Gemma Scope 2's layout with small random weights whose
    JumpReLU fires on a fraction of latents for inputs of norm ~sqrt(d_in) (raise
    ``threshold_range`` for larger inputs); ``config`` is written as ``folder/config.json`` (Gemma
    Scope 2's optional file: ``model_name``, ``architecture: jump_relu``). Return the tensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    t = {
        "w_enc": (w_dec.T * 0.9).contiguous(),
        "w_dec": w_dec.contiguous(),
        "b_enc": (torch.randn(d_sae, generator=g) * 0.1).contiguous(),
        "b_dec": (torch.randn(d_in, generator=g) * 0.2).contiguous(),
        "threshold": (torch.rand(d_sae, generator=g) * (threshold_range[1] - threshold_range[0])
                      + threshold_range[0]).contiguous(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return t


@contextlib.contextmanager
def using_hub(endpoint: str, cache: str | Path, offline: bool = False):
    """Point this process's huggingface_hub (and child processes, through the environment) at
    ``endpoint`` with the hub cache ``cache``; restored on exit. ``huggingface_hub`` reads
    ``HF_ENDPOINT`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` when it is first imported, so the
    module's constants are set too."""
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0",
           "NO_PROXY": "127.0.0.1,localhost"}
    attrs = {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
             "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": offline}
    old_env = {k: os.environ.get(k) for k in env}
    old_attrs = {k: getattr(constants, k) for k in attrs}
    os.environ.update(env)
    for k, v in attrs.items():
        setattr(constants, k, v)
    try:
        yield
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for k, v in old_attrs.items():
            setattr(constants, k, v)
