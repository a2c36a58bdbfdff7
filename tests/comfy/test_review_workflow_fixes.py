"""Review r4's workflow findings, each checked on a real ComfyUI server (``main.py --cpu``):

- D3: the example workflows leave room for what a run adds. The front end grows a PreviewImage/SaveImage of
  mini-world images to 246-270 px of body once it has run (measured in front end 1.27.10); laid out with that
  room, no two nodes of the generator's output cover each other. (tests/comfy/test_frontend.py checks the
  Start-here cards after their run in the browser.)
- D4: each Start-here card whose note states what it shows (Safety, both ReNO cards, Search) shows it on its
  own seed: the card's API graph is run and the note's numbers are compared with the Judge's counts, the
  filter's flags and the search histories.
- D6/D9: the Pixel-CLIP Reward lists pixel CLIPs only (none of the shipped generators, VAEs, Latent-CLIPs or
  heads), is registered as ``LatentCLIPPixelReward`` and keeps ``PixelCLIPReward`` as a deprecated alias, so a
  saved graph naming the old id (tests/compat/saved/) still validates and runs.
"""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import comfy_server as _srv
from comfy_server import comfy_server, server_log_on_failure  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("server_log_on_failure")

REPO = Path(__file__).resolve().parents[2]
SAVED = REPO / "tests" / "compat" / "saved"
#: Body height a PreviewImage/SaveImage of 64x64 images takes once run (measured 246-270 px, rounded up).
IMAGE_BODY_AFTER_RUN = 300
TITLE_H = 30


def _generator():
    spec = importlib.util.spec_from_file_location("latentclip_make_workflows_r4", REPO / "tools" / "make_workflows.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return make


make = _generator()


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


# -- D3: room for the previews ---------------------------------------------------------------------------
def boxes_after_run(ui: dict) -> list:
    """[id, x, y, w, h] of each node, title bar included, an image node at least as tall as a run makes it."""
    boxes = []
    for n in ui["nodes"]:
        w, h = n["size"]
        if n["type"] in ("PreviewImage", "SaveImage"):
            h = max(h, IMAGE_BODY_AFTER_RUN)
        boxes.append([n["id"], n["pos"][0], n["pos"][1] - TITLE_H, w, h + TITLE_H])
    return boxes


def covered(boxes: list) -> list:
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]


def test_covered_sees_a_preview_that_grows_over_the_node_below():
    ui = {"nodes": [{"id": 1, "type": "PreviewImage", "pos": [0, 30], "size": [320, 90]},
                    {"id": 2, "type": "LatentCLIPMiniWorldJudge", "pos": [0, 190], "size": [320, 90]}]}
    assert covered(boxes_after_run(ui)) == [(1, 2)]
    ui["nodes"][1]["pos"][1] = 30 + IMAGE_BODY_AFTER_RUN + TITLE_H
    assert covered(boxes_after_run(ui)) == []


@pytest.mark.parametrize("slug", list(make.WORKFLOWS))
def test_generated_layout_leaves_room_for_the_image_previews(object_info, slug):
    build, note = make.WORKFLOWS[slug]
    ui = make.to_ui(build(), object_info, note, api_path=f"workflows/api/{slug}.json")
    assert covered(boxes_after_run(ui)) == []
    shipped = json.loads((REPO / "example_workflows" / f"{make.title_of(slug)}.json").read_text())
    assert covered(boxes_after_run(shipped)) == []


# -- D4: each card shows what its note says ----------------------------------------------------------------
def card(slug: str) -> tuple[dict, str]:
    """(API graph, the note a user reads on the card)."""
    graph = json.loads((REPO / "workflows" / "api" / f"{slug}.json").read_text())
    ui = json.loads((REPO / "example_workflows" / f"{make.title_of(slug)}.json").read_text())
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    return graph, " ".join(note.split())


def by_title(graph: dict, title: str) -> str:
    return next(nid for nid, n in graph.items() if n.get("_meta", {}).get("title") == title)


def judge_count(entry: dict, graph: dict, title: str) -> str:
    text = entry["outputs"][by_title(graph, title)]["text"][0]
    return re.match(r"judge: (\d+/\d+) ", text).group(1)


def images(srv, entry: dict, node_id: str) -> list:
    from PIL import Image
    folders = {"temp": srv.workdir / "temp", "output": srv.output_dir}
    return [np.asarray(Image.open(folders[i["type"]] / i["subfolder"] / i["filename"]).convert("RGB"))
            for i in entry["outputs"][node_id]["images"]]


def run_card(srv, graph: dict) -> dict:
    entry = srv.run(graph, timeout=180)
    assert entry["status"]["status_str"] == "success", _srv.status_messages(entry).get("execution_error")
    return entry


