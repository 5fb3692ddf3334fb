"""Per-target and mean accuracies, with standard errors over seeds, and their markdown table."""

import math

from bne.lodo import METHOD_KEYS, markdown_table, summarize


def fold(target, seed, acc):
    return {"target": target, "seed": seed, "domain_id_acc": 0.9, **{k: acc for k in METHOD_KEYS}}


def test_mean_and_standard_error_over_seeds():
    folds = [fold("a", 0, 0.5), fold("a", 1, 0.7), fold("b", 0, 0.8), fold("b", 1, 0.8)]
    m = summarize(folds, ["a", "b"])
    assert m["a"]["bne"] == 60.0 and m["a"]["bne_se"] == round(math.sqrt(200) / math.sqrt(2), 2)  # sd 14.14 / sqrt 2
    assert m["b"]["bne_se"] == 0.0
    assert m["mean"]["bne"] == 70.0
    assert m["mean"]["bne_se"] == 5.0  # per-seed means 65 and 75: sd 7.07 / sqrt 2
    table = markdown_table(m, ["a", "b"])
    assert "| a | 60.0 ± 10.0 |" in table and "| mean | 70.0 ± 5.0 |" in table


def test_one_seed_has_no_standard_error():
    m = summarize([fold("a", 0, 0.5)], ["a"])
    assert "bne_se" not in m["a"] and "bne_se" not in m["mean"]


def test_norms_grid_figure_partial_cells(tmp_path):
    """bench/norms_pacs.py's figure: drawn from a grid with missing cells and one-method cells, written atomically."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "norms_pacs.py"
    spec = importlib.util.spec_from_file_location("norms_pacs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = {"bn": {"16": {"bne": 55.4, "deepall": 58.5, "bne_img_cpu_s": 34.8}, "2": {"deepall": 31.0}},
               "cbn": {"16": {"deepall": 58.5}}}
    settings = {"dataset": "pacs", "target": "sketch", "images": 96, "resolution": 64, "seed": 0}
    out = tmp_path / "metrics.png"
    mod.figure(results, ["bn", "cbn", "mbn"], [2, 4, 8, 16], settings, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.png"]
