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


#: Core modules that must run ComfyUI's own loaders (the user's VAE file for distillation data); they
#: import comfy inside functions only, from a tree the user names.
COMFY_EDGE = {"comfy_vae.py"}


def test_core_sources_never_import_comfy():
    for path in (ROOT / "latentclip").rglob("*.py"):
        text = path.read_text()
        if path.name not in COMFY_EDGE:
            assert "import comfy" not in text and "from comfy" not in text, path
        assert "import folder_paths" not in text, path


def test_comfy_edge_modules_import_comfy_only_when_called():
    names = ", ".join(f"latentclip.{n[:-3]}" for n in sorted(COMFY_EDGE))
    code = (f"import sys; sys.path.insert(0, r'{ROOT}'); import {names}, latentclip.encode\n"
            "assert not [k for k in sys.modules if k == 'comfy' or k.startswith('comfy.')], 'imported comfy'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    for name in COMFY_EDGE:
        top = [line for line in (ROOT / "latentclip" / name).read_text().splitlines() if line.startswith(("import", "from"))]
        assert not [line for line in top if "comfy" in line.split()[1]], name


def test_pack_entry_uses_its_own_core_over_another_installed_copy(tmp_path):
    """An older or foreign ``latentclip`` earlier on the path must not be paired with these nodes."""
    decoy = tmp_path / "site" / "latentclip"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("DECOY = True\n")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('lc_pack', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['lc_pack'] = m; spec.loader.exec_module(m)\n"
        "import latentclip, latentclip.families\n"
        "assert not hasattr(latentclip, 'DECOY'), latentclip.__file__\n"
        "print(latentclip.__file__)\n"
    )
    import os
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == (ROOT / "latentclip" / "__init__.py").resolve()
