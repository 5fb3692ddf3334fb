"""Ingestion to the Parquet manifest: columns, metadata, splits and their defects, checksums, bad input."""

import hashlib
import json
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import make_dataset, save_mode_variants
from PIL import Image
from typer.testing import CliRunner

from tasks.cli import app
from bne.ingest import MANIFEST, REPORT, SCHEMA, find_new_domains, ingest, read_manifest_meta

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)

DOMAINS = ("red_on_white", "yellow_on_blue")


@pytest.fixture
def root(tmp_path):
    """``tmp/pacs/images/<domain>/<class>/*.png``: 2 domains x 3 classes x 6 images of 32 px."""
    return make_dataset(tmp_path / "pacs" / "images", styles=DOMAINS, per_class=6, size=32)


def _rows(out):
    return pq.read_table(out / MANIFEST).to_pylist()


def _write_splits(root, tmp_path, extra=None):
    """PACS-format split files: the last image of each class in crossval, the rest in train (labels 1-based)."""
    d = tmp_path / "splits"
    d.mkdir(exist_ok=True)
    classes = sorted(p.name for p in (root / DOMAINS[0]).iterdir())
    for dom in DOMAINS:
        train, val = [], []
        for i, c in enumerate(classes):
            files = sorted(p.relative_to(root).as_posix() for p in (root / dom / c).iterdir())
            train += [f"{f} {i + 1}" for f in files[:-1]]
            val += [f"{files[-1]} {i + 1}"]
        lines = {"train": train, "crossval": val} | (extra or {}).get(dom, {})
        for kind, rows in lines.items():
            (d / f"{dom}_{kind}_kfold.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return d


def test_manifest_columns_and_metadata_round_trip(root, tmp_path):
    report = ingest(root, tmp_path / "out", val_fraction=0.34, seed=1, progress=False, max_pixels=MAX_PIXELS)
    table = pq.read_table(tmp_path / "out" / MANIFEST)
    assert table.schema.names == SCHEMA.names and table.num_rows == 36
    meta = read_manifest_meta(tmp_path / "out" / MANIFEST)
    assert meta["dataset"] == "pacs"  # the parent's name for an `images` folder
    assert meta["domains"] == list(DOMAINS) and meta["classes"] == ["circle", "square", "triangle"]
    assert meta["split"] == {"method": "seeded stratified", "val_fraction": 0.34, "seed": 1, "test": "all images of the held-out domain"}
    rows = table.to_pylist()
    first = rows[0]
    assert first["sha256"] == hashlib.sha256((root / first["path"]).read_bytes()).hexdigest()
    assert first["bytes"] == (root / first["path"]).stat().st_size
    assert {(r["width"], r["height"], r["mode"], r["converted"], r["error"]) for r in rows} == {(32, 32, "RGB", "", "")}
    assert all(r["label"] == meta["classes"].index(r["class"]) for r in rows)
    assert sum(r["split"] == "val" for r in rows) == 2 * 2 * 3  # 2 of 6 per domain and class
    assert json.loads((tmp_path / "out" / REPORT).read_text())["images"] == report["images"] == 36
    # deterministic: the same input gives the same bytes (DVC sees no change)
    ingest(root, tmp_path / "again", val_fraction=0.34, seed=1, progress=False, max_pixels=MAX_PIXELS)
    assert (tmp_path / "again" / MANIFEST).read_bytes() == (tmp_path / "out" / MANIFEST).read_bytes()


def test_official_split_defects_fixed_and_recorded(root, tmp_path):
    odd = root / "red_on_white" / "circle" / "éléphant à l'eau 1.png"  # spaces and non-ASCII
    shutil.copy(root / "red_on_white" / "circle" / "circle_000.png", odd)
    (root / "red_on_white" / "circle" / "circle_000.png").unlink()
    val = ["red_on_white/circle/circle_005.png 0"]  # label 0 disagrees with folder circle (1)
    val += ["red_on_white/square/square_005.png 2", "red_on_white/square/square_005.png 2"]  # duplicate line
    train = [f"red_on_white/circle/{odd.name} 1"] + [f"red_on_white/circle/circle_00{i}.png 1" for i in (1, 2, 3)]
    train += [f"red_on_white/{c}/{c}_00{i}.png {n}" for n, c in ((2, "square"), (3, "triangle")) for i in range(5)]
    train += ["red_on_white/triangle/triangle_005.png 3"]  # circle_004 is in neither list
    splits = _write_splits(root, tmp_path, {"red_on_white": {"train": train, "crossval": val}})
    report = ingest(root, tmp_path / "out", splits=splits, progress=False, max_pixels=MAX_PIXELS)
    fixes = "\n".join(report["fixes"])
    assert "red_on_white_crossval_kfold.txt:1: label 0 disagrees with folder 'circle'" in fixes
    assert "red_on_white_crossval_kfold.txt:3: duplicate of line 2 (red_on_white/square/square_005.png)" in fixes
    assert "red_on_white/circle/circle_004.png: in neither train nor crossval list, assigned to train" in fixes
    rows = {r["path"]: r for r in _rows(tmp_path / "out")}
    assert rows["red_on_white/circle/circle_005.png"]["label"] == 0 and rows["red_on_white/circle/circle_005.png"]["split"] == "val"
    assert rows[f"red_on_white/circle/{odd.name}"]["split"] == "train" and rows[f"red_on_white/circle/{odd.name}"]["error"] == ""
    meta = read_manifest_meta(tmp_path / "out" / MANIFEST)
    assert meta["split"]["method"] == "official split files" and meta["fixes"] == report["fixes"]


def test_test_list_is_checked_against_the_domain(root, tmp_path):
    files = sorted(p.relative_to(root).as_posix() for p in (root / "red_on_white").rglob("*.png"))
    splits = _write_splits(root, tmp_path, {"red_on_white": {"test": [f"{f} 1" for f in files[1:]]}})
    report = ingest(root, tmp_path / "out", splits=splits, progress=False, max_pixels=MAX_PIXELS)
    assert f"{files[0]}: not in red_on_white_test_kfold.txt" in "\n".join(report["fixes"])


def test_split_file_naming_a_missing_image_fails_and_keeps_previous_manifest(root, tmp_path):
    out = tmp_path / "out"
    ingest(root, out, progress=False, max_pixels=MAX_PIXELS)
    before = (out / MANIFEST).read_bytes()
    splits = _write_splits(root, tmp_path, {"yellow_on_blue": {"crossval": ["yellow_on_blue/circle/gone.png 1"]}})
    with pytest.raises(FileNotFoundError, match=r"yellow_on_blue_crossval_kfold.txt: lists yellow_on_blue/circle/gone.png"):
        ingest(root, out, splits=splits, progress=False, max_pixels=MAX_PIXELS)
    assert (out / MANIFEST).read_bytes() == before


def test_split_path_leaving_the_source_is_rejected(root, tmp_path):
    splits = _write_splits(root, tmp_path, {"red_on_white": {"crossval": ["red_on_white/../../secret.png 1"]}})
    with pytest.raises(ValueError, match=r"red_on_white_crossval_kfold.txt:1: path 'red_on_white/../../secret.png' leaves"):
        ingest(root, tmp_path / "out", splits=splits, progress=False, max_pixels=MAX_PIXELS)


def test_symlink_leading_outside_the_source_is_rejected(root, tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (32, 32)).save(outside)
    (root / "red_on_white" / "circle" / "link.png").symlink_to(outside)
    with pytest.raises(ValueError, match=r"red_on_white/circle/link.png' resolves to .*elsewhere.png, outside"):
        ingest(root, tmp_path / "out", progress=False, max_pixels=MAX_PIXELS)


def test_bad_images_are_recorded_not_fatal(root, tmp_path):
    folder = root / "red_on_white" / "circle"
    data = (folder / "circle_000.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image\n")
    ingest(root, tmp_path / "out", progress=False, max_pixels=MAX_PIXELS)
    err = {r["path"].rsplit("/", 1)[1]: r for r in _rows(tmp_path / "out")}
    assert "truncated" in err["truncated.png"]["error"]
    assert err["empty.jpg"]["error"] == "empty file" and err["empty.jpg"]["bytes"] == 0
    assert err["notes.jpg"]["error"] == "not an image format Pillow reads" and err["notes.jpg"]["width"] is None
    assert err["circle_000.png"]["error"] == ""


def test_grayscale_rgba_cmyk_palette_are_recorded_as_converted(root, tmp_path):
    folder = root / "yellow_on_blue" / "square"
    save_mode_variants(folder / "square_000.png")
    ingest(root, tmp_path / "out", progress=False, max_pixels=MAX_PIXELS)
    rows = {r["path"].rsplit("/", 1)[1]: r for r in _rows(tmp_path / "out")}
    for name, mode in (("gray.png", "L"), ("rgba.png", "RGBA"), ("cmyk.jpg", "CMYK"), ("palette.png", "P")):
        assert (rows[name]["mode"], rows[name]["converted"], rows[name]["error"]) == (mode, f"{mode}->RGB", "")
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["converted"]["yellow_on_blue/square/cmyk.jpg"] == "CMYK->RGB"


def test_empty_domain_fails_naming_it(root, tmp_path):
    (root / "blank" / "circle").mkdir(parents=True)
    with pytest.raises(ValueError, match="domain 'blank' .* has no images"):
        ingest(root, tmp_path / "out", progress=False, max_pixels=MAX_PIXELS)


def test_missing_class_is_left_to_validation(root, tmp_path):
    shutil.rmtree(root / "yellow_on_blue" / "triangle")
    ingest(root, tmp_path / "out", progress=False, max_pixels=MAX_PIXELS)
    rows = _rows(tmp_path / "out")
    assert {r["class"] for r in rows if r["domain"] == "yellow_on_blue"} == {"circle", "square"}
    assert read_manifest_meta(tmp_path / "out" / MANIFEST)["classes"] == ["circle", "square", "triangle"]


def _sums(root, path, prefix=""):
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {prefix}{p.relative_to(root).as_posix()}" for p in sorted(root.rglob("*.png"))]
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_sha256sums_verified_next_to_the_source_and_mismatch_names_the_file(root, tmp_path):
    sums = root.parent / "SHA256SUMS"  # PACS keeps it beside images/
    lines = _sums(root, sums)
    report = ingest(root, tmp_path / "out", progress=False, max_pixels=MAX_PIXELS)
    assert report["checksums"]["verified"] == 36 and report["checksums"]["unlisted"] == 0
    out = tmp_path / "out"
    before = (out / MANIFEST).read_bytes()
    bad = lines[4].split()[1]
    lines[4] = "0" * 64 + "  " + bad
    sums.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"SHA256SUMS: checksum mismatch for {bad}"):
        ingest(root, out, progress=False, max_pixels=MAX_PIXELS)
    assert (out / MANIFEST).read_bytes() == before
    sums.write_text("\n".join(lines[5:] + ["0" * 64 + "  red_on_white/circle/lost.png"]) + "\n")
    with pytest.raises(FileNotFoundError, match="red_on_white/circle/lost.png"):
        ingest(root, out, progress=False, max_pixels=MAX_PIXELS)


