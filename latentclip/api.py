"""Headless runner: drives a ComfyUI server over its HTTP API with an API-format workflow.

    python -m latentclip.api run WORKFLOW_API.json --server http://127.0.0.1:8188 \\
        [--set 3.text="a cat" ...] [--out DIR] [--timeout 600]

It submits the graph with a client id, shows progress from the websocket (each node as it starts,
ProgressBar steps), fetches ``/history/{id}`` when the prompt is done, saves every output into DIR
(files through ``/view``, ``text`` entries as .txt, other UI entries as .json; an existing file is
never overwritten, the new one gets ``_1``, ``_2``, ...) and prints one line per output. Failures
print the server's own message (before anything is downloaded) and exit non-zero:
2 bad arguments, workflow file, --set, --server, --timeout or --out (all checked before anything is
queued), 3 prompt refused by validation (HTTP 400), 4 execution error, 5 interrupted on the server, 6
server unreachable, not answering JSON like ComfyUI, or timed out, 7 an output could not be saved, 130
stopped with Ctrl-C (the prompt is withdrawn from the server), 1 a bug in the runner. Every failure is one
``error:`` line on stderr (a refused prompt adds one line per node error).

ComfyUI-free: only the standard library, plus aiohttp (shipped with ComfyUI) for the websocket;
without aiohttp the runner polls ``/history`` instead.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

EXIT_USAGE, EXIT_INVALID, EXIT_EXECUTION, EXIT_INTERRUPTED, EXIT_SERVER, EXIT_OUTPUT = 2, 3, 4, 5, 6, 7
EXIT_BUG = 1
EXIT_STOPPED = 130   # Ctrl-C, as shells report SIGINT
#: JSON nesting a workflow may have: an API graph is ~5 levels deep; far deeper is refused before Python's
#: recursion limit turns ``deepcopy`` or ``json.dumps`` into a RecursionError traceback.
MAX_JSON_DEPTH = 64
UI_FORMAT_MESSAGE = ("{path} is a UI (save) workflow, not the API format; in ComfyUI use Workflow > "
                     "Export (API) (older front ends: enable dev mode, then Save (API Format)) and run that file")
_HTTP_TIMEOUT = 30.0  # one request; the whole run is bounded by ``timeout``
_POLL_INTERVAL = 0.25


class RunError(Exception):
    """A failed run: ``str(e)`` is the message for the user, ``exit_code`` the CLI status."""

    exit_code = EXIT_SERVER

    def __init__(self, message: str, details=None, result: "RunResult | None" = None):
        super().__init__(message)
        self.details = details
        self.result = result


class WorkflowError(RunError):
    """The workflow file or a --set is unusable (nothing was submitted)."""
    exit_code = EXIT_USAGE


class PromptRejected(RunError):
    """The server's validation refused the prompt (HTTP 400)."""
    exit_code = EXIT_INVALID


class ExecutionFailed(RunError):
    """A node raised while the prompt ran (``execution_error``)."""
    exit_code = EXIT_EXECUTION


class Interrupted(RunError):
    """Someone posted /interrupt while the prompt ran (``execution_interrupted``)."""
    exit_code = EXIT_INTERRUPTED


class OutputError(RunError):
    """The prompt ran but an output could not be written into the output folder."""
    exit_code = EXIT_OUTPUT


@dataclass
class SavedOutput:
    node_id: str
    class_type: str
    kind: str          # ui key: "images", "latents", "text", ...
    summary: str       # short human-readable description
    path: Path | None  # where it was saved (None without out_dir)

    def line(self) -> str:
        where = f" -> {self.path}" if self.path else ""
        return f"node {self.node_id} ({self.class_type}) {self.kind}: {self.summary}{where}"


@dataclass
class RunResult:
    prompt_id: str
    status: str                      # "success", "error" or "interrupted"
    outputs: list = field(default_factory=list)   # SavedOutput
    history: dict = field(default_factory=dict)   # the server's /history entry
    seconds: float = 0.0


# -- workflow files -----------------------------------------------------------------------------
def is_ui_format(data) -> bool:
    """True for the front end's save format (a ``nodes`` list and ``links``), which the API cannot run."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def json_depth(value) -> int:
    """How deeply lists and objects nest in ``value`` (iterative: any depth is safe to measure)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_depth(value, what: str):
    if json_depth(value) > MAX_JSON_DEPTH:
        raise WorkflowError(f"{what} nests lists/objects more than {MAX_JSON_DEPTH} levels deep; "
                            "a ComfyUI workflow needs a handful")
    return value


