"""Loading weights never runs code from the file and never trusts a header it has not checked.

- Source check: every ``torch.load`` in the package passes ``weights_only=True`` (literally, or in a
  dict literal it unpacks), and nothing else unpickles (pickle/dill/joblib, ``allow_pickle=True``).
- Behaviour: pickles whose payload would create a file are refused, in every container format, and
  the file never appears; ``torch.load`` is really called with ``weights_only=True``.
- Safetensors: a header that lies (offsets past the end, a length past the file, bad JSON/dtype) is
  refused before safetensors opens the file for tensors.
"""
import ast
import builtins
import io
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

import latentclip
from latentclip import CheckpointError, checkpoints
from latentclip.pixel_clip import load_pixel_clip

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "latentclip").rglob("*.py"), *(ROOT / "nodes").rglob("*.py"), ROOT / "__init__.py"])


# -- source check --------------------------------------------------------------------------------
def _is_torch_load(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id == "torch"


def _dict_sets_weights_only(node) -> bool:
    return isinstance(node, ast.Dict) and any(
        isinstance(k, ast.Constant) and k.value == "weights_only" and isinstance(v, ast.Constant) and v.value is True
        for k, v in zip(node.keys, node.values))


def unsafe_loads(tree: ast.AST) -> list[str]:
    """Line-numbered descriptions of loads that could unpickle code."""
    problems = []
    for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]:
        safe_dicts = {t.id for n in ast.walk(func) if isinstance(n, ast.Assign) and _dict_sets_weights_only(n.value)
                      for t in n.targets if isinstance(t, ast.Name)}
        for call in [n for n in ast.walk(func) if isinstance(n, ast.Call)]:
            if _is_torch_load(call):
                kw = {k.arg: k.value for k in call.keywords}
                literal = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                unpacked = any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id in safe_dicts for k in call.keywords)
                if not (literal or unpacked):
                    problems.append(f"line {call.lineno}: torch.load without weights_only=True")
            f = call.func
            name = f"{getattr(f.value, 'id', '')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "joblib.load",
                        "cloudpickle.load", "cloudpickle.loads", "marshal.loads"):
                problems.append(f"line {call.lineno}: {name}")
            for k in call.keywords:
                if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    problems.append(f"line {call.lineno}: allow_pickle")
    return sorted(set(problems))


def test_every_torch_load_in_the_package_is_weights_only():
    assert len(SOURCES) > 10
    problems = {str(p.relative_to(ROOT)): unsafe_loads(ast.parse(p.read_text())) for p in SOURCES}
    assert not {k: v for k, v in problems.items() if v}, problems
    assert any("weights_only" in p.read_text() for p in SOURCES)   # the loader is among the sources


def test_the_source_check_is_not_vacuous():
    bad = ast.parse("import torch, pickle\n"
                    "def a(p):\n    return torch.load(p)\n"
                    "def b(p):\n    return torch.load(p, weights_only=False)\n"
                    "def c(p):\n    kw = {'weights_only': False}\n    return torch.load(p, **kw)\n"
                    "def d(p):\n    return pickle.loads(p)\n"
                    "def e(p):\n    import numpy as np\n    return np.load(p, allow_pickle=True)\n")
    assert len(unsafe_loads(bad)) == 5
    good = ast.parse("import torch\ndef f(p):\n    kw = {'map_location': 'cpu', 'weights_only': True}\n    return torch.load(p, **kw)\n"
                     "def g(p):\n    return torch.load(p, weights_only=True)\n")
    assert unsafe_loads(good) == []


# -- malicious pickles ---------------------------------------------------------------------------
class OpenPayload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


class ExecPayload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def _tiny_state_dict():
    return {k: v for k, v in latentclip.LatentCLIP("Latent-ViT-Tiny-test").open_clip_state_dict().items()}


def _malicious_files(tmp_path, marker):
    sd = _tiny_state_dict()
    files = {}
    for name, payload in (("open", OpenPayload(marker)), ("exec", ExecPayload(marker))):
        files[f"zip-{name}.pt"] = lambda p, payload=payload: torch.save({"state_dict": sd, "x": payload}, p)
        files[f"legacy-{name}.pt"] = lambda p, payload=payload: torch.save(
            {"state_dict": sd, "x": payload}, p, _use_new_zipfile_serialization=False)
        files[f"inside-{name}.bin"] = lambda p, payload=payload: torch.save({**sd, "visual.proj": payload}, p)
        for proto in (0, 2, 5):
            files[f"raw{proto}-{name}.pth"] = lambda p, payload=payload, proto=proto: p.write_bytes(pickle.dumps(payload, protocol=proto))
    for name, write in files.items():
        write(tmp_path / name)
    return [tmp_path / n for n in files]


def test_pickles_with_a_payload_are_refused_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "PAYLOAD_RAN"
    paths = _malicious_files(tmp_path, marker)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for path in paths:
        with pytest.raises(CheckpointError) as info:
            latentclip.load(path)
        message = str(info.value)
        assert path.name in message and "\n" not in message
        assert "refused" in message or "truncated or corrupt" in message, message
        assert not marker.exists(), f"{path.name}: the payload ran"
        with pytest.raises(CheckpointError):
            load_pixel_clip(path)                    # the pixel-CLIP loader reads files the same way
        assert not marker.exists()
    assert calls and all(w is True for w in calls), calls
    # the control: the same payload does run when unpickled without protection (so the test can fail)
    pickle.loads((tmp_path / "raw2-open.pth").read_bytes())
    assert marker.exists()


