"""The Great Expectations gate on the manifest: what passes, what fails and how it is named, what survives."""

import json
from pathlib import Path
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_dataset, save_mode_variants
from PIL import Image
from typer.testing import CliRunner

from tasks import params as P
from tasks.cli import app
from bne.ingest import MANIFEST, ingest, validated_path
from tasks.validate import ValidationConfig, config_for, summary, validate_manifest

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)
NEAR_BITS = 32  # perceptual-hash bits across domains that warn (params.yaml validation.near_duplicate_bits)

CFG = ValidationConfig(min_per_class=5, min_size=32, near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS)
SUITE = ["--min-per-class", "5", "--min-size", "32", "--near-duplicate-bits", str(NEAR_BITS), "--max-pixels", str(MAX_PIXELS)]

DOMAINS = ("red_on_white", "yellow_on_blue")


@pytest.fixture
def root(tmp_path):
    return make_dataset(tmp_path / "src", styles=DOMAINS, per_class=6, size=32)


def _ingest(root, tmp_path):
    ingest(root, tmp_path / "data", name="toy", progress=False, max_pixels=MAX_PIXELS)
    return tmp_path / "data" / MANIFEST


def _failed(report):
    return {c["check"]: c for c in report["failures"]}


def test_clean_dataset_with_converted_modes_passes(root, tmp_path):
    folder = root / "yellow_on_blue" / "square"
    save_mode_variants(folder / "square_000.png")
    manifest = _ingest(root, tmp_path)
    report = validate_manifest(manifest, tmp_path / "reports", CFG)
    assert report["success"], summary(report)
    assert report["failures"] == [] and report["warnings"] == [] and "every image decodes" in report["passed"]
    saved = json.loads((tmp_path / "reports" / "toy" / "validation.json").read_text())
    assert saved["success"] and saved["rows"] == 40
    assert (tmp_path / "reports" / "toy" / "validation.md").read_text().startswith(f"validation of {manifest} (40 images): passed")
    assert validated_path(manifest).read_bytes() == manifest.read_bytes()


def test_bad_images_fail_naming_each_file(root, tmp_path):
    folder = root / "red_on_white" / "circle"
    data = (folder / "circle_000.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image\n")
    Image.new("RGB", (20, 40)).save(root / "yellow_on_blue" / "circle" / "tiny.png")
    report = validate_manifest(_ingest(root, tmp_path), tmp_path / "reports", CFG)
    assert not report["success"]
    failed = _failed(report)
    decode = failed["every image decodes"]
    assert decode["unexpected_count"] == 3
    assert {e["path"] for e in decode["examples"]} == {f"red_on_white/circle/{n}" for n in ("truncated.png", "empty.jpg", "notes.jpg")}
    assert all(e["domain"] == "red_on_white" and e["class"] == "circle" for e in decode["examples"])
    assert [e["path"] for e in failed["no empty files"]["examples"]] == ["red_on_white/circle/empty.jpg"]
    assert [e["path"] for e in failed["width at least 32 px"]["examples"]] == ["yellow_on_blue/circle/tiny.png"]
    assert "height at least 32 px" not in failed and "no nulls in width of decoded images" not in failed
    text = summary(report)
    assert "red_on_white/circle/truncated.png (domain red_on_white, class circle): error=OSError" in text
    assert not validated_path(tmp_path / "data" / MANIFEST).exists()


def test_cli_missing_class_fails_naming_domain_and_class(root, tmp_path):
    shutil.rmtree(root / "yellow_on_blue" / "triangle")
    manifest = _ingest(root, tmp_path)
    res = CliRunner().invoke(app, ["validate", str(manifest), "--reports", str(tmp_path / "reports"), "--params", str(tmp_path / "none.yaml"), *SUITE])
    assert res.exit_code == 1
    assert "error: every class in every domain (1)\n    domain=yellow_on_blue, class=triangle" in res.output
    report = json.loads((tmp_path / "reports" / "toy" / "validation.json").read_text())
    assert report["success"] is False
    assert _failed(report)["every class in every domain"]["examples"] == [{"domain": "yellow_on_blue", "class": "triangle"}]


def test_previous_validated_manifest_survives_a_failed_run(root, tmp_path):
    manifest = _ingest(root, tmp_path)
    assert validate_manifest(manifest, tmp_path / "reports", CFG)["success"]
    good = validated_path(manifest).read_bytes()
    (root / "red_on_white" / "square" / "broken.png").write_bytes(b"\x89PNG\r\n")
    manifest = _ingest(root, tmp_path)
    res = CliRunner().invoke(app, ["validate", str(manifest), "--reports", str(tmp_path / "reports"), "--params", str(tmp_path / "none.yaml"), *SUITE])
    assert res.exit_code == 1 and "red_on_white/square/broken.png" in res.output
    assert validated_path(manifest).read_bytes() == good
    assert json.loads((tmp_path / "reports" / "toy" / "validation.json").read_text())["success"] is False


