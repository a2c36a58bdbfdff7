"""A stand-in Hugging Face Hub on 127.0.0.1 for the download tests (point HF_ENDPOINT at ``.url``).

It answers the two calls huggingface_hub (2.x) makes for ``list_repo_files`` and ``hf_hub_download``:
``GET /api/models/<repo>/tree/<revision>`` (the file listing) and ``HEAD``/``GET
/<repo>/resolve/<revision>/<path>`` (metadata headers X-Repo-Commit, ETag, Content-Length; then the
bytes, with Range support). An unknown repo gets the Hub's 404 with ``X-Error-Code: RepoNotFound``.
Every request is recorded in ``requests`` as (method, path).
"""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

class StandInHub:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = {repo: {name: Path(p) for name, p in files.items()} for repo, files in repos.items()}
        self.requests: list[tuple[str, str]] = []
        digest = hashlib.sha1()   # a revision per content, as a real repo's commit
        for repo, files in sorted(self.repos.items()):
            for name, p in sorted(files.items()):
                digest.update(f"{repo}/{name}".encode() + p.read_bytes())
        self.commit = digest.hexdigest()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, suffix: str = ".pt") -> list[str]:
        """Paths whose bytes were sent (GET .../resolve/...)."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p and p.endswith(suffix)]

    # -- request handling
    def _answer(self, h: BaseHTTPRequestHandler, body: bool):
        path = urllib.parse.urlsplit(h.path).path
        self.requests.append((h.command, path))
        parts = urllib.parse.unquote(path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            return self._tree("/".join(parts[2:4]), h, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file("/".join(parts[:2]), "/".join(parts[4:]), h, body)
        self._send(h, 404, b'{"error": "not found"}', body)

    def _tree(self, repo, h, body):
        if repo not in self.repos:
            return self._not_found(h, body)
        listing = [{"type": "file", "path": name, "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for name, p in sorted(self.repos[repo].items())]
        self._send(h, 200, json.dumps(listing).encode(), body, {"Content-Type": "application/json"})

    def _file(self, repo, name, h, body):
        if repo not in self.repos:
            return self._not_found(h, body)
        if name not in self.repos[repo]:
            return self._send(h, 404, b'{"error": "Entry not found"}', body,
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit})
        data = self.repos[repo][name].read_bytes()
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and body:
            start = int(rng[len("bytes="):].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(h, 206, data[start:], body, headers)
        self._send(h, 200, data, body, headers)

    def _not_found(self, h, body):
        self._send(h, 404, b'{"error": "Repository not found"}', body,
                   {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})

    @staticmethod
    def _send(h, status, data: bytes, body: bool, headers=None):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)


def authors_layout(open_clip_state_dict: dict) -> dict:
    """An open_clip-layout Latent-CLIP state dict saved as the authors' epoch_*.pt is laid out: the DDP
    ``module.`` prefix, the tower under ``visual.latent_vit``, a frozen VAE encoder copy, optimizer state."""
    import numpy as np
    import torch
    sd = {}
    for k, v in open_clip_state_dict.items():
        k = "visual.latent_vit." + k[len("visual."):] if k.startswith("visual.") else k
        sd["module." + k] = v.detach().clone().float()
    sd["module.visual.vae_encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    sd["module.visual.vae_quant_conv.weight"] = torch.randn(8, 8, 1, 1)
    opt_state = {i: {"step": torch.tensor(5.0), "exp_avg": torch.randn(64), "exp_avg_sq": torch.rand(64)} for i in range(4)}
    return {"epoch": 34, "name": "latent-clip-standin", "state_dict": sd,
            "optimizer": {"state": opt_state, "param_groups": [{"lr": np.float64(5e-4), "params": [0, 1, 2, 3]}]}}
