"""Smoke run of the search scoring-point benchmark case at toy size (real runs: benchmarks.run --only search)."""
from benchmarks import cases, run


def test_search_scoring_case_times_one_scoring_point_of_n_particles():
    spec = {"kind": "search_scoring", "particles": 3, "resolution": 256, "latent_model": "Latent-ViT-Tiny-test",
            "pixel_model": None, "device": "cpu", "dtype": "float32", "threads": 1, "warmup": 1, "repeats": 2,
            "budget_s": None}
    out = cases.run_case(spec)
    assert len(out["latent_times_s"]) == 2 and out["latent_s"] > 0 and "pixel_s" not in out
    assert "latent:" in run.search_summary(out)


def test_entry_point_plans_the_search_case():
    args = run.parse_args(["--only", "search", "--search-particles", "4"])
    args.reno_latent_model, args.reno_pixel_model, args.dtype = "L", "P", "float32"
    (spec,) = run.plan(args)
    assert spec["kind"] == "search_scoring" and spec["particles"] == 4 and spec["resolution"] == 512
