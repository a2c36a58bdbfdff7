"""Seeded fuzz test: mutated checkpoint files either load correctly or raise CheckpointError.

300 cases from three valid files of a micro Latent-CLIP (a .safetensors with its config in the
metadata, one without metadata in the authors' key layout, and a torch zip checkpoint): corrupted
header lengths and header bytes, structured header edits (dtypes, shapes swapped or permuted,
offsets, renamed or duplicated keys, metadata configs with foreign or out-of-range values),
truncation, flipped data bytes, appended bytes, and re-saved state dicts with swapped shapes or
changed dtypes. No other exception may escape, nothing may touch the network (connections fail
loudly and are recorded), and a file that loads must give exactly the tensors an independent
reader finds in it. Run it alone with ``-s`` to see the outcome table.
"""
import collections
import io
import json
import random
import struct
import time

import torch
from safetensors.torch import load_file, save

import latentclip
from latentclip import CheckpointError
from latentclip.checkpoints import normalized_key

SEED = 15
CASES = 300
MICRO = {"embed_dim": 8, "vae_family": "sdxl",
         "vision_cfg": {"image_size": 256, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8,
                        "latent_factor": 8, "latent_channels": 4},
         "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "PICKLE", 7, None]
FOREIGN_VALUES = [None, True, -1, 0, 2**40, 1e308, "x" * 300, [], {}, "ViT-B-32", 3.5]
FOREIGN_KEYS = [("text_cfg", "hf_model_name"), ("vision_cfg", "timm_model_name"), ("vision_cfg", "attentional_pool"),
                ("vision_cfg", "attn_pooler_queries"), ("text_cfg", "hf_tokenizer_name"), ("", "custom_text"),
                ("vision_cfg", "ls_init_value"), ("text_cfg", "embed_cls"), ("", "multimodal_cfg")]


# -- valid base files ----------------------------------------------------------------------------
def _micro_tensors():
    torch.manual_seed(SEED)
    model = latentclip.LatentCLIP(MICRO)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return {k: v.detach().contiguous() for k, v in model.open_clip_state_dict().items() if k != "attn_mask"}


def _safetensors_blob(tensors, metadata=None) -> bytes:
    return save(tensors, metadata=metadata)


def _split(blob: bytes):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _authors_layout(tensors):
    return {("module.visual.latent_vit." + k[len("visual."):] if k.startswith("visual.") else "module." + k): v
            for k, v in tensors.items()}


def _torch_blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -- mutations -----------------------------------------------------------------------------------
def _flip_bytes(rng, blob: bytes, start: int, end: int, count: int) -> bytes:
    b = bytearray(blob)
    for _ in range(count):
        if end > start:
            b[rng.randrange(start, end)] = rng.randrange(256)
    return bytes(b)


def _edit_header(rng, blob: bytes) -> tuple[str, bytes]:
    header, data = _split(blob)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["dtype", "swap-shapes", "permute-shape", "offsets", "drop", "rename", "duplicate",
                       "config-foreign", "config-value", "config-drop", "config-garbage", "metadata-type",
                       "family", "latent-factor"])
    meta = header.setdefault("__metadata__", {})
    cfg = json.loads(meta["config"]) if "config" in meta else json.loads(json.dumps(MICRO))
    if kind == "dtype":
        header[rng.choice(names)]["dtype"] = rng.choice(DTYPES)
    elif kind == "swap-shapes":
        a, b = rng.sample(names, 2)
        header[a]["shape"], header[b]["shape"] = header[b]["shape"], header[a]["shape"]
    elif kind == "permute-shape":
        name = rng.choice([n for n in names if len(header[n]["shape"]) > 1] or names)
        shape = header[name]["shape"]
        rng.shuffle(shape)
        if rng.random() < 0.5 and shape:
            shape[0] = rng.choice([0, 1, shape[0] * 2, 2**31, -1])
    elif kind == "offsets":
        name = rng.choice(names)
        i = rng.randrange(2)
        header[name]["data_offsets"][i] += rng.choice([-4, -1, 1, 4, 2**33])
    elif kind == "drop":
        del header[rng.choice(names)]
    elif kind == "rename":
        name = rng.choice(names)
        header[rng.choice(["clip.", "module.", "_orig_mod.", "visual.latent_vit.", "x."]) + name] = header.pop(name)
    elif kind == "duplicate":  # a second key for the same weight, pointing at the same bytes
        name = rng.choice(names)
        header[rng.choice(["clip.", "module.", "_orig_mod."]) + name] = dict(header[name])
    elif kind == "config-foreign":
        where, key = rng.choice(FOREIGN_KEYS)
        (cfg[where] if where else cfg)[key] = rng.choice(FOREIGN_VALUES + ["org/model"])
    elif kind == "config-value":
        tower = rng.choice(["vision_cfg", "text_cfg"])
        key = rng.choice(list(cfg[tower]))
        cfg[tower][key] = rng.choice(FOREIGN_VALUES + [cfg[tower][key] * 2, cfg[tower][key]])
    elif kind == "config-drop":
        tower = rng.choice(["vision_cfg", "text_cfg", ""])
        target = cfg[tower] if tower else cfg
        target.pop(rng.choice(list(target)))
    elif kind == "config-garbage":
        text = json.dumps(cfg)
        cut = rng.randrange(len(text))
        meta["config"] = rng.choice([text[:cut], text[:cut] + "\x00" + text[cut:], "[" * rng.randrange(1, 5000), "NaN", "null"])
    elif kind == "metadata-type":
        header["__metadata__"] = rng.choice([[], "text", 5, {"config": cfg}, None])
    elif kind == "family":
        meta["vae_family"] = rng.choice(["sd3", "mars", "", "SDXL", "x" * 500])
    elif kind == "latent-factor":
        meta.pop("config", None)
        meta["latent_factor"] = rng.choice(["8", "16", "0", "-8", "1e3", "eight", "99999999999"])
    if kind.startswith("config") and kind != "config-garbage":
        meta["config"] = json.dumps(cfg)
    if isinstance(header.get("__metadata__"), dict) and not header["__metadata__"]:
        del header["__metadata__"]
    return kind, _join(header, data)


