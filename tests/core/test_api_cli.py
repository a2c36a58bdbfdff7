"""The headless runner's pure parts: arguments, --set, workflow formats, messages, output files.
No ComfyUI and no server here; tests/comfy/test_server.py runs it against a real one."""
import io
import json
import socket

import pytest

from latentclip import api

GRAPH = {
    "1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": "a.safetensors", "device": "cpu", "dtype": "fp32"}},
    "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a cat"}},
    "12:4": {"class_type": "LatentCLIPSelectBest", "inputs": {"k": 1, "text": "x"}},
}
UI = {"last_node_id": 2, "nodes": [{"id": 1, "type": "LatentCLIPLoader", "inputs": []}], "links": [], "version": 0.4}


@pytest.mark.parametrize("expr, want", [
    ("3.text=a cat", ("3", "text", "a cat")),
    ('3.text="a cat"', ("3", "text", "a cat")),
    ("3.k=4", ("3", "k", 4)),
    ("3.threshold=0.25", ("3", "threshold", 0.25)),
    ("3.samples=[\"2\", 0]", ("3", "samples", ["2", 0])),
    ("3.flag=true", ("3", "flag", True)),
    ("3.text=", ("3", "text", "")),
    ("3.text=a=b", ("3", "text", "a=b")),
    ("12:4.k=2", ("12:4", "k", 2)),
])
def test_parse_set(expr, want):
    assert api.parse_set(expr) == want


@pytest.mark.parametrize("expr", ["3text=a", "3.=x", ".text=x", "3.text", "=1"])
def test_parse_set_rejects_malformed(expr):
    with pytest.raises(api.WorkflowError, match="ID.INPUT=VALUE"):
        api.parse_set(expr)


def test_apply_sets_copies_and_checks_node_ids():
    notes = []
    out = api.apply_sets(GRAPH, [("3", "text", "a dog"), ("12:4", "k", 3), ("3", "extra", 1)], notes.append)
    assert out["3"]["inputs"]["text"] == "a dog" and out["12:4"]["inputs"]["k"] == 3
    assert GRAPH["3"]["inputs"]["text"] == "a cat" and "extra" not in GRAPH["3"]["inputs"]  # input untouched
    assert len(notes) == 1 and "'extra'" in notes[0] and "LatentCLIPScore" in notes[0]
    assert api.apply_sets(GRAPH, [api.parse_set("3.text=42")])["3"]["inputs"]["text"] == "42"  # text stays text
    with pytest.raises(api.WorkflowError, match=r"no node '7' \(its nodes: 1, 3, 12:4\)"):
        api.apply_sets(GRAPH, [("7", "text", "x")])


def test_ui_format_is_refused_with_one_sentence(tmp_path):
    assert api.is_ui_format(UI) and not api.is_ui_format(GRAPH)
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(UI))
    with pytest.raises(api.WorkflowError) as e:
        api.load_workflow(path)
    message = str(e.value)
    assert "UI (save) workflow" in message and "Export (API)" in message and "\n" not in message


def test_api_graph_checks(tmp_path):
    assert api.check_api_graph({"prompt": GRAPH}) is GRAPH  # a saved POST body works too
    for bad in ({}, [], {"1": {"inputs": {}}}, {"1": "LoadLatent"}):
        with pytest.raises(api.WorkflowError, match="API format|JSON object"):
            api.check_api_graph(bad)
    broken = tmp_path / "broken.api.json"
    broken.write_text('{"1": {"class_type": "X",\n "inputs": }')
    with pytest.raises(api.WorkflowError, match="not valid JSON .* line 2"):
        api.load_workflow(broken)
    with pytest.raises(api.WorkflowError, match="cannot read"):
        api.load_workflow(tmp_path / "missing.json")


def test_parser_defaults_and_repeats():
    args = api.build_parser().parse_args(["run", "wf.api.json", "--set", "3.text=a", "--set", "1.dtype=fp16"])
    assert args.server == "http://127.0.0.1:8188" and args.timeout == 600 and args.out is None
    assert args.set == ["3.text=a", "1.dtype=fp16"]
    with pytest.raises(SystemExit):
        api.build_parser().parse_args(["run"])


def _unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_main_exit_codes(tmp_path, capsys):
    ui_file = tmp_path / "ui.json"
    ui_file.write_text(json.dumps(UI))
    assert api.main(["run", str(ui_file)]) == api.EXIT_USAGE
    assert "Export (API)" in capsys.readouterr().err
    wf = tmp_path / "wf.api.json"
    wf.write_text(json.dumps(GRAPH))
    assert api.main(["run", str(wf), "--set", "9.text=x"]) == api.EXIT_USAGE
    assert "no node '9'" in capsys.readouterr().err
    assert api.main(["run", str(wf), "--timeout", "0"]) == api.EXIT_USAGE
    url = f"http://127.0.0.1:{_unused_port()}"  # nothing listens there: refused at once
    assert api.main(["run", str(wf), "--server", url, "--timeout", "5"]) == api.EXIT_SERVER
    assert "cannot reach the ComfyUI server" in capsys.readouterr().err


