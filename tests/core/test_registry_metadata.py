"""The pack is ready for the ComfyUI Registry, and its docs hold no paths of a particular machine."""
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_project_section_has_what_the_registry_requires(pyproject):
    project = pyproject["project"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"]
    assert project["urls"]["Repository"].startswith("https://")
    assert any(c.startswith("Operating System ::") for c in project["classifiers"])
    assert any(c.startswith("Environment :: GPU ::") for c in project["classifiers"])
    deps = " ".join(project["dependencies"])
    assert "torch" not in deps.replace("open_clip_torch", "")   # ComfyUI provides torch


def test_tool_comfy_is_complete_and_the_icon_is_shipped(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r"(>=|==|~=)\d+\.\d+\.\d+", comfy["requires-comfyui"])
    repo = pyproject["project"]["urls"]["Repository"].replace("https://github.com/", "")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert comfy["Icon"].startswith(prefix)
    with Image.open(REPO / comfy["Icon"][len(prefix):]) as icon:   # the file the URL serves once pushed
        assert icon.width == icon.height <= 400


def test_readme_and_docs_name_no_machine_specific_paths():
    pattern = re.compile(r"(?<![\w.])(/work/|/root/|/tmp/|/home/|/Users/|[A-Z]:\\\\)")
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
             for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "web" / "docs").glob("*.md"))]
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
