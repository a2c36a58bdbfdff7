"""Collect every released example workflow from git history into tests/compat/workflows/ (run after a release).

    python tests/compat/collect.py [REV]        # default HEAD: the history the lead merged

Every version of every *.json under workflows/ and example_workflows/ reachable from REV is kept once
(identical files deduplicated by blob), under ``workflows/<short commit>/<path at that commit>``, in the
oldest commit that shipped it. ``manifest.json`` records, per file, where it came from, its format
(``ui`` or ``api``) and, for a UI file, the API graph generated from the same definition in the same
commit (``api``): the values each widget must show once the front end has loaded it.
"""
from __future__ import annotations

import json
import posixpath
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = HERE / "workflows"
SOURCES = ("workflows", "example_workflows")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def is_ui(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def api_partner(path: str, data: dict, files: dict) -> str | None:
    """The API graph made from the same definition as UI file ``path``, in the same commit."""
    named = ((data.get("extra") or {}).get("latentclip") or {}).get("api")
    candidates = [posixpath.normpath(posixpath.join(posixpath.dirname(path), named))] if named else []
    candidates.append(path[:-len(".json")] + ".api.json")
    return next((c for c in candidates if c in files), None)


def collect(rev: str = "HEAD") -> list:
    commits = git("log", "--reverse", "--format=%H %cI", rev, "--", *SOURCES).split("\n")
    seen: dict = {}        # blob -> fixture path
    manifest = []
    for line in filter(None, commits):
        commit, date = line.split()
        listing = git("ls-tree", "-r", "-z", commit, "--", *SOURCES).split("\0")
        files = {}
        for entry in filter(None, listing):
            meta, path = entry.split("\t", 1)
            if path.endswith(".json"):
                files[path] = meta.split()[2]
        new = []
        for path, blob in sorted(files.items()):
            if blob in seen:
                continue
            fixture = f"{commit[:7]}/{path}"
            text = git("cat-file", "blob", blob)
            target = OUT / fixture
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            seen[blob] = fixture
            new.append((path, fixture, json.loads(text)))
        for path, fixture, data in new:
            entry = {"fixture": fixture, "commit": commit, "date": date, "path": path,
                     "format": "ui" if is_ui(data) else "api"}
            if entry["format"] == "ui":
                partner = api_partner(path, data, files)
                entry["api"] = seen[files[partner]] if partner else None
            manifest.append(entry)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":
    found = collect(*sys.argv[1:2])
    print(f"{len(found)} workflow files ({sum(e['format'] == 'ui' for e in found)} UI, "
          f"{sum(e['format'] == 'api' for e in found)} API) in {OUT}")