def test_sums_option_with_prefixed_paths(root, tmp_path):
    _sums(root, tmp_path / "custom.sums", prefix="images/")
    report = ingest(root, tmp_path / "out", sums=tmp_path / "custom.sums", progress=False, max_pixels=MAX_PIXELS)
    assert report["checksums"]["verified"] == 36


def test_find_new_domains(root, tmp_path):
    ingest(root, tmp_path / "out", progress=False, max_pixels=MAX_PIXELS)
    assert find_new_domains(root, tmp_path / "out" / MANIFEST) == []
    make_dataset(root, styles=("noisy_gray",), per_class=2, size=32)
    assert find_new_domains(root, tmp_path / "out" / MANIFEST) == ["noisy_gray"]


def test_cli_ingest_reports_and_fails_cleanly(root, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(root), "--out", str(tmp_path / "out"), "--no-progress", "--params", str(tmp_path / "none.yaml")])
    assert res.exit_code == 1 and "give --max-pixels" in res.output and "Traceback" not in res.output  # no params: say the limit
    res = runner.invoke(app, ["ingest", str(root), "--out", str(tmp_path / "out"), "--no-progress", "--params", str(tmp_path / "none.yaml"),
                              "--max-pixels", str(MAX_PIXELS)])
    assert res.exit_code == 0, res.output
    assert "36 images, 2 domains" in res.output and "split: seeded stratified" in res.output
    (tmp_path / "outside.png").write_bytes((root / "red_on_white" / "circle" / "circle_000.png").read_bytes())
    (root / "red_on_white" / "circle" / "link.png").symlink_to(tmp_path / "outside.png")
    res = runner.invoke(app, ["ingest", str(root), "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 1 and "red_on_white/circle/link.png" in res.output