def test_identical_content_across_domains_and_splits(root, tmp_path):
    shutil.copy(root / "red_on_white" / "circle" / "circle_000.png", root / "yellow_on_blue" / "circle" / "copy.png")
    manifest = _ingest(root, tmp_path)
    failed = _failed(validate_manifest(manifest, tmp_path / "reports", CFG))
    paths = {e["path"] for e in failed["no identical content across domains"]["examples"]}
    assert paths == {"red_on_white/circle/circle_000.png", "yellow_on_blue/circle/copy.png"}
    # the same content in train and val of one domain
    (root / "yellow_on_blue" / "circle" / "copy.png").unlink()
    for i in range(1, 6):
        shutil.copy(root / "red_on_white" / "square" / "square_000.png", root / "red_on_white" / "square" / f"square_00{i}.png")
    failed = _failed(validate_manifest(_ingest(root, tmp_path), tmp_path / "reports", CFG))
    assert "no identical content across domains" not in failed
    examples = failed["no identical content across train/val/test"]["examples"]
    assert {e["split"] for e in examples} == {"train", "val"} and all(e["class"] == "square" for e in examples)


def test_few_images_warn_and_configuration_must_match(root, tmp_path):
    manifest = _ingest(root, tmp_path)
    report = validate_manifest(manifest, tmp_path / "reports", ValidationConfig(min_per_class=7, min_size=32, near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS))
    assert report["success"] and report["warnings"][0]["unexpected_count"] == 6
    assert "warning: at least 7 images per domain and class (6)\n    domain=red_on_white, class=circle, value=6" in summary(report)
    cfg = ValidationConfig(min_per_class=5, min_size=32, domains=("red_on_white", "yellow_on_blue", "green_on_black"), classes=("circle", "square", "triangle"), near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS)
    failed = _failed(validate_manifest(manifest, tmp_path / "reports", cfg))
    assert list(failed) == ["domains match the configuration"]
    assert failed["domains match the configuration"]["examples"] == [{"missing": "green_on_black"}]


def test_configured_domains_apply_only_to_the_configured_dataset(root, tmp_path):
    """Issue 15 item 7: params.yaml's PACS domains are not applied to another dataset's manifest."""
    manifest = _ingest(root, tmp_path)  # dataset "toy", domains red_on_white and yellow_on_blue
    p = P.load(Path(__file__).resolve().parents[1] / "params.yaml")
    cfg, note = config_for(p, manifest)
    assert cfg.domains is None and "not the configured 'pacs'" in note
    report = validate_manifest(manifest, tmp_path / "reports", cfg, note=note)
    assert report["success"] and "validated on its own" in summary(report)
    same = P.load(Path(__file__).resolve().parents[1] / "params.yaml", ["dataset.name=toy"])
    cfg, note = config_for(same, manifest)
    assert cfg.domains == tuple(same.dataset.domains) and not note
    assert not validate_manifest(manifest, tmp_path / "reports", cfg)["success"]  # PACS domains expected


def test_cli_standalone_needs_the_suite_settings(root, tmp_path):
    manifest = _ingest(root, tmp_path)
    res = CliRunner().invoke(app, ["validate", str(manifest), "--params", str(tmp_path / "none.yaml")])
    assert res.exit_code == 1 and "--min-per-class" in res.output


def test_nulls_labels_and_duplicate_paths_in_an_edited_manifest(root, tmp_path):
    manifest = _ingest(root, tmp_path)
    table = pq.read_table(manifest)
    rows = table.to_pylist()
    rows[0]["label"] = 9
    rows[1]["sha256"] = None
    rows[2]["path"] = rows[3]["path"]
    rows[4]["width"] = None
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), manifest)
    failed = _failed(validate_manifest(manifest, tmp_path / "reports", CFG))
    assert failed["labels within 0..2"]["examples"][0]["path"] == rows[0]["path"]
    assert failed["label matches class"]["unexpected_count"] == 1
    assert failed["no nulls in sha256"]["examples"][0]["path"] == rows[1]["path"]
    assert failed["unique paths"]["unexpected_count"] == 2
    assert failed["no nulls in width of decoded images"]["examples"][0]["path"] == rows[4]["path"]


def test_manifest_missing_a_column_is_one_line_before_any_work(root, tmp_path):
    manifest = _ingest(root, tmp_path)
    pq.write_table(pq.read_table(manifest).drop(["sha256"]), manifest)
    with pytest.raises(ValueError, match=r"columns \['sha256'\] missing"):
        validate_manifest(manifest, tmp_path / "reports", CFG)
    assert not (tmp_path / "reports").exists()
    result = CliRunner().invoke(app, ["validate", str(manifest), "--reports", str(tmp_path / "r2"), "--params", str(tmp_path / "none.yaml"), *SUITE])
    assert result.exit_code != 0 and "sha256" in result.output and "Traceback" not in result.output
