"""Review 1206b, loading users' weights: two conversions of the same release at once (two ComfyUI instances
sharing a models folder, or the CLI next to ComfyUI) both succeed and leave one whole file; a file that appears
under the output name while a conversion runs is never written over; a models folder that is a link to an
unmounted disk is refused before the download, in one sentence; the manual steps in a download error are a
command that still works when the folder's path holds spaces."""
import os
import shlex
import threading
from pathlib import Path

import pytest
import torch

import latentclip
from latentclip import checkpoints, hub
from hub_standin import StandInHub, authors_layout
from test_hub import tiny_model

REPO = "wendlerc/latent-clip-b-8-512-34b-80k"


@pytest.fixture(scope="module")
def epoch_pt(tmp_path_factory):
    d = tmp_path_factory.mktemp("release")
    torch.save(authors_layout(tiny_model(0).open_clip_state_dict()), d / "epoch_34.pt")
    return d / "epoch_34.pt"


@pytest.fixture
def standin(epoch_pt, tmp_path, monkeypatch):
    with StandInHub({REPO: {"checkpoints/epoch_34.pt": epoch_pt}}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        yield srv


def test_two_fetches_of_the_same_release_at_once_both_succeed_with_one_whole_file(standin, tmp_path, monkeypatch):
    """Both writers used the same '<name>.tmp': the first rename took the other's temp file away (its fetch failed
    with 'could not be written'), or moved a file the other was still writing into place."""
    real_save = checkpoints.save_file
    both_written = threading.Barrier(2)

    def save_then_wait(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        try:
            both_written.wait(timeout=60)     # both temp files written before either is renamed
        except threading.BrokenBarrierError:
            pass

    monkeypatch.setattr(checkpoints, "save_file", save_then_wait)
    out = tmp_path / "models" / "latent_clip"
    results, errors = [], []

    def fetch():
        try:
            results.append(hub.fetch(REPO, out))
        except Exception as e:   # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == [out / hub.local_name(REPO)] * 2
    assert sorted(p.name for p in out.iterdir()) == [hub.local_name(REPO)]     # no temp file left behind
    latentclip.load(results[0])                                                 # whole and loadable


def test_a_file_that_appears_under_the_output_name_during_a_conversion_is_not_written_over(epoch_pt, tmp_path,
                                                                                           monkeypatch):
    out = tmp_path / "converted.safetensors"
    real_save = checkpoints.save_file

    def user_copies_a_file_meanwhile(tensors, filename, metadata=None):
        out.write_bytes(b"the user's own weights")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", user_copies_a_file_meanwhile)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoints.convert(epoch_pt, out, dtype="fp16")
    assert out.read_bytes() == b"the user's own weights"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]                    # no temp file left behind


def test_force_still_replaces_the_file(epoch_pt, tmp_path):
    out = tmp_path / "converted.safetensors"
    out.write_bytes(b"old")
    checkpoints.convert(epoch_pt, out, dtype="fp16", force=True)
    latentclip.load(out)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_models_folder_linked_to_an_unmounted_disk_is_refused_before_downloading(standin, tmp_path):
    """It passed the writable check (its parent is writable), downloaded the checkpoint and then failed with a
    bare '[Errno 17] File exists' from mkdir."""
    models = tmp_path / "ComfyUI" / "models"
    models.mkdir(parents=True)
    (models / "latent_clip").symlink_to(tmp_path / "nas" / "latent_clip", target_is_directory=True)
    with pytest.raises(hub.DownloadError) as e:
        hub.fetch(REPO, models / "latent_clip")
    text = str(e.value)
    assert str(models / "latent_clip") in text and str(tmp_path / "nas" / "latent_clip") in text
    assert "does not exist" in text and len(text.splitlines()) == 1
    assert standin.downloads() == []                                              # refused before the download
    assert (models / "latent_clip").is_symlink() and not (tmp_path / "nas").exists()   # nothing made or replaced


def test_manual_steps_are_a_working_command_for_a_folder_with_spaces(tmp_path):
    folder = tmp_path / "John Smith" / "ComfyUI" / "models" / "latent_clip"
    text = hub.manual_steps(REPO, folder, "checkpoints/epoch_34.pt")
    command = text.split("`")[1]
    assert shlex.split(command) == ["python", "-m", "latentclip", "convert", "epoch_34.pt",
                                    str(folder / hub.local_name(REPO)), "--dtype", "fp16"]


def test_a_broken_link_under_the_converted_name_is_one_error_and_stays(standin, tmp_path):
    """A link the user made from the converted name to a copy on a disk that is not mounted now: neither replaced
    nor taken for the converted file."""
    out = tmp_path / "models" / "latent_clip"
    out.mkdir(parents=True)
    (out / hub.local_name(REPO)).symlink_to(tmp_path / "nas" / hub.local_name(REPO))
    with pytest.raises(hub.DownloadError) as e:
        hub.fetch(REPO, out)
    text = str(e.value)
    assert str(out / hub.local_name(REPO)) in text and "does not exist" in text and len(text.splitlines()) == 1
    assert (out / hub.local_name(REPO)).is_symlink() and sorted(p.name for p in out.iterdir()) == [hub.local_name(REPO)]
    assert standin.downloads() == []


def test_a_full_disk_after_the_download_is_not_reported_as_a_refused_file(standin, tmp_path, monkeypatch):
    import errno

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    out = tmp_path / "models" / "latent_clip"
    with pytest.raises(latentclip.CheckpointError) as e:
        hub.fetch(REPO, out)
    text = str(e.value)
    assert REPO in text and "No space left on device" in text and str(out / hub.local_name(REPO)) in text
    assert "refused" not in text and len(text.splitlines()) == 1
    assert list(out.iterdir()) == []                                              # no partial file left
