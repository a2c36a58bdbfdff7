"""The UI-format workflows load in ComfyUI's real front end (headless Chromium), as a user's drag-in does.

Skipped unless ComfyUI, Playwright and a Chromium binary are available.
"""
import contextlib
import json
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

import comfy_server as _srv
from comfy_server import comfy_server, server_log_on_failure  # noqa: F401  (fixtures)

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
              pytest.mark.usefixtures("server_log_on_failure")]
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
WORKFLOWS = sorted(EXAMPLES.glob("*.json"))   # UI format: the Templates browser's cards


def close_dialogs(page):
    """Close whatever dialog the front end opened on its own (first-run templates, missing models)."""
    for _ in range(5):
        if not page.locator(".p-dialog-mask").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    assert not page.locator(".p-dialog-mask").count(), "a dialog stays open"


@contextlib.contextmanager
def front_end_page(url: str):
    """ComfyUI's front end at ``url`` in headless Debian Chromium, once its graph exists."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url, timeout=120_000)
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def page(comfy_server):
    with front_end_page(comfy_server.url) as page:
        yield page


def drawn_overlaps(boxes: list) -> list:
    """Pairs of node boxes ([id, x, y, w, h], title bar included) that cover each other."""
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]


def test_overlap_check_sees_a_covered_node():
    assert drawn_overlaps([[1, 0, 0, 100, 100], [2, 100, 0, 50, 50], [3, 0, 100, 10, 10]]) == []
    assert drawn_overlaps([[1, 0, 0, 100, 100], [2, 90, 90, 50, 50]]) == [(1, 2)]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_loads_with_the_api_graphs_values_and_no_node_covers_another(page, path):
    ui = json.loads(path.read_text())
    api = json.loads((REPO / ui["extra"]["latentclip"]["api"]).read_text())
    close_dialogs(page)
    nodes = page.evaluate("""async (wf) => {
        await window.app.loadGraphData(wf);
        await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));   // drawn once
        const title = window.LiteGraph.NODE_TITLE_HEIGHT;
        return window.app.graph._nodes.map(n => ({id: String(n.id), type: n.type, errors: !!n.has_errors,
            box: [n.id, n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title],
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
    assert drawn_overlaps([n["box"] for n in nodes]) == []
    assert path.with_suffix(".jpg").is_file()


def test_templates_browser_lists_only_ui_workflows_each_with_a_picture(page, comfy_server):
    listed = comfy_server.get("/workflow_templates")[_srv.PACK_NAME]
    assert sorted(listed) == sorted(p.stem for p in WORKFLOWS) and len(listed) >= 7
    for name in listed:
        quoted = urllib.parse.quote(name)
        status, data = comfy_server.request("GET", f"/api/workflow_templates/{_srv.PACK_NAME}/{quoted}.json")
        assert status == 200 and data["version"] and data["nodes"], name   # UI format, not an API graph
        status, jpg = comfy_server.request("GET", f"/api/workflow_templates/{_srv.PACK_NAME}/{quoted}.jpg")
        assert status == 200 and bytes(jpg)[:3] == b"\xff\xd8\xff", name


def open_pack_templates(page, search: str = ""):
    """Templates -> this pack; ``search`` typed into the dialog's search box. The dialog draws the first 12 cards
    and more on scrolling, in the server's order (ComfyUI globs the folder unsorted), so tests find a card by
    searching for it, as a user with many cards does."""
    close_dialogs(page)
    page.locator(".side-bar-button", has_text="Templates").first.click(timeout=30_000)
    page.get_by_text(_srv.PACK_NAME, exact=True).first.click(timeout=30_000)
    if search:
        page.get_by_placeholder("Search templates").first.fill(search, timeout=30_000)


def open_card(page, path) -> str:
    """Click ``path``'s card in the Templates browser; returns the JS condition 'its workflow is loaded'.

    A click made while the dialog still animates (a loaded 2-core CI machine) can be lost: the card is
    clicked again, from a freshly opened browser, before the caller calls it a failure."""
    expected = len(json.loads(path.read_text())["nodes"])
    loaded = f"() => window.app.graph._nodes.length === {expected}"
    for _ in range(3):
        open_pack_templates(page, path.stem)
        page.evaluate("() => window.app.graph.clear()")
        page.locator(f'[data-testid="template-workflow-{path.stem}"]').first.click(timeout=30_000)
        try:
            page.wait_for_function(loaded, timeout=20_000)
            break
        except playwright.Error:
            continue
    return loaded


def test_templates_browser_shows_the_cards_with_pictures_and_opens_one(page):
    """Open Templates in the sidebar, pick this pack: a card with a drawn picture per workflow; a click loads it."""
    open_pack_templates(page)
    for path in WORKFLOWS:
        page.get_by_placeholder("Search templates").first.fill(path.stem, timeout=30_000)
        card = page.locator(f'[data-testid="template-workflow-{path.stem}"]').first
        card.scroll_into_view_if_needed(timeout=30_000)
        img = card.locator("img").first
        img.wait_for(timeout=30_000)
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                               timeout=30_000)
    first = WORKFLOWS[0]
    loaded = open_card(page, first)
    assert page.evaluate(loaded), ("the template card did not load its workflow", page.evaluate(
        "() => window.app.graph._nodes.length"), page.locator(".p-dialog-mask").count())
    close_dialogs(page)


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


START_HERE = [p for p in WORKFLOWS if p.stem.startswith("Start here")]


def test_searching_start_here_shows_exactly_the_start_here_cards(page):
    """The way the README sends a newcomer to them (the dialog keeps the server's unsorted order)."""
    assert len(START_HERE) >= 7
    open_pack_templates(page, "Start here")
    page.wait_for_timeout(1000)
    shown = page.evaluate("() => [...document.querySelectorAll('[data-testid^=template-workflow-]')]"
                          ".map(e => e.dataset.testid.slice('template-workflow-'.length))")
    assert sorted(shown) == sorted(p.stem for p in START_HERE)
    close_dialogs(page)


FIT_CANVAS = """() => {   // the whole graph on screen: the front end loads and sizes a node's image preview when it draws it
    const c = window.app.canvas, t = window.LiteGraph.NODE_TITLE_HEIGHT, nodes = window.app.graph._nodes;
    const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - t));
    const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
    const rect = c.canvas.getBoundingClientRect();
    const scale = Math.min(1, 0.9 * rect.width / (x1 - x0), 0.9 * rect.height / (y1 - y0));
    c.ds.scale = scale;
    c.ds.offset = [-x0 + 20 / scale, -y0 + 20 / scale];
    c.setDirty(true, true);
}"""
BOXES = """() => window.app.graph._nodes.map(n => [n.id, n.pos[0], n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT,
                                           n.size[0], n.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT])"""
TEXT_BOXES = """() => window.app.graph._nodes.map(n => ({id: String(n.id), type: n.type,
    shown: ((n.widgets || []).find(w => w.name === 'result') || {}).value ?? null}))"""


@pytest.mark.parametrize("path", START_HERE, ids=lambda p: p.stem)
def test_start_here_card_opens_queues_and_shows_a_result_within_30_s(page, comfy_server, path):
    """As a newcomer does: Templates -> this pack -> the card; Queue; decoded images appear on the canvas within
    30 s, and the run ends without an error (everything from weights/mini, no download). Then, as drawn: every
    Judge shows its verdicts on the node (web/js/show_text.js), and no node covers another once the previews and
    text boxes are in (the generator reserves their room)."""
    before = set(comfy_server.get("/history"))
    page.wait_for_function(open_card(page, path), timeout=5_000)
    close_dialogs(page)
    page.evaluate(FIT_CANVAS)
    start = time.monotonic()
    page.evaluate("() => window.app.queuePrompt(0, 1)")   # the Run button
    new = []
    while not new and time.monotonic() - start < 30:
        new = [entry for pid, entry in comfy_server.get("/history").items() if pid not in before]
        time.sleep(0.2)
    assert len(new) == 1 and "execution_success" in _srv.status_messages(new[0]), new
    # what the canvas shows: images on every image node, and the judge's text
    left_ms = max(1000, int(1000 * (30 - (time.monotonic() - start))))
    page.wait_for_function("""() => {
        const out = window.app.nodeOutputs, nodes = window.app.graph._nodes;
        const shown = (n) => out[String(n.id)] && ((out[String(n.id)].images || []).length || (out[String(n.id)].text || []).length);
        return nodes.filter(n => ['PreviewImage', 'SaveImage', 'LatentCLIPMiniWorldJudge'].includes(n.type)).every(shown);
    }""", timeout=left_ms)
    # the Judge's verdicts on the canvas: its text box holds what the node sent; so does every pack node's
    page.wait_for_function("""() => window.app.graph._nodes.filter(n => n.type === 'LatentCLIPMiniWorldJudge')
        .every(n => (n.widgets || []).some(w => w.name === 'result' && String(w.value).startsWith('judge: ')))""",
                           timeout=10_000)
    ran = new[0]["outputs"]   # what the server sent (the history keeps it)
    texts = [t for t in page.evaluate(TEXT_BOXES) if t["shown"] is not None]
    assert texts and all(t["type"].startswith(("LatentCLIP", "PixelCLIP")) and
                         t["shown"] == "\n".join(ran[t["id"]]["text"]) for t in texts), texts
    # after Run: the previews are loaded and drawn, nothing covers another node
    page.wait_for_function("""() => window.app.graph._nodes.filter(n => ['PreviewImage', 'SaveImage'].includes(n.type))
        .every(n => n.imgs && n.imgs.length && n.imgs.every(i => i.complete))""", timeout=20_000)
    page.wait_for_timeout(1000)
    assert drawn_overlaps(page.evaluate(BOXES)) == []


def test_text_box_only_on_the_packs_nodes_and_a_graph_without_them_runs_cleanly(page, comfy_server):
    """A graph of core nodes only: it runs, Preview Any shows its text as always, no node gets the pack's text box,
    and the page reports no error (the extension touches only node types starting with the pack's prefixes)."""
    assert page.evaluate("() => window.app.extensions.some(e => e.name === 'LatentCLIP.ShowText')")
    errors = []
    listen = lambda e: errors.append(str(e))   # noqa: E731
    page.on("pageerror", listen)
    close_dialogs(page)
    page.evaluate("""() => {
        window.app.graph.clear();
        const text = window.LiteGraph.createNode("PrimitiveStringMultiline");
        const preview = window.LiteGraph.createNode("PreviewAny");
        text.pos = [100, 100]; preview.pos = [500, 100];
        window.app.graph.add(text); window.app.graph.add(preview);
        text.widgets.find(w => w.name === "value").value = "core text, no pack node";
        text.connect(0, preview, 0);
    }""")
    before = set(comfy_server.get("/history"))
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("""() => window.app.graph._nodes.some(n => n.type === 'PreviewAny' &&
        (n.widgets || []).some(w => w.name === 'preview' && w.value === 'core text, no pack node'))""", timeout=30_000)
    new, deadline = [], time.monotonic() + 30
    while not new and time.monotonic() < deadline:
        new = [entry for pid, entry in comfy_server.get("/history").items() if pid not in before]
        time.sleep(0.2)
    page.remove_listener("pageerror", listen)
    assert len(new) == 1 and "execution_success" in _srv.status_messages(new[0]), new
    shown = page.evaluate(TEXT_BOXES)
    assert [t["type"] for t in shown if t["shown"] is not None] == [], shown
    assert errors == []