def test_validation_and_execution_messages():
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}},
            "node_errors": {"3": {"errors": [{"type": "required_input_missing", "message": "Required input is missing",
                                              "details": "text", "extra_info": {}}],
                                  "dependent_outputs": ["4"], "class_type": "LatentCLIPScore"}}}
    text = api.format_validation_error(body, GRAPH)
    assert text.splitlines() == ["prompt refused: Prompt outputs failed validation",
                                 "  node 3 (LatentCLIPScore): Required input is missing (text)"]
    err = {"prompt_id": "p", "node_id": "3", "node_type": "LatentCLIPScore", "exception_type": "InputError",
           "exception_message": "samples has 16 channels; expected 4\n", "traceback": []}
    assert api.format_execution_error(err) == ("execution failed at node 3 (LatentCLIPScore): "
                                               "InputError: samples has 16 channels; expected 4")


def test_progress_printer_names_nodes_and_throttles_steps():
    stream = io.StringIO()
    printer = api.ProgressPrinter(GRAPH, stream)
    printer("execution_cached", {"nodes": ["1"], "prompt_id": "p"})
    printer("executing", {"node": "3", "prompt_id": "p"})
    for v in range(1, 101):
        printer("progress", {"value": v, "max": 100, "node": "3", "prompt_id": "p"})
    printer("executing", {"node": None, "prompt_id": "p"})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "cached: 1" and lines[1] == "[1/3] node 3 (LatentCLIPScore)"
    steps = [line.strip() for line in lines[2:]]
    assert steps[-1] == "step 100/100" and 10 <= len(steps) <= 11 and all(s.startswith("step ") for s in steps)


class _FakeViews:
    """Stands in for the server's /view: returns bytes named after the file."""

    def __init__(self):
        self.asked = []

    def view(self, item):
        self.asked.append(item)
        return f"bytes of {item['filename']}".encode()


def test_save_outputs_writes_files_text_and_ui(tmp_path):
    outputs = {
        "3": {"text": ["#0: 1.0 (cos 0.1) a cat\n#1: 2.0 (cos 0.2) a cat"]},
        "6": {"latents": [{"filename": "best_00001_.latent", "subfolder": "runner", "type": "output"}]},
        "8": {"images": [{"filename": "../../evil.png", "subfolder": "..", "type": "temp"}], "animated": [False]},
    }
    client = _FakeViews()
    saved = api.save_outputs(client, GRAPH, outputs, tmp_path / "out")
    by_kind = {(s.node_id, s.kind): s for s in saved}
    assert set(by_kind) == {("3", "text"), ("6", "latents"), ("8", "images"), ("8", "ui")}
    assert (tmp_path / "out" / "3-LatentCLIPScore.txt").read_text().count("\n") == 1
    assert by_kind[("6", "latents")].path.read_bytes() == b"bytes of best_00001_.latent"
    evil = by_kind[("8", "images")].path
    assert evil.parent == tmp_path / "out" and "/" not in evil.name and not evil.name.startswith(".")
    assert json.loads(by_kind[("8", "ui")].path.read_text()) == {"animated": [False]}
    assert by_kind[("3", "text")].line().startswith("node 3 (LatentCLIPScore) text: '#0: 1.0 (cos 0.1) a cat' (+1 lines) -> ")
    again = api.save_outputs(client, GRAPH, {"6": outputs["6"]}, tmp_path / "out")
    assert again[0].path != by_kind[("6", "latents")].path  # never overwrites a downloaded file
    listed = api.save_outputs(None, GRAPH, outputs, None)  # no DIR: summaries only
    assert all(s.path is None for s in listed) and len(listed) == 4


def _finished(status, *messages):
    entry = {"outputs": {}, "status": {"status_str": status, "completed": status == "success",
                                       "messages": [["execution_start", {"prompt_id": "p"}], *messages]}}
    return api.RunResult("p", status, history=entry)


def test_history_status_maps_to_errors():
    api.raise_for_status(_finished("success", ["execution_success", {"prompt_id": "p"}]), GRAPH)
    failed = _finished("error", ["execution_error", {"node_id": "3", "node_type": "LatentCLIPScore",
                                                     "exception_type": "InputError", "exception_message": "text is empty"}])
    with pytest.raises(api.ExecutionFailed, match="node 3 .*text is empty") as e:
        api.raise_for_status(failed, GRAPH)
    assert e.value.exit_code == api.EXIT_EXECUTION and e.value.result.status == "error"
    stopped = _finished("error", ["execution_interrupted", {"node_id": "12:4", "node_type": "LatentCLIPSelectBest"}])
    with pytest.raises(api.Interrupted, match=r"node 12:4 \(LatentCLIPSelectBest\) was stopped") as e:
        api.raise_for_status(stopped, GRAPH)
    assert e.value.exit_code == api.EXIT_INTERRUPTED and e.value.result.status == "interrupted"
    with pytest.raises(api.ExecutionFailed, match="status 'error'"):
        api.raise_for_status(_finished("error"), GRAPH)
