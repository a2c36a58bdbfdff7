"""Every command in README.md works as written from the folder its block names, so the README cannot drift.

Each ```bash block starts with ``# in <folder>`` (``FOLDERS``); its commands run there, in a temporary layout of
a folder holding ``ComfyUI/`` (with ``models/latent_clip``) and a fresh machine's clone of this pack. Downloads
go to a stand-in Hugging Face Hub on 127.0.0.1 (HF_ENDPOINT). Where the real command is slow or changes the
machine, a cheaper equivalent runs, said here and in the assertion messages:
- ``pip install ...``: the same arguments with ``--dry-run --no-index --no-build-isolation`` (the paths, the
  project's metadata and every requirement resolve against this environment; nothing is installed). The
  effect of ``pip install -e <pack>`` on later commands is given by PYTHONPATH=<pack>.
- ``git clone <the Repository URL of pyproject.toml> DIR``: DIR gets a copy of the files git tracks here.
- ``python3 -m latentclip demo``: the same arguments in-process with 2 prompts x 2 seeds and 2 iterations
  (CI's .ci/run runs the full demo).
- ``python3 -m pytest -q -rs``: the same arguments plus ``--collect-only`` (every test module imports; the full
  run is this suite itself).
- ``python -m latentclip run ... --server URL``: against a stand-in ComfyUI on 127.0.0.1 instead of URL (the
  workflow file, every --set and the output folder are real; the graph needs SDXL models to run for real).
Commands quoted inline in the prose (``python -m ...``) are checked to name a module, script and verb that exist.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import latentclip
from latentclip import __main__ as cli
from hub_standin import StandInHub, authors_layout

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FOLDERS = {   # the phrase after "# in " -> where in the layout
    "this pack's folder": "pack",
    "the folder that holds ComfyUI/": "parent",
    "ComfyUI/ (the folder with main.py)": "comfyui",
}
RELEASE = "wendlerc/latent-clip-b-8-512-34b-80k"
REPOSITORY = re.search(r'Repository = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def readme_blocks(text: str) -> list[tuple[str, list[list[str]]]]:
    """[(folder key, [argv, ...])] of every ```bash block: continuation lines joined, comments dropped,
    ``a && b`` split into two commands."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        first, _, rest = body.partition("\n")
        m = re.fullmatch(r"# in (.+)", first.strip())
        assert m and m.group(1) in FOLDERS, f"README block must start with '# in <one of {list(FOLDERS)}>': {first!r}"
        commands = []
        for line in rest.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
        blocks.append((FOLDERS[m.group(1)], commands))
    return blocks


def inline_commands(text: str) -> list[list[str]]:
    """``python ...`` commands quoted in the prose (outside code blocks)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found = []
    for span in re.findall(r"`([^`]+)`", prose):
        words = shlex.split(span.replace("\n", " ").replace("[", "").replace("]", ""), comments=True)
        while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] == "time"):   # VAR=value, time
            words = words[1:]
        if words[:1] in (["python"], ["python3"]) and len(words) > 1:
            found.append(words)
    return found


class Layout:
    """A temporary folder holding ComfyUI/ and, once cloned, the pack in ComfyUI/custom_nodes/."""

    def __init__(self, root: Path, hub_url: str):
        self.root = root
        self.parent = root / "work"
        self.comfyui = self.parent / "ComfyUI"
        for sub in ("custom_nodes", "models/latent_clip", "input", "output"):
            (self.comfyui / sub).mkdir(parents=True, exist_ok=True)
        (self.comfyui / "main.py").write_text("# stand-in for ComfyUI's main.py\n")
        self.pack = self.comfyui / "custom_nodes" / "ComfyUI-Latent-CLIP"
        self.env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(root / "hf_home"), "OMP_NUM_THREADS": "1"}
        self.env.pop("HF_HUB_OFFLINE", None)
        self.env.pop("PYTHONPATH", None)
        self.log = []

    def start(self, key: str) -> Path:
        if key == "pack" and not self.pack.exists():
            self.clone(self.pack)
        return {"pack": self.pack, "parent": self.parent, "comfyui": self.comfyui}[key]

    @staticmethod
    def clone(dest: Path):
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(src.read_bytes())

    def installed(self):
        """What ``pip install -e <pack>`` gives later commands: the pack's code first on the path."""
        self.env["PYTHONPATH"] = str(self.pack)


def _python(argv):
    return [sys.executable, *argv[1:]]


