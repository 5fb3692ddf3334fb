import shutil

import numpy as np
import pytest
import torch

from bne.data import build_cache, decode_image, domain_batches, load_cache, load_folder_dataset

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)


def _splits(root, tmp_path, lines_by_file):
    d = tmp_path / "splits"
    d.mkdir()
    for name, lines in lines_by_file.items():
        (d / name).write_text("\n".join(lines) + "\n")
    return d


def _pacs_like(synthetic_root, tmp_path, styles=("red_on_white", "yellow_on_blue")):
    root = tmp_path / "images"
    for s in styles:
        shutil.copytree(synthetic_root / s, root / s)
    return root


def test_official_split_defects_are_fixed_and_recorded(synthetic_root, tmp_path):
    root = _pacs_like(synthetic_root, tmp_path)
    lines = {}
    for dom in ("red_on_white", "yellow_on_blue"):
        files = sorted(p.relative_to(root).as_posix() for p in (root / dom).rglob("*.png"))
        train, val = files[:-10], files[-10:-1]  # the last file is in neither list
        lines[f"{dom}_train_kfold.txt"] = [f"{f} 1" for f in train]
        lines[f"{dom}_crossval_kfold.txt"] = [f"{val[0]} 0"] + [f"{f} 3" for f in val]  # label 0, a duplicate line
    ds = load_folder_dataset(root, _splits(root, tmp_path, lines))
    assert ds.classes == ["circle", "square", "triangle"]
    # labels come from the folder, not the split file
    assert all(s.label == ds.classes.index(s.cls) for s in ds.samples)
    assert sum(s.split == "val" for s in ds.samples) == 18
    assert any("duplicate" in f for f in ds.fixes) and any("neither" in f for f in ds.fixes)
    assert len(ds.samples) == len({s.path for s in ds.samples})


def test_split_file_errors_name_the_problem(synthetic_root, tmp_path):
    root = _pacs_like(synthetic_root, tmp_path)
    base = {f"{d}_{k}_kfold.txt": [] for d in ("red_on_white", "yellow_on_blue") for k in ("train", "crossval")}
    bad = dict(base, **{"red_on_white_train_kfold.txt": ["red_on_white/circle/nope.png 1"]})
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_folder_dataset(root, _splits(root, tmp_path / "a", bad))
    escape = dict(base, **{"red_on_white_train_kfold.txt": ["../../etc/passwd 1"]})
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="leaves the dataset root"):
        load_folder_dataset(root, _splits(root, tmp_path / "b", escape))


def test_missing_class_and_empty_domain(synthetic_root, tmp_path):
    root = _pacs_like(synthetic_root, tmp_path)
    shutil.rmtree(root / "red_on_white" / "square")
    with pytest.raises(ValueError, match=r"'red_on_white'.*\['square'\]"):
        load_folder_dataset(root)
    (root / "empty" / "circle").mkdir(parents=True)
    with pytest.raises(ValueError, match="'empty' .* no images"):
        load_folder_dataset(root)


def test_seeded_stratified_split(synthetic_root):
    a = load_folder_dataset(synthetic_root, val_fraction=0.25, seed=3)
    b = load_folder_dataset(synthetic_root, val_fraction=0.25, seed=3)
    assert a.samples == b.samples
    for dom in a.domains:
        for c in a.classes:
            rows = [s for s in a.of(dom) if s.cls == c]
            assert sum(s.split == "val" for s in rows) == 6


def test_cache_round_trip_and_decode_errors(synthetic_root, tmp_path):
    ds = load_folder_dataset(synthetic_root)
    cache = build_cache(ds, 16, tmp_path / "cache", workers=2, max_pixels=MAX_PIXELS)
    arrays = load_cache(ds, cache)
    dom = ds.domains[0]
    first = ds.of(dom)[0]
    np.testing.assert_array_equal(arrays[dom].images[0], decode_image(synthetic_root / first.path, 16, max_pixels=MAX_PIXELS))
    assert arrays[dom].images.dtype == np.uint8 and arrays[dom].images.shape[1:] == (16, 16, 3)
    assert len(arrays[dom].train) + len(arrays[dom].val) == len(ds.of(dom))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        decode_image(bad, 16, max_pixels=MAX_PIXELS)


def test_domain_batches_are_balanced_and_seeded():
    rows = [np.arange(10), np.arange(100, 107)]
    a = list(domain_batches(rows, 4, 5, torch.Generator().manual_seed(1)))
    b = list(domain_batches(rows, 4, 5, torch.Generator().manual_seed(1)))
    assert len(a) == 5 and all(len(x[0]) == 4 and len(x[1]) == 4 for x in a)
    assert all(set(x[1]) <= set(range(100, 107)) for x in a)
    assert all((x == y).all() for s, t in zip(a, b) for x, y in zip(s, t))
