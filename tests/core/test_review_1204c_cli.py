"""Review 1204c of the command line: a mistyped --server and a demo --out that is a file are one sentence naming
the flag, before anything is queued or written (stand-in server as in test_api_standin)."""
import json

import pytest

from latentclip import __main__ as cli
from latentclip import api
from test_api_standin import GRAPH


@pytest.mark.parametrize("server", ["http://127.0.0.1:notaport", "127.0.0.1:8188x", "http://[::1",
                                    "http://127.0.0.1:99999", "ftp://127.0.0.1:8188", "http://", "http://my host:8188"])
def test_a_mistyped_server_is_a_usage_error_naming_it(tmp_path, capsys, server):
    wf = tmp_path / "wf.api.json"
    wf.write_text(json.dumps(GRAPH))
    assert api.main(["run", str(wf), "--server", server, "--timeout", "5"]) == api.EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --server {server!r}") and "e.g. http://" in lines[0], lines
    with pytest.raises(api.WorkflowError, match="--server"):
        api.run_workflow(GRAPH, server, timeout=5)


@pytest.mark.parametrize("server, base", [("127.0.0.1:8188", "http://127.0.0.1:8188"),
                                          ("https://example.org/comfy/", "https://example.org/comfy"),
                                          ("http://[::1]:8188", "http://[::1]:8188")])
def test_good_server_spellings_still_work(server, base):
    assert api.Client(server).base == base


def test_demo_out_that_is_a_file_is_refused_even_with_force(tmp_path, capsys):
    mine = tmp_path / "notes.md"
    mine.write_text("my notes")
    assert cli.main(["demo", "--out", str(mine), "--force"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == f"error: --out '{mine}' is a file, not a folder; give a new or empty folder"
    assert mine.read_text() == "my notes"


@pytest.mark.parametrize("typed", ["2024.10", "0.50", "1e2", "-0", "1.0", "true", "null", "42"])
def test_a_text_input_set_to_a_number_keeps_what_was_typed(typed):
    graph = api.apply_sets(GRAPH, [api.parse_set(f"3.text={typed}")])
    assert graph["3"]["inputs"]["text"] == typed          # was json's spelling: 2024.10 -> "2024.1", 1e2 -> "100.0"
    assert api.parse_set(f"3.k={typed}")[2] == json.loads(typed)   # other inputs still get the JSON value


def test_ctrl_c_in_a_verb_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("latentclip.miniworld.demo.run_demo", stopped)
    try:
        code = cli.main(["demo", "--out", str(tmp_path / "demo")])
    except KeyboardInterrupt:
        code = "a KeyboardInterrupt traceback"
    assert code == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["stopped (Ctrl-C)"]