def _mutate_safetensors(rng, blob: bytes) -> tuple[str, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    kind = rng.choice(["length", "header-bytes", "edit", "edit", "edit", "edit", "truncate", "data-bytes", "append"])
    if kind == "length":
        value = rng.choice([0, 1, n - 1, n + 1, n + rng.randrange(1, 1000), 2**63, len(blob), rng.getrandbits(64)])
        return kind, struct.pack("<Q", value) + blob[8:]
    if kind == "header-bytes":
        return kind, _flip_bytes(rng, blob, 8, 8 + n, rng.randrange(1, 4))
    if kind == "edit":
        return _edit_header(rng, blob)
    if kind == "truncate":
        return kind, blob[:rng.randrange(len(blob))]
    if kind == "data-bytes":
        return kind, _flip_bytes(rng, blob, 8 + n, len(blob), rng.randrange(1, 20))
    return kind, blob + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))


def _mutate_torch(rng, tensors) -> tuple[str, bytes]:
    blob = _torch_blob({"epoch": 3, "state_dict": _authors_layout(tensors)})
    kind = rng.choice(["truncate", "bytes", "bytes", "swap-shapes", "dtype", "collide", "non-tensor"])
    if kind == "truncate":
        return kind, blob[:rng.randrange(len(blob))]
    if kind == "bytes":
        return kind, _flip_bytes(rng, blob, 0, len(blob), rng.randrange(1, 8))
    sd = {k: v.clone() for k, v in tensors.items()}
    a, b = rng.sample(sorted(sd), 2)
    if kind == "swap-shapes":
        sd[a], sd[b] = sd[b], sd[a]
    elif kind == "dtype":
        sd[a] = sd[a].to(rng.choice([torch.int64, torch.bool, torch.float16, torch.uint8, torch.complex64,
                                      torch.float8_e4m3fn, torch.bfloat16]))
    elif kind == "collide":
        sd["clip." + a] = sd[a] + 1
    else:
        return kind, _torch_blob({"state_dict": {**sd, a: "not a tensor", 5: torch.zeros(1)}})
    return kind, _torch_blob({"state_dict": _authors_layout(sd)})