def check_api_graph(data, path="the workflow") -> dict:
    """Return the API graph in ``data`` (also accepts a saved POST body ``{"prompt": graph}``)."""
    _check_depth(data, str(path))
    if is_ui_format(data):
        raise WorkflowError(UI_FORMAT_MESSAGE.format(path=path))
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{path} must be a JSON object of nodes keyed by id (ComfyUI API format)")
    for node_id, node in data.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{path}: node {node_id!r} has no class_type/inputs; expected the ComfyUI API format")
    return data


def load_workflow(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))   # Notepad and PowerShell write a BOM
    except OSError as e:
        raise WorkflowError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise WorkflowError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "expected a JSON workflow as ComfyUI saves it") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise WorkflowError(f"{path} nests lists/objects more than {MAX_JSON_DEPTH} levels deep; "
                            "a ComfyUI workflow needs a handful") from None
    return check_api_graph(data, str(path))


class _Set(tuple):
    """(id, input, value) of one --set, also holding ``raw``, the value as typed: a text input gets that, since
    JSON's spelling of a number is not the user's (2024.10 would become "2024.1")."""
    raw: str


def parse_set(expr: str) -> tuple[str, str, object]:
    """``ID.INPUT=VALUE`` -> (id, input, value); VALUE is JSON when it parses, else the raw string."""
    key, sep, raw = expr.partition("=")
    node_id, dot, name = key.strip().rpartition(".")
    if not sep or not dot or not node_id or not name:
        raise WorkflowError(f"--set {expr!r} must look like ID.INPUT=VALUE, e.g. --set 3.text=\"a cat\"")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    except RecursionError:
        raise WorkflowError(f"--set {key.strip()}: the value nests lists/objects more than {MAX_JSON_DEPTH} "
                            "levels deep; a ComfyUI input needs a handful") from None   # deeper than the check below allows
    parsed = _Set((node_id, name, _check_depth(value, f"--set {key.strip()}")))
    parsed.raw = raw
    return parsed


def apply_sets(graph: dict, sets, warn: Callable[[str], None] | None = None) -> dict:
    """A copy of ``graph`` with each (id, input, value) set; an unknown node id is an error."""
    graph = copy.deepcopy(graph)
    for item in sets:
        node_id, name, value = item
        if node_id not in graph:
            ids = ", ".join(sorted(graph, key=lambda k: (len(k), k)))
            raise WorkflowError(f"--set {node_id}.{name}: the workflow has no node {node_id!r} (its nodes: {ids})")
        inputs = graph[node_id].setdefault("inputs", {})
        old = inputs.get(name)
        if name not in inputs and warn:
            warn(f"note: node {node_id} ({graph[node_id]['class_type']}) had no input {name!r}; adding it")
        if isinstance(old, str) and not isinstance(value, (str, list, dict)):
            value = getattr(item, "raw", None) or json.dumps(value)  # keep text text, as typed: 3.text=42 stays "42"
        inputs[name] = value
    return graph


# -- HTTP ---------------------------------------------------------------------------------------
def check_server(server: str) -> str:
    """The server's base URL (``http://`` added when missing). A mistyped one is a usage error naming --server:
    urllib raises ValueError for it, which surfaced as a bug in the runner."""
    base = (server if "://" in server else "http://" + server).rstrip("/")
    try:
        parts = urllib.parse.urlsplit(base)
        # .port raises ValueError for a port that is not a number from 0 to 65535
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:
        usable = False
    if not usable or any(c.isspace() or not c.isprintable() for c in base):
        raise WorkflowError(f"--server {server!r} is not a ComfyUI server URL; expected http(s)://HOST[:PORT], "
                            "e.g. http://127.0.0.1:8188")
    return base


