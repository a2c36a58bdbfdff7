"""The pack imports cleanly without ComfyUI, and the core never imports it."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pack_entry_imports_without_comfyui():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('lc_pack', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['lc_pack'] = m; spec.loader.exec_module(m)\n"
        "assert m.comfy_entrypoint() is None\n"
        "import latentclip, latentclip.scoring, latentclip.checkpoints\n"
        "assert not [k for k in sys.modules if k == 'comfy' or k.startswith('comfy.')], 'core imported comfy'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr


def test_core_sources_never_import_comfy():
    for path in (ROOT / "latentclip").rglob("*.py"):
        text = path.read_text()
        assert "import comfy" not in text and "from comfy" not in text, path
        assert "import folder_paths" not in text, path
