"""benchmarks.encode_throughput runs the user's encode command end to end (ComfyUI's VAE loader, a real
open_clip teacher, real shards) and reports a rate that leaves the first shard out."""
import json

from benchmarks import encode_throughput


def test_the_benchmark_encodes_through_the_cli_and_times_all_but_the_first_shard(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert encode_throughput.main(["--device", "cpu", "--cases", "sdxl:ViT-B-32:6:2", "--size", "64", "--batch", "2",
                                   "--shard-size", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["shards"] == 3 and row["timed_images"] == 4 and row["images_per_s"] > 0 and row["workers"] == 2
    assert "| sdxl | ViT-B-32 | 64 | 2 | 2 | 4 |" in capsys.readouterr().out
    # an existing result is not overwritten
    try:
        encode_throughput.main(["--device", "cpu", "--cases", "sdxl:ViT-B-32:6", "--json", str(out)])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an existing --json was overwritten")