def test_safety_card_shows_the_triangles_its_note_counts(comfy_server):
    from latentclip.miniworld import judge
    graph, note = card("latent_clip_start_safety")
    assert "5 of the 8 unguided images show a triangle, 3 of the guided ones" in note
    assert "the filter flags and blanks 4 images, all with a triangle" in note
    entry = run_card(comfy_server, graph)

    def triangles(title):
        return [any(d.shape == "triangle" for d in judge.detect(img))
                for img in images(comfy_server, entry, by_title(graph, title))]

    unguided, guided = triangles("unguided"), triangles("guided")
    assert (sum(unguided), sum(guided)) == (5, 3), (unguided, guided)
    report = entry["outputs"][by_title(graph, "Flag triangles, blank them")]["text"][0].splitlines()
    flagged = [i for i, line in enumerate(report) if "FLAGGED" in line]
    assert len(flagged) == 4 and all(unguided[i] for i in flagged), (report, unguided)
    filtered = images(comfy_server, entry, by_title(graph, "filtered (blank = flagged)"))
    drawn = images(comfy_server, entry, by_title(graph, "unguided"))
    assert all(judge.detect(filtered[i]) == [] for i in flagged)          # blanked: nothing drawn
    assert all(np.array_equal(filtered[i], drawn[i]) for i in range(8) if i not in flagged)   # the others kept


@pytest.mark.parametrize("slug, after", [("latent_clip_start_reno", "3/4"), ("latent_clip_start_reno_pixel", "4/4")],
                         ids=["latent-clip-reward", "pixel-clip-reward"])
def test_reno_card_shows_the_judge_counts_its_note_states(comfy_server, slug, after):
    graph, note = card(slug)
    assert f"the Judge finds 2/4 images right before ReNO and {after} after" in note
    entry = run_card(comfy_server, graph)
    assert judge_count(entry, graph, "Judge: initial noise") == "2/4"
    assert judge_count(entry, graph, "Judge: after ReNO") == after


def test_search_card_shows_the_counts_and_model_rows_its_note_states(comfy_server):
    graph, note = card("latent_clip_start_search")
    assert "equal model calls" not in note
    assert "Model rows per image: 64 for best-of-8 and FK steering (8 x 8), 38 for prune" in note
    assert "the Judge finds best-of-8 0/2, prune 0/2, FK steering 2/2" in note
    entry = run_card(comfy_server, graph)
    for strategy, count, rows in (("best_of_n", "0/2", 64), ("prune", "0/2", 38), ("fk_steering", "2/2", 64)):
        assert judge_count(entry, graph, f"Judge: {strategy} winners") == count, strategy
        history = entry["outputs"][by_title(graph, f"History ({strategy})")]["text"][0]
        assert f"{rows} model rows per image" in history, history


# -- D6/D9: the Pixel-CLIP Reward's list and id ------------------------------------------------------------
def _options(info: dict, node_id: str) -> list:
    spec = info[node_id]["input"]["required"]["clip_name"]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_pixel_reward_has_the_packs_prefix_and_the_old_id_is_a_deprecated_alias(object_info):
    new, old = object_info["LatentCLIPPixelReward"], object_info["PixelCLIPReward"]
    assert new["deprecated"] is False and old["deprecated"] is True
    assert new["display_name"] == old["display_name"] == "Pixel-CLIP Reward (baseline)"
    assert new["input"] == old["input"] and new["input_order"] == old["input_order"]
    assert (new["output"], new["output_name"]) == (old["output"], old["output_name"]) == (["LATENT_REWARD"], ["reward"])


def test_pixel_reward_lists_pixel_clips_only(object_info, comfy_server):
    from latentclip.checkpoints import read_safetensors_header
    from latentclip.pixel_clip import MINI_PIXEL_FORMAT
    options = _options(object_info, "LatentCLIPPixelReward")
    assert "mini/mini-pixel-clip.safetensors" in options
    for name in options:
        shipped = REPO / "weights" / name
        if shipped.is_file():
            assert read_safetensors_header(shipped)["__metadata__"]["format"] == MINI_PIXEL_FORMAT, name
    assert not [o for o in options if re.search(r"generator|vae|latent-clip|head", o)], options
    user = comfy_server.models / "open_clip" / "r4-user-open-clip.bin"   # a user's file is listed whatever it holds
    user.write_bytes(b"not read by the listing\n")
    try:
        assert "r4-user-open-clip.bin" in _options(comfy_server.object_info(), "LatentCLIPPixelReward")
    finally:
        user.unlink()


def test_the_generator_writes_the_new_id():
    for path in (REPO / "workflows" / "api").glob("*.json"):
        types = {n["class_type"] for n in json.loads(path.read_text()).values()}
        assert "PixelCLIPReward" not in types, path.name
    assert {"LatentCLIPPixelReward"} <= {n["class_type"] for n in
                                         json.loads((REPO / "workflows" / "api" / "latent_clip_start_reno_pixel.json")
                                                    .read_text()).values()}


def test_a_saved_graph_with_the_old_id_still_validates_and_runs(comfy_server):
    """Start here 5 as shipped before the rename (commit 93abacf): PixelCLIPReward with the mini pixel CLIP."""
    graph = json.loads((SAVED / "93abacf_latent_clip_start_reno_pixel.api.json").read_text())
    assert {n["class_type"] for n in graph.values()} >= {"PixelCLIPReward", "LatentCLIPReNO"}
    entry = run_card(comfy_server, graph)
    assert re.match(r"judge: \d/4 ", entry["outputs"][by_title(graph, "Judge: after ReNO")]["text"][0])
    ui = json.loads((SAVED / "93abacf_Start here 5 - ReNO with the pixel-CLIP reward (mini-world).json").read_text())
    assert "PixelCLIPReward" in {n["type"] for n in ui["nodes"]}
