"""Issue 21 item 7: every failure of the headless runner is one line on stderr and an exit code, and an
unusable --out is refused before anything is queued (the stand-in server records every request)."""
import json
import os
import subprocess
import sys

import pytest

from latentclip import api
from test_api_standin import GRAPH, StandIn, history


@pytest.fixture
def standin():
    server = StandIn()
    server.thread.start()
    server.script(history("success", [["execution_success", {"prompt_id": "p1"}]]))
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def workflow(tmp_path):
    path = tmp_path / "wf.api.json"
    path.write_text(json.dumps(GRAPH))
    return path


def _one_line_error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _posted(standin):
    return [path for method, path in standin.requests if method == "POST"]


@pytest.mark.parametrize("case", ["a-file", "under-a-file", "read-only"])
def test_an_unusable_out_folder_is_refused_before_queuing(standin, workflow, tmp_path, capsys, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = {"a-file": blocker, "under-a-file": blocker / "out"}.get(case)
    if case == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    code = api.main(["run", str(workflow), "--server", standin.url, "--out", str(out), "--timeout", "20"])
    line = _one_line_error(capsys)
    assert code == api.EXIT_USAGE and str(out) in line and "output folder" in line
    assert _posted(standin) == []          # nothing ran on the server
    assert blocker.read_text() == "a file, not a folder"


def test_run_workflow_checks_the_folder_before_submitting(standin, tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(api.WorkflowError, match="output folder"):
        api.run_workflow(GRAPH, standin.url, out_dir=tmp_path / "blocker" / "out", timeout=20)
    assert _posted(standin) == []


@pytest.mark.parametrize("content", [b"\xff\xfe{\x00}", '{"1": {"class_type": "Caf\u00e9"}}'.encode("latin-1")])
def test_a_file_that_is_not_utf8_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "latin1.json"
    path.write_bytes(content)
    assert api.main(["run", str(path)]) == api.EXIT_USAGE
    line = _one_line_error(capsys)
    assert "not UTF-8" in line and str(path) in line


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_one_line(tmp_path, capsys, depth):
    path = tmp_path / "deep.json"
    inner = "[" * depth + "]" * depth
    path.write_text('{"1": {"class_type": "X", "inputs": {"v": ' + inner + '}}}')
    assert api.main(["run", str(path)]) == api.EXIT_USAGE
    line = _one_line_error(capsys)
    assert "nest" in line and str(path) in line


def test_a_deeply_nested_set_value_is_one_line(workflow, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    assert api.main(["run", str(workflow), "--set", f"3.text={deep}"]) == api.EXIT_USAGE
    assert "nest" in _one_line_error(capsys)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "abc", ""])
def test_a_timeout_that_is_not_a_positive_number_is_one_line(standin, workflow, capsys, value):
    assert api.main(["run", str(workflow), "--server", standin.url, "--timeout", value]) == api.EXIT_USAGE
    assert "--timeout" in _one_line_error(capsys)
    assert _posted(standin) == []


def test_argument_errors_are_one_line(capsys):
    assert api.main(["run"]) == api.EXIT_USAGE
    _one_line_error(capsys)
    assert api.main(["walk", "x.json"]) == api.EXIT_USAGE
    _one_line_error(capsys)


def test_a_failure_while_saving_is_one_line(standin, workflow, tmp_path, capsys):
    """The folder was fine when checked but a download cannot be written (a name too long for the file system)."""
    standin.routes[("GET", "/history/p1")] = (200, json.dumps(history("success", [], outputs={
        "6": {"latents": [{"filename": "x" * 300 + ".latent", "subfolder": "", "type": "output"}]}})).encode())
    code = api.main(["run", str(workflow), "--server", standin.url, "--out", str(tmp_path / "out"), "--timeout", "20"])
    line = _one_line_error(capsys)
    assert code == api.EXIT_OUTPUT and "cannot save" in line


def test_the_command_line_prints_no_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff")
    proc = subprocess.run([sys.executable, "-m", "latentclip.api", "run", str(path), "--timeout", "nan"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == api.EXIT_USAGE and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- review of 2026-12-04: deadlines, Ctrl-C, files a user's tools write, names --------------------------
def test_a_server_that_accepts_and_never_answers_times_out_at_the_deadline():
    """The websocket handshake and every request are bounded by --timeout (before, only the TCP connect was)."""
    import socket
    import threading
    import time
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)          # the kernel accepts connections; nothing ever answers them
    url = f"http://127.0.0.1:{hung.getsockname()[1]}"
    outcome = {}

    def run():
        t0 = time.monotonic()
        try:
            api.run_workflow(GRAPH, url, timeout=2)
        except api.RunError as e:
            outcome["error"] = str(e)
        outcome["seconds"] = time.monotonic() - t0
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)
    hung.close()
    assert not worker.is_alive(), "the runner outlived --timeout 2 by 28 s against a hung server"
    assert "error" in outcome and outcome["seconds"] < 15


def test_a_quiet_websocket_returns_at_the_deadline_even_when_receive_ignores_its_timeout():
    """aiohttp restarts receive(timeout=) on every heartbeat PONG, so a quiet socket never timed out."""
    import time

    class Quiet:   # a socket whose receive() never returns, whatever timeout it is given
        async def receive(self, timeout=None):
            await asyncio.sleep(3600)

    import asyncio
    t0 = time.monotonic()
    done = asyncio.run(asyncio.wait_for(api._watch_ws(Quiet(), "p1", None, time.monotonic() + 0.5), 10))
    assert done is True and time.monotonic() - t0 < 5


def test_ctrl_c_while_waiting_withdraws_the_prompt_and_exits_130(standin, workflow, capsys, monkeypatch):
    standin.routes[("GET", "/history/p1")] = (200, b"{}")         # queued, never finished
    standin.routes[("POST", "/queue")] = (200, b"{}")
    standin.routes[("POST", "/interrupt")] = (200, b"{}")

    def ctrl_c(seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(api.time, "sleep", ctrl_c)                 # the user presses Ctrl-C during the first poll
    code = api.main(["run", str(workflow), "--server", standin.url, "--timeout", "20"])
    err = capsys.readouterr().err
    assert code == api.EXIT_STOPPED == 130
    assert "prompt p1 was withdrawn" in err and len(err.strip().splitlines()) == 1
    assert _posted(standin) == ["/prompt", "/queue", "/interrupt"]


def test_a_workflow_saved_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GRAPH).encode())     # Notepad / PowerShell's UTF-8
    assert api.load_workflow(path) == GRAPH


