"""Per-target and mean accuracies, with standard errors over seeds, and their markdown table."""

import math

from bne.metrics import METHOD_KEYS, markdown_table, summarize


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
