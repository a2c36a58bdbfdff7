"""The headless runner against a stand-in server on 127.0.0.1 (no ComfyUI): failure order, files
never overwritten, replies that are not JSON, and calls from code that already runs an event loop.

The stand-in answers /prompt, /history/{id} and /view the way ComfyUI does (no websocket, so the
runner polls /history), from a scripted table, and records every request it receives.
"""
import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from latentclip import api

GRAPH = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "a.latent"}},
         "3": {"class_type": "LatentCLIPScore", "inputs": {"samples": ["1", 0], "text": "a cat"}},
         "6": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0]}}}
OUTPUTS = {"3": {"text": ["#0: 25.0 (cos 0.25) a cat"]},
           "6": {"latents": [{"filename": "best_00001_.latent", "subfolder": "", "type": "output"}], "flag": [True]}}


def history(status, messages, outputs=OUTPUTS):
    return {"p1": {"prompt": [], "outputs": outputs,
                   "status": {"status_str": status, "completed": status == "success",
                              "messages": [["execution_start", {"prompt_id": "p1"}], *messages]}}}


class StandIn:
    """A scripted HTTP server: ``routes[(method, path prefix)] = (status, body bytes)``."""

    def __init__(self):
        self.requests, self.routes = [], {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method):
                owner.requests.append((method, self.path))
                if method == "POST":
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                for (m, prefix), (status, body) in owner.routes.items():
                    if m == method and self.path.startswith(prefix):
                        break
                else:
                    status, body = 404, b"not found"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def script(self, history_entry, prompt=(200, {"prompt_id": "p1", "number": 1})):
        body = prompt[1] if isinstance(prompt[1], bytes) else json.dumps(prompt[1]).encode()
        self.routes[("POST", "/prompt")] = (prompt[0], body)
        self.routes[("GET", "/history/p1")] = (200, history_entry if isinstance(history_entry, bytes)
                                               else json.dumps(history_entry).encode())
        self.routes[("GET", "/view")] = (200, b"latent bytes")

    def views(self):
        return [path for method, path in self.requests if path.startswith("/view")]


@pytest.fixture
def standin():
    server = StandIn()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_a_failed_execution_is_reported_before_any_output_is_fetched(standin, tmp_path):
    error = {"prompt_id": "p1", "node_id": "3", "node_type": "LatentCLIPScore", "exception_type": "InputError",
             "exception_message": "samples has 16 channels; expected 4"}
    standin.script(history("error", [["execution_error", error]]))
    standin.routes[("GET", "/view")] = (500, b"the server broke while serving the file")
    with pytest.raises(api.ExecutionFailed, match="node 3 .*16 channels") as info:
        api.run_workflow(GRAPH, standin.url, out_dir=tmp_path / "out", timeout=20)
    assert standin.views() == [] and not (tmp_path / "out").exists()
    listed = info.value.result.outputs   # what the server had, listed without downloading
    assert {(o.node_id, o.kind) for o in listed} == {("3", "text"), ("6", "latents"), ("6", "ui")}
    assert all(o.path is None for o in listed)
    wf = tmp_path / "wf.api.json"
    wf.write_text(json.dumps(GRAPH))
    assert api.main(["run", str(wf), "--server", standin.url, "--out", str(tmp_path / "cli"), "--timeout", "20"]) \
        == api.EXIT_EXECUTION
    assert standin.views() == []


def test_a_successful_run_downloads_and_never_overwrites_earlier_files(standin, tmp_path):
    standin.script(history("success", [["execution_success", {"prompt_id": "p1"}]]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "3-LatentCLIPScore.txt").write_text("the user's notes")
    (out / "6-SaveLatent.json").write_text("{}")
    first = api.run_workflow(GRAPH, standin.url, out_dir=out, timeout=20)
    second = api.run_workflow(GRAPH, standin.url, out_dir=out, timeout=20)
    assert (out / "3-LatentCLIPScore.txt").read_text() == "the user's notes"
    assert (out / "6-SaveLatent.json").read_text() == "{}"
    paths = [o.path for run in (first, second) for o in run.outputs]
    assert len(paths) == 6 and len(set(paths)) == 6 and all(p.parent == out for p in paths)
    assert sorted(p.name for p in out.iterdir()) == [
        "3-LatentCLIPScore.txt", "3-LatentCLIPScore_1.txt", "3-LatentCLIPScore_2.txt",
        "6-SaveLatent.json", "6-SaveLatent_1.json", "6-SaveLatent_2.json",
        "best_00001_.latent", "best_00001__1.latent"]
    assert (out / "3-LatentCLIPScore_2.txt").read_text() == "#0: 25.0 (cos 0.25) a cat"
    assert len(standin.views()) == 2


@pytest.mark.parametrize("where", ["prompt", "prompt-400", "history", "history-list", "history-entry"])
def test_a_reply_that_is_not_json_is_a_clear_error(standin, tmp_path, where):
    html = b"<html><body>502 Bad Gateway</body></html>"
    good = history("success", [])
    if where == "prompt":
        standin.script(good, prompt=(200, html))
    elif where == "prompt-400":
        standin.script(good, prompt=(400, html))
    elif where == "history":
        standin.script(html)
    elif where == "history-list":
        standin.script(b"[1, 2]")
    else:
        standin.script({"p1": "done"})
    with pytest.raises(api.RunError) as info:
        api.run_workflow(GRAPH, standin.url, timeout=20)
    message = str(info.value)
    assert "not a JSON object" in message and standin.url in message, message
    assert info.value.exit_code == api.EXIT_SERVER


def test_it_can_be_called_from_code_that_runs_an_event_loop(standin):
    standin.script(history("success", [["execution_success", {"prompt_id": "p1"}]]))

    async def inside_a_loop():
        ticks = []

        async def ticker():   # the caller's loop keeps running while the runner works in a thread
            while True:
                ticks.append(1)
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        result = await asyncio.to_thread(api.run_workflow, GRAPH, standin.url, None, None, 20)
        blocking = api.run_workflow(GRAPH, standin.url, timeout=20)   # plain call from inside the loop
        task.cancel()
        return result, blocking, len(ticks)

    result, blocking, ticks = asyncio.run(inside_a_loop())
    assert result.status == blocking.status == "success" and ticks >= 1
    assert [o.kind for o in blocking.outputs] == ["text", "latents", "ui"]