def test_a_failed_write_leaves_no_partial_file_and_names_keep_their_letters(tmp_path):
    target = tmp_path / "out.latent"
    with pytest.raises(TypeError):
        api.write_new_file(target, "not bytes")                    # fails after the file was created
    assert not target.exists()
    assert api.safe_name("日本/ü", "a b") == "日本_ü-a_b" and api.safe_name("../x") == "_x"


def test_a_node_exception_over_several_lines_is_reported_on_one():
    text = api.format_execution_error({"node_id": "6", "node_type": "SaveLatent", "exception_type": "ValueError",
                                       "exception_message": "Saving image outside the output folder\nis not allowed.\n"})
    assert "\n" not in text and text.endswith("Saving image outside the output folder is not allowed.")


def test_a_failure_part_way_lists_the_outputs_already_saved(standin, workflow, tmp_path, capsys):
    """Node 3's text is saved, then node 6's download cannot be written: node 3's file is listed, not forgotten."""
    standin.routes[("GET", "/history/p1")] = (200, json.dumps(history("success", [], outputs={
        "3": {"text": ["#0: 25.0 a cat"]},
        "6": {"latents": [{"filename": "x" * 300 + ".latent", "subfolder": "", "type": "output"}]}})).encode())
    code = api.main(["run", str(workflow), "--server", standin.url, "--out", str(tmp_path / "out"), "--timeout", "20"])
    captured = capsys.readouterr()
    assert code == api.EXIT_OUTPUT and "(1 output saved before it, listed above)" in captured.err
    listed = [line for line in captured.out.splitlines() if line.startswith("node 3 ")]
    assert len(listed) == 1 and str(tmp_path / "out") in listed[0]
    assert [p.suffix for p in (tmp_path / "out").iterdir()] == [".txt"]


def test_an_interrupt_in_a_notebook_stops_the_watch_and_withdraws_the_prompt(standin, monkeypatch):
    """In a notebook the runner watches from a worker thread (the kernel's loop is running); the stop button
    interrupts the main thread. Before, the interrupt waited for the worker to finish watching the prompt."""
    import _thread
    import asyncio
    import threading
    standin.routes[("POST", "/queue")] = (200, b"{}")
    standin.routes[("POST", "/interrupt")] = (200, b"{}")
    started, cancelled = threading.Event(), threading.Event()

    async def watch(client, graph, on_event, deadline, submitted):   # a prompt that runs for 20 s
        submitted["id"] = client.submit(graph, timeout=5)
        started.set()
        try:
            await asyncio.sleep(20)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return submitted["id"]
    monkeypatch.setattr(api, "_submit_and_watch", watch)
    threading.Thread(target=lambda: started.wait(10) and _thread.interrupt_main(), daemon=True).start()

    async def notebook_cell():
        api.run_workflow(GRAPH, standin.url, timeout=60)
    loop = asyncio.new_event_loop()   # a kernel's loop: SIGINT keeps Python's handler (asyncio.run would cancel instead)
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            loop.run_until_complete(notebook_cell())
    finally:
        loop.close()
    assert cancelled.is_set(), "the watch ran on after the interrupt"
    assert stopped.value.prompt_id == "p1"
    assert _posted(standin) == ["/prompt", "/queue", "/interrupt"]