class Client:
    """The few ComfyUI endpoints the runner needs, over urllib, each bounded by a timeout."""

    def __init__(self, server: str, client_id: str | None = None):
        self.base = check_server(server)
        self.client_id = client_id or uuid.uuid4().hex

    def _open(self, path: str, body=None, timeout=_HTTP_TIMEOUT):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RunError(f"cannot reach the ComfyUI server at {self.base}: {reason}") from None

    def _json_object(self, what: str, status: int, raw: bytes) -> dict:
        """The reply as a JSON object, or a RunError saying the server is not answering like ComfyUI."""
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            start = raw[:80].decode(errors="replace").strip().replace("\n", " ")
            raise RunError(f"{what} answered HTTP {status} with a reply that is not a JSON object "
                           f"({start!r}); expected a ComfyUI server at {self.base}")
        return body

    def get_json(self, path: str, timeout=_HTTP_TIMEOUT) -> dict:
        status, raw = self._open(path, timeout=timeout)
        if status != 200:
            raise RunError(f"GET {path} answered HTTP {status}: {raw[:200].decode(errors='replace')}")
        return self._json_object(f"GET {path}", status, raw)

    def submit(self, graph: dict, timeout=_HTTP_TIMEOUT) -> str:
        status, raw = self._open("/prompt", {"prompt": graph, "client_id": self.client_id}, timeout=timeout)
        body = self._json_object("POST /prompt", status, raw)
        if status != 200 or not isinstance(body.get("prompt_id"), str):
            raise PromptRejected(format_validation_error(body, graph), details=body)
        if body.get("node_errors"):
            # ComfyUI queues a prompt when one output is valid and drops the outputs of invalid nodes: a
            # headless run would report success without them, so it is withdrawn and refused instead
            self.withdraw(body["prompt_id"])
            failed = ", ".join(_node_label(graph, n) for n in body["node_errors"])
            raise PromptRejected(format_validation_error(
                {**body, "error": {"message": f"{failed} failed validation, so the outputs that depend on it "
                                              "would not run (the server queued the rest; it was withdrawn)"}}, graph),
                details=body)
        return body["prompt_id"]

    def withdraw(self, prompt_id: str) -> None:
        """Take a queued prompt off the queue, or interrupt it if it already runs (best effort)."""
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self._open(path, body)
            except RunError:
                pass

    def history(self, prompt_id: str, timeout=_HTTP_TIMEOUT) -> dict | None:
        entry = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}", timeout=timeout).get(prompt_id)
        if entry is not None and not isinstance(entry, dict):
            raise RunError(f"GET /history/{prompt_id} answered an entry that is not a JSON object; "
                           f"expected a ComfyUI server at {self.base}")
        return entry

    def view(self, item: dict) -> bytes:
        query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        status, raw = self._open(f"/view?{query}", timeout=120)
        if status != 200:
            raise RunError(f"GET /view for {item.get('filename')!r} answered HTTP {status}")
        return raw

    def ws_url(self) -> str:
        scheme = "wss" if self.base.startswith("https") else "ws"
        return f"{scheme}{self.base[self.base.index(':'):]}/ws?clientId={self.client_id}"


# -- messages -----------------------------------------------------------------------------------
def _node_label(graph: dict, node_id) -> str:
    node = graph.get(str(node_id), {})
    return f"node {node_id} ({node.get('class_type', '?')})"


