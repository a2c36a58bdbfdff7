"""`python -m benchmarks.run` finishes and keeps its JSON where matplotlib is not installed."""
import json
import sys

from benchmarks import run


def test_run_without_matplotlib_keeps_json_and_skips_only_the_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "bench.json"
    run.main(["--only", "reward", "--latent-models", "Latent-ViT-Tiny-test", "--pixel-models", "",
              "--resolutions", "512", "--repeats", "1", "--isolate", "no", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["resolution"] for r in data["reward_step"]] == [512] and data["errors"] == []
    assert not (tmp_path / "bench.png").exists()
    captured = capsys.readouterr()
    assert "| latent | Latent-ViT-Tiny-test | 512 |" in captured.out
    assert "matplotlib is not installed" in captured.err