def test_refusal_names_what_the_pickle_asked_for(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _tiny_state_dict(), "x": ExecPayload(tmp_path / "m")}, path)
    with pytest.raises(CheckpointError, match=r"'evil.pt' was refused: its pickle asks for (builtins\.)?exec"):
        latentclip.load(path)


def test_a_clean_pickle_still_loads(tmp_path):
    path = tmp_path / "clean.pt"
    model = latentclip.LatentCLIP("Latent-ViT-Tiny-test")
    torch.save({"state_dict": {"module." + k: v for k, v in model.open_clip_state_dict().items()}, "epoch": 3}, path)
    loaded = latentclip.load(path)
    assert torch.equal(loaded.clip.visual.conv1.weight, model.clip.visual.conv1.weight)


# -- safetensors headers -------------------------------------------------------------------------
def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fails if safetensors is asked to open the file for tensors."""
    opened = []

    def guard(path, *a, **k):
        opened.append(path)
        raise AssertionError(f"safe_open({path}) called before the header was validated")

    monkeypatch.setattr(checkpoints, "safe_open", guard)
    return opened


@pytest.mark.parametrize("name, blob, words", [
    ("beyond", _safetensors_bytes({"visual.proj": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 * 2**20]}},
                                  b"\0" * 64), "points outside the file's 64 data bytes"),
    ("negative", _safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 8]}}, b"\0" * 8), "points outside"),
    ("reversed", _safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8), "points outside"),
    ("dtype", _safetensors_bytes({"w": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "of dtype 'PICKLE'; expected one of F64"),
    ("no-offsets", _safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "points outside"),
    ("size", _safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
     "declares shape [4] of F32 (16 bytes) but holds 8 bytes"),
    ("shape", _safetensors_bytes({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "has shape [-2]"),
    ("empty-huge", _safetensors_bytes({"w": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}, b""),
     "has shape [0, 1099511627776, 1099511627776]"),
    ("overlap", _safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap or leave gaps"),
    ("trailing", _safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),
     "hold 8 bytes but the file has 12"),
    ("metadata", _safetensors_bytes({"__metadata__": {"config": {"embed_dim": 1}}}, b""), "metadata that is not a map of text"),
    ("many", _safetensors_bytes({f"w{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(20_001)}, b""),
     "lists 20001 tensors; expected at most 20000"),
    ("huge-length", struct.pack("<Q", 2**60) + b"{}", "corrupt safetensors header (declares"),
    ("not-json", struct.pack("<Q", 6) + b"{nope}", "not valid JSON"),
    ("not-object", _safetensors_bytes([1, 2], b""), "not a JSON object"),
    ("short", b"\x01\x02", "too short"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 12 else "")
def test_lying_safetensors_headers_are_refused_before_reading(tmp_path, no_tensor_reads, name, blob, words):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=f"'{name}.safetensors'") as info:
        latentclip.load(path)
    assert words in str(info.value), str(info.value)
    assert no_tensor_reads == []


def test_header_check_passes_a_good_file_and_then_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "good.safetensors"
    latentclip.save(latentclip.LatentCLIP("Latent-ViT-Tiny-test"), path)
    header = checkpoints.read_safetensors_header(path)
    assert "visual.conv1.weight" in header and header["__metadata__"]["format"] == "latentclip"
    opened = []
    real = checkpoints.safe_open
    monkeypatch.setattr(checkpoints, "safe_open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    latentclip.load(path)
    assert opened == [str(path)]


def test_a_pickle_named_safetensors_is_not_unpickled(tmp_path, no_tensor_reads):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "disguised.safetensors"
    buf = io.BytesIO()
    pickle.dump(OpenPayload(marker), buf, protocol=2)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="disguised.safetensors"):
        latentclip.load(path)
    assert not marker.exists() and no_tensor_reads == []


@pytest.mark.parametrize("content, says", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 2264932155\n",
     r"^'epoch_34.pt' is a Git LFS pointer \(\d+ bytes\), not the weights; run `git lfs pull`"),
    (b"<!DOCTYPE html>\n<html><head><title>epoch_34.pt</title>",
     r"^'epoch_34.pt' is an HTML page, not the weights; download the file's /resolve/ URL"),
    (b"GGUF\x03\x00\x00\x00" + bytes(56), r"^'epoch_34.pt' is not a PyTorch checkpoint or a .safetensors file"),
    (b'{"model": "not weights"}', r"^'epoch_34.pt' is not a PyTorch checkpoint or a .safetensors file")])
def test_files_that_are_not_weights_say_what_they_are(tmp_path, content, says):
    """The wrong files users have (a clone without LFS, a saved /blob/ page) named for what they are,
    not as a pickle that "asks for" their first byte."""
    path = tmp_path / "epoch_34.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=says):
        latentclip.load(path)
