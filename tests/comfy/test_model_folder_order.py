"""A folder a user configured for the pack's model kinds in extra_model_paths.yaml (loaded by ComfyUI before
custom nodes) stays where the user put it: the pack adds ``models/<kind>`` after it, never in front, so Hub
downloads (written to the first folder) land where the user asked."""
import pytest


@pytest.mark.parametrize("kind", ["latent_clip", "open_clip", "latent_clip_heads"])
def test_a_users_configured_folder_stays_first(comfy, tmp_path, kind):
    import sys
    import folder_paths
    package = sys.modules[comfy.node("LatentCLIPReNO").__module__].__name__.rsplit(".", 1)[0]   # as ComfyUI loaded it
    bridge, heads = sys.modules[package + ".comfy_bridge"], sys.modules[package + ".heads"]
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    try:
        folder_paths.folder_names_and_paths.pop(kind, None)
        user = str(tmp_path / "big_disk" / kind)
        folder_paths.add_model_folder_path(kind, user, is_default=True)     # as load_extra_path_config does
        bridge.register_model_folders()
        heads.register_heads_folder()
        paths = folder_paths.get_folder_paths(kind)
        assert paths[0] == user, paths
        ours = [p for p in paths if p.startswith(folder_paths.models_dir)]
        assert len(ours) == 1 and ours[0].endswith(kind)                    # the pack's folder is still listed
        assert ".safetensors" in folder_paths.folder_names_and_paths[kind][1]
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update({k: (v[0], v[1]) for k, v in saved.items()})
