"""The UI-format workflows load in ComfyUI's real front end (headless Chromium), as a user's drag-in does.

Skipped unless ComfyUI, Playwright and a Chromium binary are available.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

import comfy_server as _srv
from comfy_server import comfy_server, server_log_on_failure  # noqa: F401  (fixtures)

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
              pytest.mark.usefixtures("server_log_on_failure")]
WORKFLOWS = sorted(p for p in (Path(__file__).resolve().parents[2] / "workflows").glob("*.json")
                   if not p.name.endswith(".api.json"))


def close_dialogs(page):
    """Close whatever dialog the front end opened on its own (first-run templates, missing models)."""
    for _ in range(5):
        if not page.locator(".p-dialog-mask").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    assert not page.locator(".p-dialog-mask").count(), "a dialog stays open"


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


def test_node_help_opens_the_packs_page_in_the_front_end(page, comfy_server):
    """Select a node, click the selection toolbox's info button: the sidebar shows our help page."""
    fetched = []
    page.on("response", lambda r: fetched.append((r.url, r.status)) if "/docs/" in r.url else None)
    page.evaluate("""async () => {
        window.app.graph.clear();
        const node = window.LiteGraph.createNode("LatentCLIPScore");
        node.pos = [500, 400];
        window.app.graph.add(node);
        window.app.canvas.ds.offset = [0, 0];
        window.app.canvas.ds.scale = 1;
        window.app.canvas.setDirty(true, true);
    }""")
    close_dialogs(page)
    canvas = page.locator("#graph-canvas").bounding_box()
    info = page.locator('[data-testid="info-button"]').first
    for _ in range(3):   # the canvas draws the new node on its next frame; click its title bar as a user does
        page.wait_for_timeout(700)
        page.mouse.click(canvas["x"] + 560, canvas["y"] + 385)
        try:
            info.wait_for(state="visible", timeout=10_000)
            break
        except playwright.Error:
            continue
    info.click(timeout=30_000)
    page.get_by_text("What it does not do").first.wait_for(timeout=30_000)
    sidebar = page.locator("text=What it does not do").first.locator("xpath=ancestor::*[.//table][1]")
    text = sidebar.inner_text()
    for name in ("latent_clip", "samples", "text", "scores", "report", "Minimal graph"):
        assert name in text, name
    assert any(url.endswith(f"/extensions/{_srv.PACK_NAME}/docs/LatentCLIPScore.md") and status == 200
               for url, status in fetched), fetched
