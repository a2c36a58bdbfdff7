"""tests/gpu/run.sh (the GPU check) cleans up after itself even when its set-up fails."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_removes_its_staging_folder_when_the_set_up_fails(tmp_path):
    """env.sh makes the staging folder first; before, the clean-up was set only after env.sh succeeded."""
    repo = tmp_path / "repo"
    (repo / "tests/gpu").mkdir(parents=True)
    (repo / "tests/gpu/run.sh").write_text((ROOT / "tests/gpu/run.sh").read_text())
    (repo / "tests/gpu/env.sh").write_text('GPU_STAGE=$(mktemp -d "$OUT/stage.XXXXXX")\n'
                                           'echo "installing .gpu/whl failed"\nreturn 1\n')
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(repo / "tests/gpu/run.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "installing .gpu/whl failed" in r.stdout
    assert list((tmp_path / "out").glob("stage.*")) == []
