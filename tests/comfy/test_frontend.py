"""The UI-format workflows load in ComfyUI's real front end (headless Chromium), as a user's drag-in does.

Skipped unless ComfyUI, Playwright and a Chromium binary are available.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

import comfy_server as _srv  # noqa: F401
from comfy_server import comfy_server, server_log_on_failure  # noqa: F401  (fixtures)

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
              pytest.mark.usefixtures("server_log_on_failure")]
WORKFLOWS = sorted(p for p in (Path(__file__).resolve().parents[2] / "workflows").glob("*.json")
                   if not p.name.endswith(".api.json"))


@pytest.fixture(scope="module")
def page(comfy_server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(comfy_server.url, timeout=120_000)
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        yield page
        browser.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_loads_with_the_api_graphs_values(page, path):
    ui = json.loads(path.read_text())
    api = json.loads(path.with_suffix(".api.json").read_text())
    nodes = page.evaluate("""async (wf) => {
        await window.app.loadGraphData(wf);
        return window.app.graph._nodes.map(n => ({id: String(n.id), type: n.type, errors: !!n.has_errors,
            widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}));
    }""", ui)
    assert len(nodes) == len(ui["nodes"])
    assert not [n for n in nodes if n["errors"]]
    for n in nodes:
        if n["type"] == "Note":
            continue
        spec = api[n["id"]]
        assert n["type"] == spec["class_type"]
        for name, value in spec["inputs"].items():
            if not isinstance(value, list):  # a widget: the front end shows the API graph's value
                assert n["widgets"][name] == value, (n["id"], name)
