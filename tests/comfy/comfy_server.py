"""A real ComfyUI server for tests: its own process on 127.0.0.1 (random free port), this pack
symlinked into a temporary ``--base-directory``'s custom_nodes, a tiny Latent-CLIP in
models/latent_clip. The server's log goes to a file whose tail is shown when something fails.

Named ``comfy_server`` because ComfyUI owns the top-level module name ``server``. Import the
fixtures ``comfy_server`` (session) and ``server_log_on_failure`` into the test module.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACK_NAME = "ComfyUI-Latent-CLIP"
TINY_CKPT = "tiny-latent-clip.safetensors"
START_TIMEOUT = 120.0   # s until the HTTP server answers (about 10 s on an idle CPU machine)


def _sibling(name: str, module_name: str):
    """Import a file next to this one under a private module name (``conftest`` holds the harness)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_args() -> list:
    """``--cpu`` unless LATENTCLIP_TEST_GPU=1 (tests/gpu/run.sh), then LATENTCLIP_TEST_COMFY_ARGS
    (e.g. ``--lowvram``): the same server tests run on a GPU as they are."""
    gpu = os.environ.get("LATENTCLIP_TEST_GPU") == "1"
    return ([] if gpu else ["--cpu"]) + os.environ.get("LATENTCLIP_TEST_COMFY_ARGS", "").split()


class ServerError(AssertionError):
    pass


class ComfyServer:
    """``with ComfyServer(comfy_root) as srv:`` starts ``main.py --cpu`` and stops it on exit."""

    def __init__(self, comfy_root, workdir=None, extra_args=(), extra_packs=(), env=None):
        self.root = Path(comfy_root)
        self.env = dict(env or {})
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lc-server-"))
        self.extra_args = list(extra_args)
        self.proc = None
        self.port = None
        self.log_path = self.workdir / "comfyui.log"
        for sub in ("custom_nodes", "models/latent_clip", "models/open_clip", "input", "output", "temp", "user"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        link = self.workdir / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        for pack in extra_packs:   # e.g. a test-only node pack: custom_nodes/<folder name> -> pack
            extra = self.workdir / "custom_nodes" / Path(pack).name
            if not extra.exists():
                extra.symlink_to(Path(pack).resolve(), target_is_directory=True)

    # paths
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models(self) -> Path:
        return self.workdir / "models"

    @property
    def input_dir(self) -> Path:
        return self.workdir / "input"

    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    def add_tiny_latent_clip(self, name=TINY_CKPT, seed=0) -> str:
        """Write the harness's tiny random Latent-CLIP into models/latent_clip (before or after start)."""
        import latentclip
        path = self.models / "latent_clip" / name
        if not path.exists():
            harness = _sibling("conftest", "latentclip_tests_comfy_conftest")
            latentclip.save(harness.tiny_latent_clip(seed=seed), path)
        return name

    # life cycle
    def start(self, attempts: int = 3) -> "ComfyServer":
        for _ in range(attempts):
            self.port = free_port()
            cmd = [sys.executable, "main.py", *device_args(), "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--base-directory", str(self.workdir), *self.extra_args]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1", **self.env)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            if self._wait_ready():
                return self
            busy = "address already in use" in self.log_tail(4000).lower()
            self.stop()
            if not busy:
                break
        raise ServerError(f"ComfyUI did not start (see {self.log_path}):\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/queue", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        return False

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # HTTP, every call bounded
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        """(status, parsed JSON or raw bytes)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def get(self, path: str, **kw):
        status, body = self.request("GET", path, **kw)
        if status != 200:
            raise ServerError(f"GET {path} -> HTTP {status}: {body!r:.300}\n{self.log_tail(2000)}")
        return body

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def submit(self, prompt: dict) -> tuple[int, dict]:
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": "latentclip-tests"})

    def wait_history(self, prompt_id: str, timeout: float = 60.0) -> dict:
        """The finished prompt's /history entry (polled, bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
            if entry:
                return entry
            if not self.alive():
                raise ServerError(f"ComfyUI exited while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 60.0) -> dict:
        """Submit and wait; returns the history entry. A refused prompt fails with the server's answer."""
        status, body = self.submit(prompt)
        if status != 200:
            raise ServerError(f"prompt refused (HTTP {status}): {json.dumps(body)[:2000]}")
        return self.wait_history(body["prompt_id"], timeout)


def status_messages(entry: dict) -> dict:
    """{event: data} of a history entry's status messages (execution_error, execution_success, ...)."""
    return {kind: data for kind, data in (entry.get("status") or {}).get("messages", [])}


_SHARED: ComfyServer | None = None


def shared_server() -> ComfyServer:
    """One server per test session (started on first use, stopped at session end by the fixture)."""
    global _SHARED
    if _SHARED is None or not _SHARED.alive():
        harness = _sibling("conftest", "latentclip_tests_comfy_conftest")
        if harness.COMFYUI is None:
            pytest.skip(harness.SKIP_REASON)
        srv = ComfyServer(harness.COMFYUI)
        srv.add_tiny_latent_clip()   # before start, so the loader's file list includes it
        _SHARED = srv.start()
        atexit.register(srv.stop)    # also when the session ends without fixture teardown
    return _SHARED


@pytest.fixture(scope="session")
def comfy_server():
    """A running ComfyUI server with this pack and a tiny Latent-CLIP; its log tail is shown on failure."""
    srv = shared_server()
    yield srv
    srv.stop()
    global _SHARED
    _SHARED = None
    shutil.rmtree(srv.workdir, ignore_errors=True)


def log_tail_on_failure(request, server):
    """Generator body for a fixture: prints ``server``'s log tail after a failed test
    (pytest shows it under 'Captured stdout teardown')."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        print(f"--- tail of {server.log_path} ---\n{server.log_tail()}")


@pytest.fixture(autouse=False)
def server_log_on_failure(request, comfy_server):
    yield from log_tail_on_failure(request, comfy_server)