def build_cases(tensors) -> list:
    rng = random.Random(SEED)
    with_config = _safetensors_blob(tensors, {"format": "latentclip", "config": json.dumps(MICRO), "vae_family": "sdxl"})
    authors = _safetensors_blob(_authors_layout(tensors))
    cases = []
    for i in range(CASES):
        base = rng.choice(["st-config", "st-config", "st-authors", "pt"])
        if base == "pt":
            kind, blob = _mutate_torch(rng, tensors)
        else:
            kind, blob = _mutate_safetensors(rng, with_config if base == "st-config" else authors)
        cases.append((f"{i:03d}-{base}-{kind}", f"{base} {kind}", ".pt" if base == "pt" else ".safetensors", blob))
    return cases


# -- the check -----------------------------------------------------------------------------------
def independent_read(path) -> dict:
    """The file's tensors as the libraries read them, in open_clip layout (for comparing a successful load)."""
    if path.suffix == ".safetensors":
        raw = load_file(str(path))
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        raw = obj["state_dict"] if "state_dict" in obj else obj
    out = {}
    for k, v in raw.items():
        new = normalized_key(k)
        if new is not None:
            out[new] = v
    return out


def test_mutated_checkpoints_load_correctly_or_raise_checkpoint_error(tmp_path, no_network):
    tensors = _micro_tensors()
    cases = build_cases(tensors)
    assert len(cases) == CASES and len({blob for *_, blob in cases}) > CASES * 0.8  # the mutations differ
    outcomes, problems, times = collections.Counter(), [], []
    by_kind = collections.defaultdict(collections.Counter)
    for name, group, suffix, blob in cases:
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(blob)
        start = time.perf_counter()
        try:
            model = latentclip.load(path)
            outcome = "loaded"
        except CheckpointError as e:
            outcome, message = "CheckpointError", str(e)
            if path.name not in message or "\n" in message:
                problems.append(f"{name}: message does not name the file in one line: {message!r}")
        except Exception as e:  # noqa: BLE001 - exactly what the test is looking for
            outcome = type(e).__name__
            problems.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
        times.append((time.perf_counter() - start, name, outcome))
        outcomes[outcome] += 1
        by_kind[group][outcome] += 1
        if outcome == "loaded":
            want = independent_read(path)
            got = model.open_clip_state_dict()
            if set(want) != {k for k in got if k != "attn_mask"}:
                problems.append(f"{name}: loaded keys differ from the file's")
            elif not all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want):
                problems.append(f"{name}: loaded weights differ from the file's")
        path.unlink()
    slowest = sorted(times, reverse=True)[:3]
    means = {o: sum(t for t, _, oo in times if oo == o) / n for o, n in outcomes.items()}
    print(f"\n{CASES} cases, seed {SEED}: {dict(outcomes)}; total {sum(t for t, *_ in times):.1f} s, mean "
          f"{', '.join(f'{o} {m:.3f} s' for o, m in means.items())}; slowest "
          f"{', '.join(f'{n} {t:.2f} s' for t, n, _ in slowest)}")
    for kind, counts in sorted(by_kind.items()):
        print(f"  {kind:16s} {dict(counts)}")
    assert no_network == []
    assert not problems, "\n".join(problems[:20])
    assert outcomes["loaded"] > 0 and outcomes["CheckpointError"] > CASES / 2  # both paths are exercised
