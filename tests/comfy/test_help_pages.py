"""Every node the pack registers has a help page that ComfyUI serves where the front end looks for it
(/extensions/<pack folder>/docs/<NodeId>.md), naming each input and output of the node's schema with its
default and range, a minimal graph, and what the node does not do."""
import re

import pytest

import comfy_server as _srv
from comfy_server import comfy_server, server_log_on_failure  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("server_log_on_failure")
SECTIONS = ("## Inputs", "## Outputs", "## Minimal graph", "## What it does not do")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


@pytest.fixture(scope="module")
def our_nodes(comfy_server):
    info = comfy_server.object_info()
    nodes = {k: v for k, v in info.items() if v.get("python_module") == f"custom_nodes.{_srv.PACK_NAME}"}
    assert len(nodes) >= 11
    return nodes


def _row(page: str, name: str) -> str | None:
    return next((line for line in page.splitlines() if line.startswith(f"| `{name}` |")), None)


def page_problems(node_id: str, node: dict, page: str) -> list[str]:
    """What a help page lacks against its node's schema (empty when complete)."""
    problems = [f"no '{s}' section" for s in SECTIONS if s not in page]
    if f"(`{node_id}`)" not in page.splitlines()[0]:
        problems.append("the title does not name the node id")
    inputs_part, _, outputs_part = page.partition("## Outputs")
    for section in ("required", "optional"):
        for name, spec in node["input"].get(section, {}).items():
            row = _row(inputs_part, name)
            if row is None:
                problems.append(f"input {name} has no row")
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            numbers = [float(n) for n in NUMBER.findall(row)]
            for key in ("default", "min", "max"):
                value = opts.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                        not any(abs(n - value) <= 1e-9 * max(1.0, abs(value)) for n in numbers):
                    problems.append(f"input {name}: {key} {value} is not in its row")
            if isinstance(opts.get("default"), str) and opts["default"] and \
                    f"`{opts['default'].encode('unicode_escape').decode()}`" not in row:
                problems.append(f"input {name}: default {opts['default']!r} is not in its row")
            options = spec[0] if isinstance(spec[0], list) else opts.get("options")
            if spec[0] == "COMBO" and name not in ("ckpt_name", "clip_name"):   # model lists depend on the disk
                problems += [f"input {name}: option {o!r} is not in its row" for o in options if f"`{o}`" not in row]
    for name in node["output_name"]:
        if _row(outputs_part, name) is None:
            problems.append(f"output {name} has no row")
    return problems


def test_every_registered_node_has_a_complete_help_page(comfy_server, our_nodes):
    problems = {}
    for node_id, node in sorted(our_nodes.items()):
        status, body = comfy_server.request("GET", f"/extensions/{_srv.PACK_NAME}/docs/{node_id}.md")
        if status != 200:
            problems[node_id] = [f"HTTP {status}"]
            continue
        page = body.decode() if isinstance(body, bytes) else str(body)
        found = page_problems(node_id, node, page)
        if found:
            problems[node_id] = found
    assert not problems, problems


def test_the_page_check_catches_a_missing_input_a_wrong_default_and_a_missing_section(our_nodes):
    node = our_nodes["LatentCLIPSelectBest"]
    page = (_srv.REPO / "web" / "docs" / "LatentCLIPSelectBest.md").read_text()
    assert page_problems("LatentCLIPSelectBest", node, page) == []
    broken = page.replace("| `k` | INT | 1 - 4096 | 1 |", "| `k` | INT | 1 - 4000 | 1 |")
    assert page_problems("LatentCLIPSelectBest", node, broken) == ["input k: max 4096 is not in its row"]
    broken = page.replace("| `text` |", "| text |").replace("## What it does not do", "## Limits")
    assert sorted(page_problems("LatentCLIPSelectBest", node, broken)) == [
        "input text has no row", "no '## What it does not do' section"]
    broken = page.replace("`a photo of a cat`", "`a cat`")
    assert page_problems("LatentCLIPSelectBest", node, broken) == [
        "input text: default 'a photo of a cat' is not in its row"]


def test_the_pack_icon_is_served_from_the_web_directory(comfy_server):
    status, body = comfy_server.request("GET", f"/extensions/{_srv.PACK_NAME}/icon.png")
    assert status == 200 and bytes(body)[:8] == b"\x89PNG\r\n\x1a\n"