def run_command(argv: list[str], cwd: Path, layout: Layout, monkeypatch, comfy_standin: str) -> Path:
    """Run one README command (or its cheaper equivalent) in ``cwd``; returns the folder the next one runs in."""
    layout.log.append((str(cwd.relative_to(layout.root)), " ".join(argv)))
    if argv[0] == "cd":
        target = (cwd / argv[1]).resolve()
        assert target.is_dir(), f"`cd {argv[1]}` in {cwd}: no such folder"
        return target
    if argv[:2] == ["git", "clone"]:
        assert argv[2].removesuffix(".git") == REPOSITORY, f"the README clones {argv[2]}, not {REPOSITORY}"
        dest = cwd / argv[3]
        assert dest == layout.pack, f"the README clones the pack to {dest}, not ComfyUI/custom_nodes/ComfyUI-Latent-CLIP"
        layout.clone(dest)
        return cwd
    pip = argv[argv.index("pip") + 1:] if "pip" in argv else None
    if pip is not None:
        assert pip[0] == "install", argv
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "-q", *pip[1:]]
        r = subprocess.run(cmd, cwd=cwd, env=layout.env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(argv)} in {cwd} (as a dry run): {r.stderr[-2000:]}"
        if "-e" in pip and (cwd / pip[pip.index("-e") + 1]).resolve() == layout.pack.resolve():
            layout.installed()
        return cwd
    assert argv[0] in ("python", "python3") and argv[1] == "-m", f"no rule for README command {argv}"
    if argv[2:4] == ["latentclip", "demo"]:
        _demo_in_process(argv[3:], cwd, monkeypatch)
    elif argv[2] == "pytest":
        r = subprocess.run([*_python(argv), "--collect-only"], cwd=cwd, env=layout.env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0 and re.search(r"\d+ tests? collected", r.stdout), r.stdout[-2000:] + r.stderr[-2000:]
    else:
        if argv[2:4] == ["latentclip", "run"] or argv[2:4] == ["latentclip.api", "run"]:
            argv = [comfy_standin if a.startswith("http://127.0.0.1:8188") else a for a in argv]
        r = subprocess.run(_python(argv), cwd=cwd, env=layout.env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"`{' '.join(argv)}` in {cwd} failed ({r.returncode}): {r.stderr[-2000:]}"
        layout.log.append(("output", r.stdout[-500:]))
    return cwd


def _demo_in_process(args, cwd, monkeypatch):
    from latentclip.miniworld import demo
    from latentclip.miniworld import geneval as G
    monkeypatch.setattr(demo, "PROMPTS", ("a red circle", "two yellow circles"))
    monkeypatch.setattr(demo, "SAFETY_SEEDS", (200, 201))
    monkeypatch.setattr(demo, "SEEDS_PER_PROMPT", 2)
    monkeypatch.setitem(G.RENO, "iterations", 2)
    monkeypatch.chdir(cwd)
    assert cli.main(args) == 0
    out = cwd / args[args.index("--out") + 1]
    assert (out / "summary.md").is_file() and (out / "grid.png").is_file()


@pytest.fixture
def comfy_standin():
    """A stand-in ComfyUI answering /prompt and /history with one finished prompt and a text output."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading
    done = {"p1": {"prompt": [], "outputs": {"9": {"text": ["cat: 0.9, dog: 0.1"]}},
                   "status": {"status_str": "success", "completed": True, "messages": [["execution_success", {}]]}}}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: dict):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send({"prompt_id": "p1", "number": 0, "node_errors": {}})

        def do_GET(self):
            self._send(done if self.path.startswith("/history") else {})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_every_readme_command_block_runs_in_the_folder_it_names(tmp_path, monkeypatch, comfy_standin):
    text = README.read_text()
    blocks = readme_blocks(text)
    assert len(blocks) >= 4
    release = tmp_path / "release"
    release.mkdir()
    torch.manual_seed(0)
    tiny = latentclip.LatentCLIP("Latent-ViT-Tiny-test").eval()
    torch.save(authors_layout(tiny.open_clip_state_dict()), release / "epoch_34.pt")
    with StandInHub({RELEASE: {"checkpoints/epoch_34.pt": release / "epoch_34.pt"}}) as hub:
        layout = Layout(tmp_path, hub.url)
        # a checkpoint the user downloaded by hand, where the README's convert command expects it
        (layout.comfyui / "epoch_34.pt").write_bytes((release / "epoch_34.pt").read_bytes())
        order = sorted(range(len(blocks)), key=lambda i: blocks[i][0] != "parent")   # install before the rest
        models = layout.comfyui / "models" / "latent_clip"
        made = []
        for i in order:
            key, commands = blocks[i]
            for old in models.iterdir():         # the blocks are alternatives (download, or convert by hand)
                old.unlink()
            cwd = layout.start(key)
            for argv in commands:
                t0 = time.perf_counter()
                cwd = run_command(argv, cwd, layout, monkeypatch, comfy_standin)
                layout.log.append(("seconds", f"{time.perf_counter() - t0:.1f}"))
            made += [p.name for p in models.iterdir()]
        ran = "\n".join(f"[{where}] {cmd}" for where, cmd in layout.log)
        print(ran)
        if f"download {RELEASE}" in text:
            assert hub.downloads() and "latent-clip-b-8-512-34b-80k.safetensors" in made, ran
    assert layout.env.get("PYTHONPATH") == str(layout.pack), "the install block must pip install -e the pack: " + ran


def test_commands_quoted_in_the_prose_name_what_exists(capsys):
    from latentclip.miniworld import __main__ as miniworld_cli
    commands = inline_commands(README.read_text())
    assert len(commands) >= 5
    for argv in commands:
        if argv[1] != "-m":
            assert (ROOT / argv[1]).is_file(), f"README names the script {argv[1]}, which does not exist"
            continue
        module = argv[2]
        if len(argv) == 3 or argv[3].startswith(("<", "...")):   # the module alone, or a placeholder verb
            assert module in ("latentclip", "latentclip.api", "latentclip.miniworld"), argv
            continue
        if module in ("latentclip", "latentclip.miniworld"):
            main = cli.main if module == "latentclip" else miniworld_cli.main
            try:                                    # argparse's --help exits 0 when the verb exists
                code = main([argv[3], "--help"])
            except SystemExit as e:
                code = e.code
            assert code == 0, f"README: `{' '.join(argv)}` names an unknown verb"
        elif module == "latentclip.api":
            assert argv[3] == "run"
        elif module not in ("pytest", "pip"):
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"README names the module {module}"
    capsys.readouterr()
