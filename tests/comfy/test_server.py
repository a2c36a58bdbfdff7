"""The pack inside a real ComfyUI server process (HTTP API on 127.0.0.1), and the headless runner
``python -m latentclip.api`` against it. One server for the whole module (about 12 s to start)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import latentclip
from latentclip import api


import comfy_server as _srv
from comfy_server import comfy_server, server_log_on_failure  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("server_log_on_failure")

REPO = Path(__file__).resolve().parents[2]
NODE_IDS = ["LatentCLIPLoader", "LatentCLIPScore", "LatentCLIPZeroShot", "LatentCLIPSelectBest", "LatentCLIPSafetyFilter",
            "LatentCLIPReward", "PixelCLIPReward", "LatentCLIPReNO", "LatentCLIPReNOSampler",
            "LatentCLIPSafetyGuidance", "LatentCLIPGuidanceReport"]
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SCORE_LINE = re.compile(r"#(\d+): (-?\d+\.\d+) \(cos")


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def _write_latent(srv, name, x):
    import safetensors.torch
    safetensors.torch.save_file({"latent_tensor": x.contiguous(), "latent_format_version_0": torch.tensor([])},
                                str(srv.input_dir / name))
    return name


def _score_graph(latent_name, text="a photo of a cat"):
    return {
        "1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": _srv.TINY_CKPT, "device": "cpu", "dtype": "fp32"}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": latent_name}},
        "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": text}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }


def _expected_scores(srv, x, text):
    model = latentclip.load(srv.models / "latent_clip" / _srv.TINY_CKPT, device="cpu", dtype=torch.float32)
    return latentclip.clip_score(model, x, text).tolist()


def _reported_scores(report: str):
    return [float(s) for _, s in SCORE_LINE.findall(report)]


def test_object_info_lists_every_node(object_info):
    for node_id in NODE_IDS:
        assert node_id in object_info, f"{node_id} missing from /object_info"
        assert object_info[node_id]["python_module"].startswith("custom_nodes.")
    ckpt_spec = object_info["LatentCLIPLoader"]["input"]["required"]["ckpt_name"]
    options = ckpt_spec[0] if isinstance(ckpt_spec[0], list) else ckpt_spec[1]["options"]
    assert _srv.TINY_CKPT in options
    assert object_info["LatentCLIPScore"]["output_name"] == ["scores", "report"]


def test_score_graph_through_prompt_and_history(comfy_server):
    x = torch.randn(3, 4, 64, 64)
    graph = _score_graph(_write_latent(comfy_server, "score3.latent", x), "a photo of a dog")
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"]["3"]["text"][0]
    assert entry["outputs"]["4"]["text"][0] == report       # the STRING output reached PreviewAny
    assert _reported_scores(report) == pytest.approx(_expected_scores(comfy_server, x, "a photo of a dog"), abs=2e-3)


@pytest.mark.parametrize("samples, text, words", [
    (torch.randn(1, 16, 64, 64), "a cat", "16 channels"),
    (torch.randn(1, 4, 64, 64), "   ", "text is empty"),
], ids=["16-channel-latent", "empty-text"])
def test_bad_graph_is_an_execution_error_and_the_server_keeps_serving(comfy_server, samples, text, words):
    name = _write_latent(comfy_server, f"bad-{samples.shape[1]}.latent", samples)
    entry = comfy_server.run(_score_graph(name, text))
    messages = _srv.status_messages(entry)
    assert entry["status"]["status_str"] == "error" and "execution_error" in messages
    error = messages["execution_error"]
    assert error["node_id"] == "3" and error["node_type"] == "LatentCLIPScore"
    assert words in error["exception_message"]
    x = torch.randn(2, 4, 64, 64)
    good = comfy_server.run(_score_graph(_write_latent(comfy_server, "after-bad.latent", x), "a red car"))
    assert good["status"]["status_str"] == "success"
    assert _reported_scores(good["outputs"]["3"]["text"][0]) == pytest.approx(
        _expected_scores(comfy_server, x, "a red car"), abs=2e-3)


def test_invalid_prompt_is_refused_with_node_errors(comfy_server):
    graph = _score_graph("missing-file.latent")
    del graph["3"]["inputs"]["text"]
    status, body = comfy_server.submit(graph)
    assert status == 400 and "3" in body["node_errors"]
    message = api.format_validation_error(body, graph)
    assert "node 3 (LatentCLIPScore)" in message and "text" in message


# -- the runner --------------------------------------------------------------------------------
def _runner_graph(srv, x):
    """Scores, best-of-N to a SaveLatent and an image through SaveImage: every kind of output."""
    from PIL import Image
    Image.new("RGB", (16, 12), (200, 30, 30)).save(srv.input_dir / "red.png")
    graph = _score_graph(_write_latent(srv, "runner.latent", x))
    graph.update({
        "5": {"class_type": "LatentCLIPSelectBest", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a cat", "k": 2}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "runner/best"}},
        "7": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "runner/red"}},
    })
    return graph


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "latentclip.api", "run", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_runner_cli_saves_every_output(comfy_server, tmp_path):
    x = torch.randn(3, 4, 64, 64)
    wf = tmp_path / "graph.api.json"
    wf.write_text(json.dumps(_runner_graph(comfy_server, x)))
    out = tmp_path / "out"
    res = _cli(wf, "--server", comfy_server.url, "--out", out, "--set", "3.text=a photo of a horse", "--timeout", "90")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 5, res.stdout   # text of 3, 4, 5; the latent of 6; the image of 8
    assert {line.split()[1] for line in lines} == {"3", "4", "5", "6", "8"}
    assert "(LatentCLIPScore)" in res.stderr and "(SaveImage)" in res.stderr  # per-node progress
    report = (out / "3-LatentCLIPScore.txt").read_text()
    assert _reported_scores(report) == pytest.approx(_expected_scores(comfy_server, x, "a photo of a horse"), abs=2e-3)
    import safetensors.torch
    from PIL import Image
    (latent_file,) = out.glob("*.latent")
    best = safetensors.torch.load_file(str(latent_file))["latent_tensor"]
    ranked = latentclip.rank(latentclip.load(comfy_server.models / "latent_clip" / _srv.TINY_CKPT), x, "a cat", k=2)[0]
    assert torch.allclose(best, x[ranked], atol=1e-6)
    (png,) = out.glob("*.png")
    with Image.open(png) as im:
        assert im.size == (16, 12) and im.convert("RGB").getpixel((0, 0)) == (200, 30, 30)


def test_runner_cli_fails_with_the_server_message(comfy_server, tmp_path):
    wf = tmp_path / "bad.api.json"
    wf.write_text(json.dumps(_score_graph(_write_latent(comfy_server, "bad16.latent", torch.randn(1, 16, 64, 64)))))
    res = _cli(wf, "--server", comfy_server.url, "--timeout", "90")
    assert res.returncode == api.EXIT_EXECUTION, res.stderr
    assert "node 3 (LatentCLIPScore)" in res.stderr and "16 channels" in res.stderr


def test_runner_refuses_a_graph_the_server_would_run_only_in_part(comfy_server, tmp_path):
    """ComfyUI answers 200 and runs the valid outputs when another output's node fails validation: the
    runner says so (exit 3) and withdraws the prompt, instead of reporting a success without those outputs."""
    graph = _runner_graph(comfy_server, torch.randn(1, 4, 64, 64))
    graph["1"]["inputs"]["ckpt_name"] = "no-such-file.safetensors"        # breaks 3, 4, 5 and 6; 8 stays valid
    wf = tmp_path / "partial.api.json"
    wf.write_text(json.dumps(graph))
    res = _cli(wf, "--server", comfy_server.url, "--out", tmp_path / "out", "--timeout", "60")
    assert res.returncode == api.EXIT_INVALID, res.stderr
    assert "failed validation, so the outputs that depend on it would not run" in res.stderr
    assert "node 1 (LatentCLIPLoader)" in res.stderr and not (tmp_path / "out").exists()
    queue = api.Client(comfy_server.url).get_json("/queue")
    assert not queue["queue_pending"]


def test_runner_python_api(comfy_server, tmp_path):
    x = torch.randn(2, 4, 64, 64)
    graph = _score_graph(_write_latent(comfy_server, "py.latent", x), "a small boat")
    events = []
    result = api.run_workflow(graph, comfy_server.url, tmp_path, on_event=lambda e, d: events.append((e, d)), timeout=90)
    assert result.status == "success" and {o.node_id for o in result.outputs} == {"3", "4"}
    assert ("executing", "3") in [(e, d.get("node")) for e, d in events]
    assert events[-1][0] in ("execution_success", "executing")
    assert _reported_scores((tmp_path / "3-LatentCLIPScore.txt").read_text()) == pytest.approx(
        _expected_scores(comfy_server, x, "a small boat"), abs=2e-3)
    del graph["3"]["inputs"]["text"]
    with pytest.raises(api.PromptRejected, match=r"node 3 \(LatentCLIPScore\)"):
        api.run_workflow(graph, comfy_server.url, timeout=30)
    assert api.main(["run", str(REPO / "missing.api.json"), "--server", comfy_server.url]) == api.EXIT_USAGE


# -- the shipped workflows -------------------------------------------------------------------------
def _is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _types_match(out_type, in_type) -> bool:
    if isinstance(in_type, list) or in_type == "COMBO":
        return out_type in ("COMBO", "*") or isinstance(out_type, list)
    a, b = set(str(out_type).split(",")), set(str(in_type).split(","))
    return "*" in a or "*" in b or bool(a & b)


def api_workflow_problems(graph: dict, info: dict) -> list:
    problems = []
    for node_id, node in graph.items():
        cls = node.get("class_type")
        if cls not in info:
            problems.append(f"node {node_id}: unknown class_type {cls!r}")
            continue
        required = info[cls]["input"].get("required", {})
        for name, spec in required.items():
            value = node.get("inputs", {}).get(name)
            if value is None:
                problems.append(f"node {node_id} ({cls}): required input {name!r} missing")
            elif isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                src = graph.get(str(value[0]))
                if src is None or src.get("class_type") not in info:
                    problems.append(f"node {node_id} ({cls}).{name}: links to missing node {value[0]!r}")
                    continue
                outputs = info[src["class_type"]]["output"]
                if value[1] >= len(outputs):
                    problems.append(f"node {node_id} ({cls}).{name}: output {value[1]} of {src['class_type']} does not exist")
                elif not _types_match(outputs[value[1]], spec[0]):
                    problems.append(f"node {node_id} ({cls}).{name}: {outputs[value[1]]} into {spec[0]}")
    return problems


def ui_workflow_problems(data: dict, info: dict) -> list:
    problems = []
    subgraphs = {s.get("id") for s in (data.get("definitions") or {}).get("subgraphs", [])}
    links = {link[0]: link for link in data.get("links", []) if isinstance(link, list)}
    for node in data["nodes"]:
        kind = node.get("type")
        if kind in FRONTEND_ONLY or kind in subgraphs:
            continue
        if kind not in info:
            problems.append(f"node {node.get('id')}: unknown type {kind!r}")
            continue
        if node.get("mode", 0) in (2, 4):   # muted or bypassed: not executed
            continue
        slots = {i.get("name"): i for i in node.get("inputs", [])}
        for name, spec in info[kind]["input"].get("required", {}).items():
            if _is_widget(spec):
                continue
            link = (slots.get(name) or {}).get("link")
            if link is None or link not in links or links[link][3] != node.get("id"):
                problems.append(f"node {node.get('id')} ({kind}): required input {name!r} is not wired")
    return problems


EXAMPLES = REPO / "example_workflows"   # UI cards for the Templates browser
API_GRAPHS = REPO / "workflows" / "api"   # the same graphs in API format (runner, tests, users)


def test_shipped_workflows_use_known_nodes_and_wire_required_inputs(object_info):
    api_files = sorted(API_GRAPHS.glob("*.json"))
    ui_files = sorted(EXAMPLES.glob("*.json"))
    assert len(api_files) == len(ui_files) >= 7
    assert sorted(json.loads(p.read_text())["extra"]["latentclip"]["api"] for p in ui_files) == \
        sorted(f"workflows/api/{p.name}" for p in api_files)
    problems = []
    for path in api_files:
        graph = api.check_api_graph(json.loads(path.read_text()), path.name)
        problems += [f"{path.name}: {p}" for p in api_workflow_problems(graph, object_info)]
    for path in ui_files:
        data = json.loads(path.read_text())
        assert api.is_ui_format(data), f"{path.name} is not in UI format; API-format files go in workflows/api/"
        problems += [f"{path.name}: {p}" for p in ui_workflow_problems(data, object_info)]
    assert not problems, "\n".join(problems)


def test_workflow_checks_catch_mistakes(object_info):
    """The validators above are not vacuous: a broken graph is reported."""
    graph = _score_graph("x.latent")
    assert api_workflow_problems(graph, object_info) == []
    graph["3"]["inputs"]["samples"] = ["1", 0]          # LATENT_CLIP into LATENT
    del graph["3"]["inputs"]["text"]
    graph["9"] = {"class_type": "NoSuchNode", "inputs": {}}
    assert len(api_workflow_problems(graph, object_info)) == 3
    ui = {"nodes": [{"id": 1, "type": "LatentCLIPScore", "inputs": [{"name": "latent_clip", "link": None}]},
                    {"id": 2, "type": "Note"}], "links": []}
    assert len(ui_workflow_problems(ui, object_info)) == 2   # latent_clip and samples unwired


def test_shipped_workflows_are_what_the_generator_writes(object_info, tmp_path):
    """example_workflows/ and workflows/api/ are tools/make_workflows.py's output for the current definitions (none
    stale, none missing)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("latentclip_make_workflows", REPO / "tools" / "make_workflows.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    expected_ui, expected_api = set(), set()
    for slug, (build, note) in make.WORKFLOWS.items():
        graph = build()
        title = make.title_of(slug)
        expected_ui.add(f"{title}.json")
        expected_api.add(f"{slug}.json")
        assert json.loads((API_GRAPHS / f"{slug}.json").read_text()) == graph, slug
        ui = make.to_ui(graph, object_info, note, api_path=f"workflows/api/{slug}.json")
        assert json.loads((EXAMPLES / f"{title}.json").read_text()) == json.loads(json.dumps(ui)), title
        assert (EXAMPLES / f"{title}.jpg").is_file()
    assert {p.name for p in EXAMPLES.glob("*.json")} == expected_ui
    assert {p.name for p in API_GRAPHS.glob("*.json")} == expected_api
