"""Latent shards: WebDataset tars of VAE latents, teacher embeddings and captions, written and read here.

One sample is a group of tar members sharing a key (WebDataset's convention, the layout img2dataset
writes): ``KEY.latent.npy`` (the raw VAE latent, float16 [C, h, w]; 3-D single-frame latents are
stored without their frame axis), ``KEY.teacher.npy`` (the teacher's L2-normalised image embedding,
float32 [E]), ``KEY.txt`` (caption, when the source had one) and ``KEY.json`` (the source's metadata,
passed through; a ``"negatives"`` list of captions there adds hard negatives). Arrays are ``.npy``:
they load without unpickling anything. ``encode.json`` beside the shards says how they were made.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

MANIFEST = "encode.json"
FORMAT = "latentclip-shards"
LATENT, TEACHER, CAPTION, META = "latent.npy", "teacher.npy", "txt", "json"


@dataclass
class Sample:
    key: str
    latent: np.ndarray
    teacher: np.ndarray
    caption: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def negatives(self) -> list:
        neg = self.meta.get("negatives", [])
        return [n for n in neg if isinstance(n, str) and n.strip()] if isinstance(neg, list) else []


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename: a file under its final name is always complete."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_shard(path, samples) -> int:
    """Write ``samples`` (an iterable of Sample) as one tar, atomically; returns how many were written."""
    count = [0]

    def write(tmp):
        # pax: a name past ustar's 100 bytes (a long image file name, deep folders) gets a pax header
        # instead of failing the shard after all its images were encoded; short names stay plain ustar
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for s in samples:
                parts = {LATENT: npy_bytes(s.latent.astype(np.float16)), TEACHER: npy_bytes(s.teacher.astype(np.float32))}
                if s.caption is not None:
                    parts[CAPTION] = s.caption.encode("utf-8")
                if s.meta:
                    parts[META] = json.dumps(s.meta).encode("utf-8")
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))
                count[0] += 1

    atomic_write(Path(path), write)
    return count[0]


def tar_members(path) -> dict:
    """key -> {extension: (offset, size)} of a tar, checked to be complete."""
    path = Path(path)
    size = path.stat().st_size
    groups: dict = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"member {info.name!r} runs past the end of the file")
                key, ext = split_key(info.name)
                if ext in groups.setdefault(key, {}):
                    raise InputError(f"shard '{path.name}' holds member {info.name!r} twice; expected one file per "
                                     "key and extension")
                groups[key][ext] = (info.offset_data, info.size)
            end = tar.offset
        with open(path, "rb") as f:  # a complete tar ends with two zero blocks; tarfile reads a cut one silently
            f.seek(end)
            if f.read(1024) != bytes(1024):
                raise tarfile.ReadError("it ends without the end-of-archive blocks: truncated")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"shard '{path.name}' is not a readable tar file ({str(e)[:120] or type(e).__name__}); "
                         "expected a WebDataset shard (re-encode it or remove it)") from None
    return groups


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"'{folder}' has no {MANIFEST}; expected a folder written by python -m latentclip encode")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"'{path}' could not be read as JSON ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"'{path}' is not a {FORMAT} manifest")
    return manifest


def shard_paths(folder) -> list:
    return sorted(p for p in Path(folder).glob("*.tar") if p.is_file())


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax header's data (records are ``LENGTH key=value\\n``)."""
    pos = 0
    while pos < len(data):
        length, _, _ = data[pos:pos + 20].partition(b" ")
        if not length.isdigit() or int(length) < 1:
            return None
        record = data[pos:pos + int(length)]
        key, _, value = record[len(length) + 1:-1].partition(b"=")   # without the record's newline
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += int(length)
    return None


