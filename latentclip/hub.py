"""The authors' released Latent-CLIPs, fetched from the Hugging Face Hub and kept as compact files.

Their repos hold an open_clip training checkpoint (``checkpoints/epoch_*.pt``, up to 2.26 GB with the
optimizer state). ``fetch`` downloads it once with ``huggingface_hub`` (which honours ``HF_ENDPOINT``,
``HF_HOME`` and ``HF_HUB_OFFLINE``; the original stays in its cache), reads it with
``torch.load(weights_only=True)`` and writes ``<repo name>.safetensors`` in fp16 into the target folder,
holding only what scoring needs. From then on that file is used and nothing is downloaded again.

A release is named by its repo id everywhere (the loader's list, the workflows, the command line); the
converted file's name (``release_for``) is accepted too. Offline (``HF_HUB_OFFLINE``) or with the Hub
unreachable, ``fetch`` fails within ``PROBE_TIMEOUT`` seconds with one error naming the repo and the manual
steps, instead of huggingface_hub's retries (about half a minute, each attempt logged).
"""
from __future__ import annotations

import inspect
import os
import re
import shlex
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .checkpoints import CheckpointWriteError, convert
from .errors import CheckpointError

RELEASED = (
    "wendlerc/latent-clip-b-8-512-34b-80k",
    "wendlerc/latent-clip-b-4-512-plus-34b-80k",
    "wendlerc/latent-clip-b-8-512-34b-40k",
    "wendlerc/latent-clip-b-4-512-plus-13b-80k",
    "wendlerc/latent-clip-b-4-512-13b-80k",
)
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT = 3.0   # seconds to wait for the Hub to answer at all before giving up
_CHECKPOINT = re.compile(r"checkpoints/epoch_(\d+)\.pt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

Progress = Callable[[int, int], None]   # (bytes so far, total bytes or 0 when unknown)


class DownloadError(CheckpointError):
    """A released checkpoint could not be fetched; the message names the repo and the manual steps."""


def is_repo_id(name) -> bool:
    """``owner/name`` (a Hub repo id) rather than a file name."""
    return isinstance(name, str) and _REPO_ID.fullmatch(name) is not None and not name.endswith((".pt", ".pth",
                                                                                                 ".safetensors", ".bin"))


def local_name(repo_id: str) -> str:
    """The converted file's name: the repo's name, e.g. ``latent-clip-b-8-512-34b-80k.safetensors``."""
    return repo_id.rsplit("/", 1)[-1] + ".safetensors"


def release_for(name) -> str | None:
    """The released repo id that ``name`` stands for (the repo id itself or its converted file's name), or None."""
    for repo_id in RELEASED:
        if name in (repo_id, local_name(repo_id)):
            return repo_id
    return None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> str | None:
    """huggingface_hub's cache as the environment says now (the library reads HF_HOME once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _shell_quoted(path) -> str:
    """``path`` as one argument of a pasted command (a ComfyUI under 'C:\\Users\\First Last' or '~/My Models')."""
    text = str(path)
    if os.name == "nt":
        return f'"{text}"' if any(c in text for c in ' \t&()^;,') else text
    return shlex.quote(text)


def manual_steps(repo_id: str, out_dir, filename: str = "checkpoints/epoch_*.pt") -> str:
    target = Path(out_dir) / local_name(repo_id)
    return (f"download {filename} from {endpoint()}/{repo_id}, then run "
            f"`python -m latentclip convert {Path(filename).name} {_shell_quoted(target)} --dtype fp16` "
            f"(or put the .pt file itself into {Path(out_dir)})")


def offline() -> bool:
    """HF_HUB_OFFLINE as set now or when huggingface_hub was imported (it reads the variable once)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def unreachable(repo_id: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the Hub cannot be reached (one request, no retries; proxies from the environment), or None.

    Any other HTTP answer, even an error status, means a server is there: huggingface_hub then reports what
    it says. 502-504 (an outage) count as unreachable: huggingface_hub would retry them for ~20 s and then fail
    without looking in its cache.
    """
    request = urllib.request.Request(f"{endpoint()}/api/models/{repo_id}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        return f"the Hub answered HTTP {e.code}" if e.code in (502, 503, 504) else None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"the Hub could not be reached ({reason})"
    return None


def last_checkpoint(files) -> str | None:
    """Of repo-relative file names, the last ``checkpoints/epoch_N.pt`` (highest N), or None."""
    epochs = sorted((int(m.group(1)), f) for f in files if (m := _CHECKPOINT.fullmatch(f)))
    return epochs[-1][1] if epochs else None


def checkpoint_file(repo_id: str) -> str:
    """The repo's last ``checkpoints/epoch_N.pt`` (highest N), from the Hub's file listing."""
    from huggingface_hub import HfApi
    files = HfApi(endpoint=endpoint()).list_repo_files(repo_id)
    found = last_checkpoint(files)
    if found is None:
        raise DownloadError(f"{repo_id} holds no checkpoints/epoch_*.pt (files: {sorted(files)[:8]}); "
                            "it is not a Latent-CLIP release in the authors' layout")
    return found


def _reporting_tqdm(progress: Progress):
    """A tqdm class that also reports bytes to ``progress`` (ComfyUI's bar, a CLI line); also when tqdm is
    disabled. An exception from ``progress`` (ComfyUI's interrupt) stops the download."""
    from tqdm.auto import tqdm

    class ReportingTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)   # huggingface_hub's own bar name, unknown to plain tqdm
            super().__init__(*args, **kwargs)
            self._done = kwargs.get("initial", 0) or 0
            self._total = kwargs.get("total") or 0
            progress(self._done, self._total)

        def update(self, n=1):
            out = super().update(n)
            self._done += n or 0
            progress(self._done, self._total)
            return out

    return ReportingTqdm


def fetch(repo_id: str, out_dir, progress: Progress | None = None, dtype: str = "fp16") -> Path:
    """The converted file for ``repo_id`` in ``out_dir``, downloading and converting it if absent.

    Raises DownloadError (naming the repo and the manual steps) when the Hub cannot be reached, the repo
    or its checkpoint is missing, or the download is refused; CheckpointError when the file is no Latent-CLIP.
    """
    if not is_repo_id(repo_id):
        raise DownloadError(f"{repo_id!r} is not a Hugging Face repo id (owner/name)")
    out_dir = Path(out_dir)
    target = out_dir / local_name(repo_id)
    if target.exists():
        return target
    if target.is_symlink():   # a link to a copy on a disk not mounted now: the user's, neither replaced nor used
        raise DownloadError(f"'{target}' is a link to '{os.readlink(target)}', which does not exist; mount it, or "
                            f"remove the link to download {repo_id} again")
    filename = "checkpoints/epoch_*.pt"
    _check_writable(out_dir)   # before a download of gigabytes, not after it
    why = "offline mode is on (HF_HUB_OFFLINE)" if offline() else unreachable(repo_id)
    if why:
        cached = cached_checkpoint(repo_id)
        if cached is None:
            raise DownloadError(f"Could not download {repo_id} from {endpoint()}: {why}. "
                                f"To install it by hand: {manual_steps(repo_id, out_dir)}")
        return _convert_download(repo_id, cached, target, dtype, f"{cached.parent.name}/{cached.name}")
    from huggingface_hub import hf_hub_download
    extra = {}
    if progress and "tqdm_class" in inspect.signature(hf_hub_download).parameters:   # older releases lack it: no byte progress
        extra["tqdm_class"] = _reporting_tqdm(progress)
    try:
        filename = checkpoint_file(repo_id)
        pt = hf_hub_download(repo_id, filename, endpoint=endpoint(), cache_dir=cache_dir(), **extra)
    except DownloadError as e:
        raise DownloadError(f"{e}; {manual_steps(repo_id, out_dir)}") from None
    except Exception as e:
        if not _is_hub_failure(e):
            raise   # e.g. ComfyUI's interrupt raised by the progress callback
        raise DownloadError(f"Could not download {repo_id} ({filename}) from {endpoint()}: {_reason(e)}. "
                            f"To install it by hand: {manual_steps(repo_id, out_dir, filename)}") from None
    return _convert_download(repo_id, pt, target, dtype, filename)


def folder_problem(out_dir) -> str | None:
    """Why ``out_dir`` is not a folder this process can write, or be made in one (it is made only once there is
    something to write); None when it is."""
    out_dir = Path(out_dir)
    # lexists: a link whose target is gone (a models folder linked to an unmounted disk) is found as itself;
    # exists() skipped it, the check passed on its parent and mkdir failed after the download ("File exists")
    existing = next((p for p in (out_dir, *out_dir.parents) if os.path.lexists(p)), None)
    if existing is not None and existing.is_symlink() and not existing.exists():
        return (f"the output folder '{out_dir}' cannot be made: '{existing}' is a link to "
                f"'{os.readlink(existing)}', which does not exist; mount or create it, or give another folder")
    if existing is not None and not existing.is_dir():
        return f"the output folder '{out_dir}' cannot be made: '{existing}' is a file; give a folder"
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        return (f"the output folder '{out_dir}' cannot be written ('{existing}' is not writable); "
                "give a writable folder")
    return None


def _check_writable(out_dir: Path) -> None:
    """DownloadError unless ``out_dir`` can be written (``folder_problem``)."""
    problem = folder_problem(out_dir)
    if problem:
        raise DownloadError(problem)


def _convert_download(repo_id: str, pt, target: Path, dtype, filename: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return convert(pt, target, dtype=dtype)
    except FileExistsError:   # another process converted it meanwhile
        return target
    except DownloadError:
        raise
    except CheckpointWriteError as e:   # a full disk is no refusal of the file
        raise CheckpointWriteError(f"{repo_id} ({filename}) was downloaded, but {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{repo_id} ({filename}) was downloaded but refused: {e}") from None


def cached_checkpoint(repo_id: str) -> Path | None:
    """The repo's last ``checkpoints/epoch_N.pt`` already in the Hugging Face cache (an earlier download),
    for use offline or when the Hub cannot be reached; None when none is cached."""
    try:
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(repo_id, allow_patterns=["checkpoints/epoch_*.pt"], local_files_only=True,
                                        cache_dir=cache_dir()))
    except Exception:   # noqa: BLE001 - nothing cached (LocalEntryNotFoundError and kin, by release)
        return None
    found = last_checkpoint(f"checkpoints/{f.name}" for f in folder.glob("checkpoints/epoch_*.pt") if f.is_file())
    return None if found is None else folder / found


def _hub_error(name: str) -> type:
    """An exception class of huggingface_hub by name (``errors`` in recent releases, ``utils`` before)."""
    import importlib
    for module in ("huggingface_hub.errors", "huggingface_hub.utils"):
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    return type(name, (Exception,), {})   # unknown to this release: matches nothing


def _is_hub_failure(e: Exception) -> bool:
    """Network, HTTP and offline-mode errors of huggingface_hub (and the HTTP client under it)."""
    if isinstance(e, (OSError, _hub_error("HfHubHTTPError"), _hub_error("OfflineModeIsEnabled"))):
        return True
    return any(c.__name__ in ("HTTPError", "TransportError", "RequestError")
               and c.__module__.split(".")[0] in ("httpx", "httpx2", "requests") for c in type(e).__mro__)


def _reason(e: Exception) -> str:
    if isinstance(e, _hub_error("RepositoryNotFoundError")):
        return "the repo does not exist there (or is private)"
    if isinstance(e, _hub_error("OfflineModeIsEnabled")) or "offline" in str(e).lower() and "HF_HUB_OFFLINE" in str(e):
        return "offline mode is on (HF_HUB_OFFLINE)"
    if isinstance(e, _hub_error("LocalEntryNotFoundError")):
        return "the Hub could not be reached and the file is not in the local cache"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first[:200]
