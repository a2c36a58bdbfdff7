"""Every node id declared in nodes/*.py has a help page file in web/docs (also where ComfyUI is absent;
tests/comfy/test_help_pages.py checks the served pages against the live schemas)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_declared_node_has_a_help_page_file():
    ids = sorted({m for p in (REPO / "nodes").glob("*.py") for m in re.findall(r'node_id="(\w+)"', p.read_text())})
    assert len(ids) >= 11
    missing = [i for i in ids if not (REPO / "web" / "docs" / f"{i}.md").is_file()]
    assert not missing, f"no web/docs/<NodeId>.md for {missing}"
    for i in ids:
        page = (REPO / "web" / "docs" / f"{i}.md").read_text()
        assert page.startswith("# ") and f"(`{i}`)" in page.splitlines()[0]


def test_the_pack_serves_web_from_its_entry_point():
    assert re.search(r'^WEB_DIRECTORY = "\./web"$', (REPO / "__init__.py").read_text(), re.M)