def format_validation_error(body: dict, graph: dict) -> str:
    """The server's own words for a refused prompt: the error and each node's errors."""
    err = body.get("error") or {}
    head = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    if isinstance(err, dict) and err.get("details"):
        head += f": {err['details']}"
    lines = [f"prompt refused: {head}"]
    for node_id, info in (body.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            detail = f" ({e['details']})" if e.get("details") else ""
            lines.append(f"  {_node_label(graph, node_id)}: {e.get('message', e)}{detail}")
    return "\n".join(lines)


def format_execution_error(data: dict) -> str:
    node = data.get("node_id", "?")
    message = " ".join(str(data.get("exception_message", "")).split())   # one line, whatever the node raised
    return (f"execution failed at node {node} ({data.get('node_type', '?')}): "
            f"{data.get('exception_type', 'Error')}: {message}")


class ProgressPrinter:
    """Default ``on_event``: one line per node as it starts, ProgressBar steps at most every 10%."""

    def __init__(self, graph: dict, stream=None):
        self.graph, self.stream, self._last = graph, stream or sys.stderr, {}
        self.started = 0

    def __call__(self, event: str, data: dict):
        if event == "execution_cached" and data.get("nodes"):
            self._print(f"cached: {', '.join(map(str, data['nodes']))}")
        elif event == "executing" and data.get("node") is not None:
            self.started += 1
            self._print(f"[{self.started}/{len(self.graph)}] {_node_label(self.graph, data['node'])}")
        elif event == "progress":
            value, total = int(data.get("value", 0)), max(int(data.get("max", 1)), 1)
            decile = value * 10 // total
            key = data.get("node")
            if value == total or decile > self._last.get(key, -1):
                self._last[key] = decile
                self._print(f"    step {value}/{total}")

    def _print(self, text: str):
        print(text, file=self.stream, flush=True)


# -- waiting for the prompt ---------------------------------------------------------------------
_TERMINAL = {"execution_success", "execution_error", "execution_interrupted"}


async def _watch_ws(ws, prompt_id: str, on_event, deadline: float) -> bool:
    """Forward our prompt's JSON events until it ends; False if the socket closed first."""
    import aiohttp
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return True  # the caller's history poll reports the timeout
        try:   # wait_for, not receive(timeout=): aiohttp restarts that timeout on every heartbeat PONG
            msg = await asyncio.wait_for(ws.receive(), left)
        except asyncio.TimeoutError:
            return True
        if msg.type == aiohttp.WSMsgType.BINARY:
            continue  # preview frames and progress text
        if msg.type != aiohttp.WSMsgType.TEXT:
            return False
        try:
            event = json.loads(msg.data)
        except ValueError:
            continue
        kind, data = event.get("type"), event.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if on_event:
            on_event(kind, data)
        if kind in _TERMINAL or (kind == "executing" and data.get("node") is None):
            return True


def _left(deadline: float, cap: float = _HTTP_TIMEOUT) -> float:
    """Seconds one request may take: at most ``cap``, at most what is left of the run (at least 1)."""
    return max(1.0, min(cap, deadline - time.monotonic()))


async def _submit_and_watch(client: Client, graph: dict, on_event, deadline: float, submitted: dict) -> str:
    """Submit (the id goes into ``submitted['id']`` at once, so Ctrl-C can withdraw it) and follow its events."""
    def submit() -> str:
        submitted["id"] = client.submit(graph, timeout=_left(deadline))
        return submitted["id"]
    try:
        import aiohttp
    except ImportError:
        return submit()
    prompt_id = None
    timeout = aiohttp.ClientTimeout(total=None, connect=_left(deadline))
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            # the handshake bounded too: a server that accepts and never answers must not outlast --timeout
            ws = await asyncio.wait_for(session.ws_connect(client.ws_url(), heartbeat=30, max_msg_size=0),
                                        _left(deadline))
            async with ws:
                prompt_id = submit()  # after connecting, so no event is missed
                await _watch_ws(ws, prompt_id, on_event, deadline)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        pass  # no (or a broken) websocket: the history poll still finishes the run
    return prompt_id if prompt_id is not None else submit()


def _wait_history(client: Client, prompt_id: str, deadline: float, timeout: float) -> dict:
    while True:
        entry = client.history(prompt_id, timeout=_left(deadline))
        if entry:  # the server adds the entry once the prompt has finished
            return entry
        if time.monotonic() >= deadline:
            raise RunError(f"timed out after {timeout:g} s waiting for prompt {prompt_id}; it may still be "
                           f"running on the server (POST /interrupt stops it)")
        time.sleep(_POLL_INTERVAL)


# -- outputs ------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^\w.-]+")   # letters and digits of any script stay; separators go


def safe_name(*parts) -> str:
    """A file name built from untrusted parts: no separators, no leading dots."""
    name = "-".join(_SAFE.sub("_", str(p)) for p in parts if str(p))
    return name.lstrip(".") or "output"


def write_new_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, or to ``stem_1.ext``, ``stem_2.ext``, ... if that exists: never overwrites.

    Exclusive creation (mode "x"), so a file that appears between the check and the write is kept too.
    """
    stem, suffix, n = path.stem, path.suffix, 1
    while True:
        try:
            f = open(path, "xb")
        except FileExistsError:
            path, n = path.with_name(f"{stem}_{n}{suffix}"), n + 1
            continue
        try:
            with f:
                f.write(data)
        except BaseException:   # a full disk or a file size limit: no truncated file under an output's name
            path.unlink(missing_ok=True)
            raise
        return path


def _short(text: str, limit: int = 80) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    more = text.strip().count("\n")
    cut = first if len(first) <= limit else first[:limit - 3] + "..."
    return repr(cut) + (f" (+{more} lines)" if more else "")


def check_out_dir(out_dir) -> Path:
    """Refuse an output folder that cannot receive files, before anything is queued (finding out after
    the run would lose its outputs). A missing folder is created only when there is something to save;
    here its nearest existing parent must be a folder this user can create entries in."""
    out_dir = Path(out_dir)
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(0, f"{existing} is not a folder")
        if existing == out_dir:
            fd, probe = tempfile.mkstemp(prefix=".latentclip-write-check-", dir=out_dir)
            os.close(fd)
            os.unlink(probe)
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(0, f"{existing} does not let this user create entries")
    except OSError as e:
        raise WorkflowError(f"output folder {out_dir} cannot be used ({e.strerror or type(e).__name__}); "
                            "expected a folder this user can create files in") from None
    return out_dir


def save_outputs(client: Client | None, graph: dict, outputs: dict, out_dir, saved: list | None = None) -> list:
    """Save every UI output of a history entry; returns one SavedOutput per output. ``saved``: the list to
    append to, so a caller still knows what was saved when a later download or write fails."""
    out_dir = Path(out_dir) if out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    saved = [] if saved is None else saved
    for node_id, ui in (outputs if isinstance(outputs, dict) else {}).items():
        class_type = graph.get(str(node_id), {}).get("class_type", "?")
        ui = ui if isinstance(ui, dict) or ui is None else {"output": ui}
        other = {}
        for kind, items in (ui or {}).items():
            items = items if isinstance(items, list) else [items]
            files = [i for i in items if isinstance(i, dict) and "filename" in i]
            for item in files:
                path = None
                if out_dir and client:
                    data = client.view(item)
                    path = write_new_file(out_dir / safe_name(item.get("subfolder", ""), item["filename"]), data)
                summary = f"{item['filename']} ({item.get('type', 'output')}" + (f", {len(data)} bytes)" if path else ")")
                saved.append(SavedOutput(str(node_id), class_type, kind, summary, path))
            rest = [i for i in items if not (isinstance(i, dict) and "filename" in i)]
            if kind == "text" and rest:
                text = "\n".join(str(t) for t in rest)
                path = None
                if out_dir:
                    path = write_new_file(out_dir / f"{safe_name(node_id, class_type)}.txt", text.encode("utf-8"))
                saved.append(SavedOutput(str(node_id), class_type, kind, _short(text), path))
            elif rest:
                other[kind] = rest if isinstance(ui[kind], list) else ui[kind]
        if other:
            path = None
            if out_dir:
                path = write_new_file(out_dir / f"{safe_name(node_id, class_type)}.json",
                                      json.dumps(other, indent=1, default=str).encode("utf-8"))
            saved.append(SavedOutput(str(node_id), class_type, "ui", _short(json.dumps(other, default=str)), path))
    return saved


# -- the run ------------------------------------------------------------------------------------
def run_workflow(graph: dict, server: str, out_dir=None, on_event=None, timeout: float = 600.0) -> RunResult:
    """Run an API-format graph on a ComfyUI server; save its outputs into ``out_dir`` (if given).

    ``on_event(type, data)`` receives this prompt's websocket events. Raises ``PromptRejected``,
    ``ExecutionFailed`` or ``Interrupted`` (each with the server's message; the last two carry the
    partial ``result``, whose outputs are listed but not downloaded: the server's error comes first),
    or ``RunError`` for an unreachable server, a reply that is not ComfyUI's, or a timeout.

    Blocking. Called from code that already runs an event loop (a notebook, an async app), the
    websocket part runs on a private loop in a worker thread; from async code prefer
    ``await asyncio.to_thread(run_workflow, ...)`` so the caller's loop keeps running.
    """
    graph = check_api_graph(graph)
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise WorkflowError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    if out_dir:
        check_out_dir(out_dir)
    client = Client(server)
    start = time.monotonic()
    deadline = start + timeout
    submitted = {}
    try:
        prompt_id = _run_coroutine(lambda: _submit_and_watch(client, graph, on_event, deadline, submitted))
        entry = _wait_history(client, prompt_id, deadline, timeout)
    except KeyboardInterrupt as e:   # Ctrl-C: the user wants the work stopped, not left running on the server
        if "id" in submitted:
            client.withdraw(submitted["id"])
            e.prompt_id = submitted["id"]
        raise
    status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
    result = RunResult(prompt_id, status.get("status_str") or "success", history=entry)
    result.seconds = time.monotonic() - start
    try:
        raise_for_status(result, graph)
    except RunError:
        result.outputs = save_outputs(None, graph, entry.get("outputs") or {}, None)  # listed, not fetched
        raise
    result.outputs = []   # filled as outputs are saved: a failure part-way still lists the ones already on disk
    try:
        save_outputs(client, graph, entry.get("outputs") or {}, out_dir, result.outputs)
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        raise OutputError(f"prompt {prompt_id} ran, but cannot save its outputs into {out_dir}: "
                          f"{e.strerror or e}{where[:200]}{_saved_before(result.outputs)}", result=result) from None
    except RunError as e:   # a /view that failed part-way
        raise type(e)(f"{e}{_saved_before(result.outputs)}", details=e.details, result=result) from None
    result.seconds = time.monotonic() - start
    return result


def _saved_before(outputs: list) -> str:
    n = sum(1 for o in outputs if o.path)
    return f" ({n} output{'s' if n != 1 else ''} saved before it, listed above)" if n else ""


def _run_coroutine(make):
    """``asyncio.run(make())``, or the same in a worker thread when this thread already runs a loop (a
    notebook). There, an interrupt of this thread (the kernel's stop button) cancels the worker's task
    and is raised at once, so the caller withdraws the prompt instead of waiting for it to finish."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    import threading
    box = {}

    async def main():
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        return await make()

    def work():
        try:
            box["result"] = asyncio.run(main())
        except BaseException as e:   # handed to the caller's thread
            box["error"] = e
    worker = threading.Thread(target=work, name="latentclip-api", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        if "task" in box:
            try:
                box["loop"].call_soon_threadsafe(box["task"].cancel)
            except RuntimeError:     # its loop already closed: the task had finished
                pass
        worker.join(5)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def raise_for_status(result: RunResult, graph: dict) -> None:
    """Raise the server's own error for a finished prompt that failed or was interrupted."""
    status = result.history.get("status") if isinstance(result.history.get("status"), dict) else {}
    messages = status.get("messages") if isinstance(status.get("messages"), list) else []
    for message in messages:
        if not (isinstance(message, (list, tuple)) and len(message) == 2 and isinstance(message[1], dict)):
            continue
        kind, data = message
        if kind == "execution_error":
            result.status = "error"
            raise ExecutionFailed(format_execution_error(data), details=data, result=result)
        if kind == "execution_interrupted":
            result.status = "interrupted"
            where = _node_label(graph, data["node_id"]) if data.get("node_id") else "the prompt"
            raise Interrupted(f"interrupted: {where} was stopped (POST /interrupt)", details=data, result=result)
    if result.status == "error":
        raise ExecutionFailed(f"prompt {result.prompt_id} ended with status 'error'", details=result.history,
                              result=result)


def _run_command(args) -> int:
    graph = load_workflow(args.workflow)
    warn = lambda text: print(text, file=sys.stderr)  # noqa: E731
    graph = apply_sets(graph, [parse_set(s) for s in args.set], warn)
    try:
        result = run_workflow(graph, args.server, args.out, ProgressPrinter(graph), args.timeout)
    except RunError as e:
        for out in (e.result.outputs if e.result else []):
            print(out.line())
        raise
    for out in result.outputs:
        print(out.line())
    print(f"done: prompt {result.prompt_id}, {len(result.outputs)} outputs in {result.seconds:.1f} s",
          file=sys.stderr)
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line (and exit 2), like every other failure."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        self.exit(EXIT_USAGE)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m latentclip.api",
                                     description="Run an API-format ComfyUI workflow on a ComfyUI server.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="submit a workflow, show progress, save its outputs")
    run.add_argument("workflow", help="workflow in API format (Workflow > Export (API) in ComfyUI)")
    run.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
    run.add_argument("--set", action="append", default=[], metavar="ID.INPUT=VALUE",
                     help="set an input before submitting; VALUE is JSON when it parses, else text (repeatable)")
    run.add_argument("--out", default=None, metavar="DIR", help="save outputs here (default: only print them)")
    run.add_argument("--timeout", type=_seconds, default=600.0, help="give up after this many seconds (default 600)")
    run.set_defaults(func=_run_command)
    return parser


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):   # a cp1252 console must not fail on a label after the files are saved
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:   # --help, or a bad command line already reported in one line
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        return args.func(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        pid = getattr(e, "prompt_id", None)
        print(f"stopped: prompt {pid} was withdrawn from the server (taken off the queue, or interrupted)" if pid
              else "stopped (Ctrl-C); no prompt was waiting to be withdrawn", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as e:   # a bug here: still one line, never a traceback in the user's script
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"error: the runner failed unexpectedly ({type(e).__name__}: {first}); please report it",
              file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