class ShardIndex:
    """Random access to every sample of a folder of shards (the trainer's permutation needs it).

    The index is compact (numpy: 68 bytes a sample, 0.7 GB per process for 10M samples); a sample's
    key is read back from its tar header when it is loaded.
    """

    PARTS = (LATENT, TEACHER, CAPTION, META)
    #: shards kept open at once, the least recently read closed first: a permutation reaches every
    #: shard within a few batches, and a process may hold only ~1024 files (ulimit -n)
    MAX_OPEN = 64

    def __init__(self, folder):
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.shards = shard_paths(folder)
        if not self.shards:
            raise InputError(f"'{folder}' holds no .tar shards; expected the output of python -m latentclip encode")
        shard_of, spans = [], []
        for i, path in enumerate(self.shards):
            members = tar_members(path)
            for key, parts in members.items():
                missing = [ext for ext in (LATENT, TEACHER) if ext not in parts]
                if missing:
                    raise InputError(f"shard '{path.name}' sample {key!r} lacks {' and '.join(missing)}; "
                                     f"expected {LATENT} and {TEACHER} for every sample")
            shard_of.append(np.full(len(members), i, dtype=np.int32))
            spans.append(np.array([[parts.get(ext, (-1, -1)) for ext in self.PARTS] for parts in members.values()],
                                  dtype=np.int64).reshape(-1, len(self.PARTS), 2))
        self.shard_of, self.spans = np.concatenate(shard_of), np.concatenate(spans)
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.embed_dim = int(self.manifest["teacher"]["embed_dim"])
        self._files: dict = {}

    def __len__(self) -> int:
        return len(self.shard_of)

    def _read(self, shard: int, span) -> bytes:
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= self.MAX_OPEN:
                self._files.pop(next(iter(self._files))).close()
            try:
                f = open(self.shards[shard], "rb")
            except OSError as e:
                raise InputError(f"shard '{self.shards[shard].name}' could not be opened ({e.strerror or e}); expected "
                                 "the shards in --data to stay in place while training") from None
        self._files[shard] = f   # the most recently read last
        f.seek(int(span[0]))
        return f.read(int(span[1]))

    def _key(self, shard: int, data_offset: int) -> str:
        """The sample's key from its member's ustar header (the 512 bytes before its data), or from the
        pax header before that one when the name did not fit ustar."""
        header = self._read(shard, (data_offset - 512, 512))
        name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
        prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace")
        name = f"{prefix}/{name}" if prefix else name
        if name.endswith("." + LATENT) and "?" not in name:   # whole and ASCII: no pax header before it
            return split_key(name)[0]
        for blocks in range(1, 9):   # pax data of up to 4 KiB: names of any length a file system allows
            at = data_offset - 512 * (blocks + 2)
            if at < 0:
                break
            pax = self._read(shard, (at, 512))
            if pax[156:157] == b"x" and pax[257:262] == b"ustar":
                try:
                    size = int(pax[124:136].rstrip(b"\0 ") or b"0", 8)
                except ValueError:
                    break
                if -(-size // 512) == blocks:
                    name = _pax_path(self._read(shard, (at + 512, size))) or name
                break
        return split_key(name)[0]

    def __getitem__(self, i: int) -> Sample:
        shard, spans = int(self.shard_of[i]), self.spans[i]
        latent_span, teacher_span, caption_span, meta_span = spans
        key = self._key(shard, int(latent_span[0]))
        where = f"shard '{self.shards[shard].name}' sample {key!r}"
        try:
            latent = npy_array(self._read(shard, latent_span))
            teacher = npy_array(self._read(shard, teacher_span))
            caption = self._read(shard, caption_span).decode("utf-8").strip() if caption_span[0] >= 0 else None
            meta = json.loads(self._read(shard, meta_span)) if meta_span[0] >= 0 else {}
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise InputError(f"{where} could not be read ({str(e)[:120]}); expected .npy arrays and UTF-8 text") from None
        if tuple(latent.shape) != self.latent_shape or teacher.shape != (self.embed_dim,):
            raise InputError(f"{where} has a latent of shape {list(latent.shape)} and a teacher embedding of shape "
                             f"{list(teacher.shape)}; {MANIFEST} says {list(self.latent_shape)} and [{self.embed_dim}]")
        if not (np.isfinite(latent).all() and np.isfinite(teacher).all()):
            raise InputError(f"{where} holds NaN or infinite values; expected finite latents and embeddings")
        return Sample(key, latent, teacher, caption or None, meta if isinstance(meta, dict) else {})

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
