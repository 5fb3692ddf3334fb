"""Issue 18: every stage trusts nothing it did not just check.

Tampered manifests through validation and every stage that reads the validated one; the content-addressed cache
and ``--verify``; ``bne predict``'s decode rules, model refusal and batches; odd file names and huge images at
ingest; storage passwords kept out of records. Synthetic images, seconds each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_dataset, options, spec
from PIL import Image
from typer.testing import CliRunner

import bne.data
import bne.ingest
from bne.data import DomainArrays, build_cache, decode_image, load_cache, load_folder_dataset
from bne.ingest import MANIFEST, META_KEY, SCHEMA, dataset_from_manifest, ingest, record_path, write_validation_record
from tasks import cache, embed, evaluate, final, report, stats, train, validate
from tasks import ingest as ingest_stage
from tasks import params as P
from tasks.cli import app
from tasks.paths import Layout
from tasks.validate import ValidationConfig, validate_manifest

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)
NEAR_BITS = 32  # perceptual-hash bits across domains that warn (params.yaml validation.near_duplicate_bits)

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("red_on_white", "yellow_on_blue", "noisy_gray")
TARGET = STYLES[-1]


def _view(p, module):
    return p.scoped(module.PARAMS, stage=module.__name__.split(".")[-1])


def _png(path: Path, color=(200, 30, 30), size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


# ------------------------------------------------------------------------------------- 1. the manifest loader


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A synthetic project: images, a copy of them elsewhere, an image outside the root; ingested, validated, cached."""
    tmp = tmp_path_factory.mktemp("project")
    images = make_dataset(tmp / "images", styles=STYLES, per_class=4, size=32)
    shutil.copytree(images, tmp / "images_copy")
    _png(tmp / "outside.png")
    params = tmp / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    P.write_overrides(params, [
        "dataset.name=syn", f"dataset.root={images}", "dataset.splits=''", "dataset.val_fraction=0.25",
        f"dataset.domains=[{', '.join(STYLES)}]", f"dataset.folds=[{TARGET}]", "train.resolution=32", "train.device=cpu",
        "train.seeds=[0]", "model.weights=none",
    ])
    p = P.load(params)
    layout = Layout(tmp / "proj", "syn")
    ingest_stage.run(_view(p, ingest_stage), layout, tmp, progress=False)
    assert validate.run(_view(p, validate), layout, layout.root / "reports")["success"]
    cache.run(_view(p, cache), layout, progress=False)
    return p, layout, tmp


@pytest.fixture
def fresh(project, tmp_path):
    """The project's data copied for one test (tampering it leaves the module's intact)."""
    p, layout, tmp = project
    new = Layout(tmp_path / "proj", layout.dataset)
    shutil.copytree(layout.root, new.root)
    return p, new, tmp


def _rewrite(src: Path, dst: Path, rows=None, meta=None) -> None:
    """``src``'s manifest with its rows and/or metadata changed by the given functions, written to ``dst``."""
    table = pq.read_table(src)
    m = json.loads(table.schema.metadata[META_KEY])
    r = table.to_pylist()
    r = rows(r) if rows else r
    m = meta(m) if meta else m
    pq.write_table(pa.Table.from_pylist(r, schema=SCHEMA.with_metadata({META_KEY: json.dumps(m)})), dst)


def _set(i: int, **values):
    def f(rows):
        rows[i] = {**rows[i], **values}
        return rows
    return f


def _swap_classes(meta):
    c = meta["classes"]
    return {**meta, "classes": [c[1], c[0], *c[2:]]}


#: name: (rows change, metadata change, the validation check that fails, what the loader says)
TAMPERS = {
    "parent path to a real image": (_set(0, path="../outside.png"), None, "paths are relative and inside the source", "not a relative path inside"),
    "deep parent path": (_set(0, path="../../../etc/passwd"), None, "paths are relative and inside the source", "not a relative path inside"),
    "absolute path": (_set(0, path="/etc/passwd"), None, "paths are relative and inside the source", "not a relative path inside"),
    "link out of the root": (_set(0, path=f"{STYLES[0]}/circle/link.png"), None, "paths are relative and inside the source", "outside the dataset root"),
    "wrong label": (lambda rows: _set(0, label=(rows[0]["label"] + 1) % 3)(rows), None, "label matches class", "but class 'circle' is label 0"),
    "label out of range": (_set(0, label=99), None, "labels within 0..2", "label 99"),
    "swapped class list": (None, _swap_classes, "label matches class", "is label 1 in the manifest's classes"),
    "duplicate row": (lambda rows: rows + [rows[0]], None, "unique paths", "duplicate of row 0"),
    "row moved to another domain": (_set(0, domain=STYLES[1]), None, "path is <domain>/<class>/<file> of its row", "path is not <domain>/<class>/<file>"),
    "source moved to another folder": (None, "copy", "source is the configured dataset.root", "is not the dataset.root"),
}


def _apply(name, tmp, src, dst):
    rows, meta, _, _ = TAMPERS[name]
    if meta == "copy":
        meta = lambda m: {**m, "source": str(tmp / "images_copy")}  # noqa: E731
    _rewrite(src, dst, rows, meta)


@pytest.fixture
def link(project):
    """``<domain>/circle/link.png`` inside the root, a link to an image outside it (ingest would refuse it)."""
    _, _, tmp = project
    f = tmp / "images" / STYLES[0] / "circle" / "link.png"
    f.symlink_to(tmp / "outside.png")
    yield f
    f.unlink()


def _readers(p, layout):
    """Every stage that reads the validated manifest, as (name, call)."""
    return [
        ("cache", lambda: cache.run(_view(p, cache), layout, progress=False)),
        ("train", lambda: train.run(_view(p, train), layout, TARGET, progress=False, log=lambda m: None)),
        ("stats", lambda: stats.run(_view(p, stats), layout, TARGET, log=lambda m: None)),
        ("embed", lambda: embed.run(_view(p, embed), layout, TARGET, progress=False, log=lambda m: None)),
        ("evaluate", lambda: evaluate.run(_view(p, evaluate), layout, TARGET, progress=False, log=lambda m: None)),
        ("final", lambda: final.run(_view(p, final), layout, progress=False, log=lambda m: None)),
        ("report", lambda: report.run(_view(p, report), layout, log=lambda m: None)),
    ]


def _outputs(layout) -> set[str]:
    return {str(f.relative_to(layout.root)) for f in layout.root.rglob("*")}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_a_tampered_manifest_is_refused_by_validation_and_every_stage(name, fresh, link):
    p, layout, tmp = fresh
    _, _, check, says = TAMPERS[name]
    validated = layout.manifest.read_bytes()
    cached = {f: f.read_bytes() for f in layout.cache(32).iterdir()}

    # validation: fails naming the check (and the row), keeps the last validated copy
    _apply(name, tmp, layout.ingest / MANIFEST, layout.ingest / MANIFEST)
    report = validate.run(_view(p, validate), layout, layout.root / "reports")
    failed = {c["check"]: c for c in report["failures"]}
    assert not report["success"] and check in failed, (name, list(failed))
    if TAMPERS[name][0] is not None:  # a row: named in the examples
        assert any("path" in e for e in failed[check]["examples"]), failed[check]
    assert layout.manifest.read_bytes() == validated

    # the validated copy edited after validation: every reader refuses before any work
    before = _outputs(layout)
    _apply(name, tmp, layout.manifest, layout.manifest)
    for stage, call in _readers(p, layout):
        with pytest.raises(ValueError, match="edited after validation"):
            call()
    # ... and with the record forged to match: the rows are re-checked on open
    write_validation_record(layout.manifest, {k: v for k, v in json.loads(record_path(layout.manifest).read_text()).items()
                                              if k not in ("manifest", "sha256")})
    for stage, call in _readers(p, layout):
        with pytest.raises(ValueError, match=says) as e:
            call()
        assert "\n" not in str(e.value), stage
    assert _outputs(layout) == before, "a stage wrote something"
    assert {f: f.read_bytes() for f in layout.cache(32).iterdir()} == cached


def test_cli_stage_on_an_edited_manifest_is_one_line(fresh):
    p, layout, tmp = fresh
    _apply("parent path to a real image", tmp, layout.manifest, layout.manifest)
    res = CliRunner().invoke(app, ["train", "--target", TARGET, "--params", str(tmp / "params.yaml"), "--root", str(layout.root),
                                   "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().count("\n") == 0 and "edited after validation" in res.output


def test_stages_refuse_a_manifest_that_never_passed_validation(fresh):
    p, layout, _ = fresh
    record_path(layout.manifest).unlink()
    for stage, call in _readers(p, layout):
        with pytest.raises(ValueError, match="not a manifest that passed `bne validate`"):
            call()


def test_cache_refuses_a_dataset_root_other_than_the_validated_one(fresh):
    p, layout, tmp = fresh
    moved = P.from_dict(p.model_dump() | {"dataset": p.dataset.model_dump() | {"root": str(tmp / "images_copy")}})
    with pytest.raises(ValueError, match="validated for dataset.root .*rerun the ingest and validate"):
        cache.run(_view(moved, cache), layout, progress=False)


def test_validation_records_the_copy_it_wrote(project):
    p, layout, _ = project
    rec = json.loads(record_path(layout.manifest).read_text())
    assert rec["sha256"] == bne.ingest.manifest_sha256(layout.manifest)
    assert rec["dataset"] == "syn" and rec["dataset_root"] == p.dataset.root and rec["source"] == p.dataset.root
    assert layout.manifest.read_bytes() == (layout.ingest / MANIFEST).read_bytes()  # the copy is byte-identical


# --------------------------------------------------------------------------------- 2. content-addressed cache


@pytest.fixture
def small(tmp_path):
    """A small dataset, ingested and validated; returns (source, validated manifest)."""
    src = make_dataset(tmp_path / "src", styles=STYLES[:2], per_class=3, size=32)

    def refresh():
        ingest(src, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)
        report = validate_manifest(tmp_path / "m" / MANIFEST, tmp_path / "reports", ValidationConfig(min_per_class=1, min_size=8, near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS),
                                   tmp_path / "v" / MANIFEST)
        assert report["success"], report["failures"]
        return dataset_from_manifest(tmp_path / "v" / MANIFEST)

    return src, refresh


@pytest.fixture
def decodes(monkeypatch):
    """The files the cache decodes."""
    seen = []
    real = bne.data.decode_bytes

    def spy(data, size, where, **kw):
        seen.append(Path(where).name)
        return real(data, size, where, **kw)

    monkeypatch.setattr(bne.data, "decode_bytes", spy)
    return seen


def test_a_changed_image_is_decoded_again_and_only_it(small, tmp_path, decodes):
    src, refresh = small
    ds = refresh()
    out = build_cache(ds, 16, tmp_path / "c", workers=2, progress=False, max_pixels=MAX_PIXELS)
    assert len(decodes) == len(ds.samples)
    decodes.clear()
    build_cache(ds, 16, out, workers=2, progress=False, max_pixels=MAX_PIXELS)
    assert decodes == []  # unchanged: nothing decoded
    changed = ds.of(STYLES[1])[2]
    _png(src / changed.path, color=(0, 255, 0))  # new content, same path
    ds = refresh()
    build_cache(ds, 16, out, workers=2, progress=False, max_pixels=MAX_PIXELS)
    assert decodes == [Path(changed.path).name]
    arrays = load_cache(ds, out)
    np.testing.assert_array_equal(arrays[STYLES[1]].images[2], decode_image(src / changed.path, 16, max_pixels=MAX_PIXELS))
    assert (arrays[STYLES[1]].images[2] == [0, 255, 0]).all()
    index = json.loads((out / "index.json").read_text())
    assert index["domains"][STYLES[1]]["sha256"][2] == ds.of(STYLES[1])[2].sha256 and index["decode"] == bne.data.DECODE
    decodes.clear()
    build_cache(ds, 24, tmp_path / "c", workers=2, progress=False, max_pixels=MAX_PIXELS)  # another size: every image again
    assert len(decodes) == len(ds.samples)


def test_a_file_changed_after_ingest_is_refused(small, tmp_path):
    src, refresh = small
    ds = refresh()
    out = build_cache(ds, 16, tmp_path / "c", workers=2, progress=False, max_pixels=MAX_PIXELS)
    swapped = ds.of(STYLES[0])[1]
    _png(src / swapped.path, color=(1, 2, 3))  # not re-ingested
    build_cache(ds, 16, out, workers=2, progress=False, max_pixels=MAX_PIXELS)  # the cache is keyed on the manifest: still the ingested pixels
    with pytest.raises(ValueError, match=f"{swapped.path}: content changed since ingest"):
        build_cache(ds, 16, out, workers=2, progress=False, verify=True, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match=f"{swapped.path}: content changed since ingest"):  # decoding checks the bytes
        build_cache(ds, 16, tmp_path / "fresh", workers=2, progress=False, max_pixels=MAX_PIXELS)
    res = CliRunner().invoke(app, ["cache", str(tmp_path / "v" / MANIFEST), "--out", str(out), "--size", "16", "--verify", "--no-progress"])
    assert res.exit_code == 1 and "content changed since ingest" in res.output and "Traceback" not in res.output


def test_a_cache_of_other_images_is_not_loaded(small, tmp_path):
    src, refresh = small
    ds = refresh()
    out = build_cache(ds, 16, tmp_path / "c", workers=2, progress=False, max_pixels=MAX_PIXELS)
    _png(src / ds.samples[0].path, color=(9, 9, 9))
    with pytest.raises(ValueError, match="holds other images than the manifest"):
        load_cache(refresh(), out)
    (out / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_cache(ds, out)


def test_folder_datasets_are_hashed_for_the_key(synthetic_root, tmp_path, decodes):
    ds = load_folder_dataset(synthetic_root)  # no hashes from a folder scan
    out = build_cache(ds, 8, tmp_path / "c", workers=2, progress=False, max_pixels=MAX_PIXELS)
    index = json.loads((out / "index.json").read_text())
    first = ds.samples[0]
    assert index["domains"][first.domain]["sha256"][0] == bne.data._sha256(synthetic_root / first.path)
    decodes.clear()
    build_cache(ds, 8, out, workers=2, progress=False, max_pixels=MAX_PIXELS)
    assert decodes == []


# --------------------------------------------------------------------------------------------- 3. predict


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved model folder as the final stage writes it (untrained weights; enough for the checks here)."""
    from bne.evaluate import options_dict
    from bne.model import DGNet
    from bne.predict import save_model, stats_tables, write_stats

    out = tmp_path_factory.mktemp("model")
    s = spec(domains=("a", "b"), weights="none")
    torch.manual_seed(0)
    model = DGNet(s).eval()
    rng = np.random.default_rng(0)
    arrays = [DomainArrays(d, rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), np.zeros(4, np.int64), np.arange(4), np.arange(0))
              for d in ("a", "b")]
    tables = stats_tables(model, arrays, ["a", "b"], "toy", 4, torch.device("cpu"))
    info = save_model(model, out, {"dataset": "toy", "spec": asdict(s), "classes": ["circle", "square", "triangle"],
                                   "domains": ["a", "b"], "resolution": 32, "options": options_dict(options())})
    write_stats(out / "stats.parquet", tables, {"dataset": "toy", "held_out": "none", "checkpoint_sha256": info["model_sha256"],
                                                "norm": s.norm, "created_at": info["created_at"]})
    return out


def _sixteen_bit(path: Path) -> Path:
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_predict_refuses_a_16_bit_png_with_a_word(model_dir, tmp_path):
    from bne.predict import Predictor

    good, deep = _png(tmp_path / "good.png"), _sixteen_bit(tmp_path / "deep.png")
    rows, errors = Predictor(model_dir, batch=4, device=torch.device("cpu")).predict_files([good, deep], max_pixels=MAX_PIXELS)
    assert [r["file"] for r in rows] == [str(good)]
    assert errors == [{"file": str(deep), "error": f"cannot decode image {deep}: mode I;16 (16-bit or floating-point) has no "
                                                    "faithful RGB conversion; save it as 8-bit"}]
    res = CliRunner().invoke(app, ["predict", str(deep), "--model", str(model_dir), "--params", str(tmp_path / "none.yaml"),
                                   "--max-pixels", str(MAX_PIXELS), "--csv", str(tmp_path / "p.csv")])
    assert res.exit_code == 1 and "deep.png" in res.output and "mode I;16" in res.output and "nothing predicted" in res.output
    assert not (tmp_path / "p.csv").exists()  # never a header-only CSV


def test_predict_on_a_folder_without_images_is_exit_1_and_no_file(model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    res = CliRunner().invoke(app, ["predict", str(empty), "--model", str(model_dir), "--params", str(tmp_path / "none.yaml"),
                                   "--max-pixels", str(MAX_PIXELS), "--csv", str(tmp_path / "p.csv")])
    assert res.exit_code == 1 and "no image files in" in res.output and str(empty) in res.output
    assert "Traceback" not in res.output and not (tmp_path / "p.csv").exists()


def test_predict_goes_through_a_folder_in_batches(model_dir, tmp_path, monkeypatch):
    from bne.predict import Predictor

    files = [_png(tmp_path / f"{i}.png", color=(40 * i, 100, 255 - 30 * i)) for i in range(7)]
    pred = Predictor(model_dir, batch=4, device=torch.device("cpu"))
    whole, _ = pred.predict_files(files, max_pixels=MAX_PIXELS)
    sizes = []
    real = pred.predict_arrays
    monkeypatch.setattr(pred, "predict_arrays", lambda images: sizes.append(len(images)) or real(images))
    chunked, _ = pred.predict_files(files, max_pixels=MAX_PIXELS, chunk=3)
    assert sizes == [3, 3, 1]
    assert [r["file"] for r in chunked] == [r["file"] for r in whole]
    for a, b in zip(chunked, whole):
        assert a["class"] == b["class"] and abs(a["probability"] - b["probability"]) < 1e-3


@pytest.mark.parametrize("content", ["pickle", "tensor", "wrong keys"])
def test_a_crafted_model_is_refused_in_one_line(model_dir, tmp_path, content):
    from bne.predict import Predictor

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    obj = {"pickle": Evil(), "tensor": torch.zeros(3), "wrong keys": {"x": torch.zeros(1)}}[content]
    torch.save(obj, bad / "model.pt")
    with pytest.raises(ValueError, match="model.pt: ") as e:
        Predictor(bad, batch=4, device=torch.device("cpu"))
    assert "\n" not in str(e.value)
    res = CliRunner().invoke(app, ["predict", str(_png(tmp_path / "x.png")), "--model", str(bad), "--params", str(tmp_path / "none.yaml"),
                                   "--max-pixels", str(MAX_PIXELS)])
    assert res.exit_code == 1 and "Traceback" not in res.output and res.output.strip().startswith("error: ")
    assert res.output.strip().count("\n") == 0


# ------------------------------------------------------------------------------- 4. odd names, huge images


def test_odd_file_names_are_row_errors_naming_the_file(tmp_path):
    src = make_dataset(tmp_path / "src", styles=STYLES[:2], per_class=3, size=32)
    folder = src / STYLES[0] / "circle"
    shutil.copy(folder / "circle_000.png", folder / "back\\slash.png")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.png"), "wb") as f:
        f.write((folder / "circle_001.png").read_bytes())
    report = ingest(src, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)
    assert report["undecodable"] == {
        f"{STYLES[0]}/circle/back\\slash.png": "file name contains a backslash (a path separator on Windows): rename the file",
        f"{STYLES[0]}/circle/bad\\xff.png": "file name is not valid UTF-8: rename the file",
    }
    json.loads((tmp_path / "m" / "ingest_report.json").read_text(encoding="utf-8"))  # valid UTF-8 JSON
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "m" / MANIFEST).to_pylist()}
    assert rows[f"{STYLES[0]}/circle/bad\\xff.png"]["sha256"] == bne.data._sha256(folder / "circle_001.png")
    result = validate_manifest(tmp_path / "m" / MANIFEST, tmp_path / "r", ValidationConfig(min_per_class=1, min_size=8, near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS))
    named = [e["path"] for c in result["failures"] for e in c["examples"] if "path" in e]
    assert not result["success"] and set(named) == set(report["undecodable"])


def test_an_odd_folder_name_is_refused_naming_it(tmp_path):
    src = make_dataset(tmp_path / "src", styles=STYLES[:2], per_class=2, size=32)
    os.rename(os.fsencode(src / STYLES[1]), os.path.join(os.fsencode(src), b"dom\xfe"))
    with pytest.raises(ValueError, match=r"dom\\xfe: folder name is not valid UTF-8; rename it"):
        ingest(src, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape; no pixel data to speak of)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_image_is_refused_from_its_header(tmp_path):
    src = make_dataset(tmp_path / "src", styles=STYLES[:2], per_class=2, size=32)
    huge = _png_header_only(src / STYLES[0] / "circle" / "huge.png", 10000, 10000)
    _png_header_only(src / STYLES[0] / "circle" / "bomb.png", 20000, 20000)  # above Pillow's own limit too
    report = ingest(src, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)
    limit = f"10000x10000 = 100000000 pixels, above the maximum of {MAX_PIXELS} pixels (dataset.max_pixels)"
    assert report["undecodable"][f"{STYLES[0]}/circle/huge.png"] == f"ValueError: {limit}"
    bomb = report["undecodable"][f"{STYLES[0]}/circle/bomb.png"]
    assert bomb.startswith("DecompressionBombError: ") and bomb.endswith(f"(above the maximum of {MAX_PIXELS} pixels (dataset.max_pixels) too)")
    with pytest.raises(ValueError, match=re.escape(f"cannot decode image {huge}: {limit}")):
        decode_image(huge, 16, max_pixels=MAX_PIXELS)


def test_a_large_jpeg_is_decoded_in_draft(tmp_path, monkeypatch):
    """Above DRAFT_PIXELS a JPEG decodes at a reduced DCT scale: the size recorded is the file's, the cache close."""
    from PIL import JpegImagePlugin

    img = Image.fromarray(np.kron(np.random.default_rng(0).integers(0, 255, (16, 16, 3)), np.ones((50, 50, 1))).astype(np.uint8))
    path = tmp_path / "big.jpg"
    img.save(path, quality=95)  # 800 x 800
    full = decode_image(path, 32, max_pixels=MAX_PIXELS)
    scales = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        r = real(self, mode, size)
        scales.append(self.decoderconfig[0])
        return r

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    monkeypatch.setattr(bne.data, "DRAFT_PIXELS", 100 * 100)
    monkeypatch.setattr(bne.ingest, "DRAFT_PIXELS", 100 * 100)
    drafted = decode_image(path, 32, max_pixels=MAX_PIXELS)
    facts = bne.ingest.inspect_image(path, MAX_PIXELS)
    assert scales == [8, 8]  # 800 // 32 = 25 -> 1/8 in the cache; 1/8 at ingest
    assert (facts.width, facts.height, facts.mode, facts.error) == (800, 800, "RGB", "")
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 6


# --------------------------------------------------------------------------------------- 5. secrets redacted


def test_storage_passwords_are_redacted():
    from tasks.tune import redact

    assert redact("postgresql://user:secret@db.example:5432/optuna") == "postgresql://user:***@db.example:5432/optuna"
    assert redact("mysql+pymysql://u:p@h/d?ssl=1&password=x") == "mysql+pymysql://u:***@h/d?ssl=1&password=***"
    for plain in ("sqlite:///data/s.db", "data/tune/x/seed0.journal", "postgresql://user@host/db", ""):
        assert redact(plain) == plain


def test_a_study_record_never_holds_the_password(monkeypatch):
    import optuna

    from tasks import tune

    monkeypatch.setattr(tune, "open_storage", lambda storage: optuna.storages.InMemoryStorage())
    r = tune.tune_training(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2, seed=0,
                           storage="postgresql://user:secret@db.example/optuna", study_name="s")
    assert r["storage"] == "postgresql://user:***@db.example/optuna"
    assert "secret" not in json.dumps(r)


# ------------------------------------------------------------------------------- 6. the pixel limit, a parameter


def test_the_pixel_limit_is_dataset_max_pixels_at_ingest_and_in_predict(project, model_dir, tmp_path):
    """A limit below the images' 32 x 32: ingest records each as a row error, predict refuses it, with one reason."""
    _, _, tmp = project
    params = tmp_path / "params.yaml"
    shutil.copy(tmp / "params.yaml", params)
    P.write_overrides(params, ["dataset.max_pixels=1000"])
    small = P.load(params)
    assert small.dataset.max_pixels == 1000
    layout = Layout(tmp_path / "proj", "syn")
    report = ingest_stage.run(_view(small, ingest_stage), layout, tmp_path, progress=False)
    reason = "32x32 = 1024 pixels, above the maximum of 1000 pixels (dataset.max_pixels)"
    assert report["undecodable"] and set(report["undecodable"].values()) == {f"ValueError: {reason}"}
    image = next(iter(sorted((tmp / "images").rglob("*.png"))))
    res = CliRunner().invoke(app, ["predict", str(image), "--model", str(model_dir), "--params", str(params)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"skipped {image}: cannot decode image {image}: {reason}" in res.output and "nothing predicted" in res.output
    res = CliRunner().invoke(app, ["predict", str(image), "--model", str(model_dir), "--params", str(tmp_path / "none.yaml")])
    assert res.exit_code == 1 and "give --max-pixels" in res.output  # no params file: the limit must be given
    res = CliRunner().invoke(app, ["predict", str(image), "--model", str(model_dir), "--params", str(tmp_path / "none.yaml"),
                                   "--max-pixels", "0"])
    assert res.exit_code == 1 and "--max-pixels 0: must be a positive" in res.output


def test_the_stages_that_decode_declare_the_pixel_limit():
    from tasks import extend

    for module in (ingest_stage, validate, cache, extend):
        assert "dataset.max_pixels" in module.PARAMS, module.__name__
    assert P.read_raw(ROOT / "params.yaml")["dataset"]["max_pixels"] > 0
    assert not hasattr(bne.data, "MAX_PIXELS")  # one value, in params.yaml: no default of the library's


# ------------------------------------------------------------------------- 7. near-duplicates across domains


def _picture(seed: int, size: int = 96) -> Image.Image:
    """A smooth random picture (blurred noise in colour): what a photo looks like to a perceptual hash."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)  # detail at several scales (a flat blur hashes unstably)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _near_dup_dataset(root: Path, twins: dict[str, tuple[int, str, dict]]) -> Path:
    """Two domains x two classes, three different pictures each; ``twins``: extra files re-encoding a picture."""
    seed = 100
    for dom in ("photo", "art"):
        for cls in ("cat", "dog"):
            for i in range(3):
                seed += 1
                path = root / dom / cls / f"{cls}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _picture(seed).save(path)
    for rel, (seed_of, fmt, kw) in twins.items():
        img = _picture(seed_of)
        if "scale" in kw:
            img = img.resize((int(img.width * kw["scale"]), int(img.height * kw["scale"])), Image.Resampling.BILINEAR)
        img.save(root / rel, fmt, **{k: v for k, v in kw.items() if k != "scale"})
    return root


def _near_dup_check(report: dict) -> dict | None:
    return next((c for c in report["warnings"] if c["check"].startswith("no near-duplicate pictures across domains")), None)


def test_the_same_picture_re_encoded_in_two_domains_is_a_warning_naming_both(tmp_path):
    # photo/cat/cat_0.png is picture 101; art gets it as a JPEG at quality 40, and resized to 70 %
    src = _near_dup_dataset(tmp_path / "src", {"art/dog/copy_q40.jpg": (101, "JPEG", {"quality": 40}),
                                               "art/cat/copy_small.jpg": (101, "JPEG", {"quality": 85, "scale": 0.7})})
    ingest(src, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)
    manifest = (tmp_path / "m" / MANIFEST).read_bytes()
    cfg = ValidationConfig(min_per_class=1, min_size=8, near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS)
    report = validate_manifest(tmp_path / "m" / MANIFEST, tmp_path / "r", cfg, tmp_path / "v" / MANIFEST)
    assert report["success"]  # a warning, not a failure: the validated copy is written, byte-identical
    assert (tmp_path / "v" / MANIFEST).read_bytes() == manifest == (tmp_path / "m" / MANIFEST).read_bytes()
    check = _near_dup_check(report)
    assert check is not None and check["severity"] == "warning" and check["unexpected_count"] == 2
    pairs = {frozenset((e["path"], e["near_duplicate"])) for e in check["examples"]}
    assert pairs == {frozenset(("photo/cat/cat_0.png", "art/dog/copy_q40.jpg")),
                     frozenset(("photo/cat/cat_0.png", "art/cat/copy_small.jpg"))}
    assert all(e["bits"] <= NEAR_BITS and {e["domain"], e["its_domain"]} == {"photo", "art"} for e in check["examples"])
    text = (tmp_path / "r" / report["dataset"] / "validation.md").read_text()
    assert "warning: no near-duplicate pictures across domains" in text
    assert "art/dog/copy_q40.jpg" in text and "photo/cat/cat_0.png" in text


def test_different_pictures_and_twins_within_a_domain_give_no_warning(tmp_path):
    src = _near_dup_dataset(tmp_path / "src", {"photo/dog/same_domain.jpg": (101, "JPEG", {"quality": 40})})
    ingest(src, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)
    cfg = ValidationConfig(min_per_class=1, min_size=8, near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS)
    report = validate_manifest(tmp_path / "m" / MANIFEST, tmp_path / "r", cfg)
    assert report["success"] and _near_dup_check(report) is None
    assert "no near-duplicate pictures across domains (perceptual hashes within 32 of 256 bits)" in report["passed"]


def test_byte_identical_copies_stay_an_error_not_also_a_near_duplicate(tmp_path):
    src = _near_dup_dataset(tmp_path / "src", {})
    shutil.copy(src / "photo" / "cat" / "cat_0.png", src / "art" / "cat" / "copy.png")
    ingest(src, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)
    cfg = ValidationConfig(min_per_class=1, min_size=8, near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS)
    report = validate_manifest(tmp_path / "m" / MANIFEST, tmp_path / "r", cfg)
    assert not report["success"] and "no identical content across domains" in {c["check"] for c in report["failures"]}
    assert _near_dup_check(report) is None


def test_near_pairs_compares_in_chunks_across_groups_only():
    from bne.dedup import WORDS, near_pairs

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, (700, WORDS), dtype=np.uint64)
    hashes[650] = hashes[3]
    hashes[650, 0] ^= np.uint64(0b111)  # 3 bits from row 3
    hashes[10] = hashes[3]  # identical, same group as row 3
    groups = ["a"] * 600 + ["b"] * 100
    assert near_pairs(hashes, groups, 5, chunk=64) == [(3, 650, 3), (10, 650, 3)]
    assert near_pairs(hashes, groups, 2, chunk=64) == []
    assert near_pairs(hashes, groups, 5, skip=[i == 650 for i in range(700)]) == []


# ----------------------------------------------------------------------------------------- 8. torn artifacts


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _branch_outputs(path: Path) -> Path:
    from bne.evaluate import BranchOutputs

    BranchOutputs(torch.rand(2, 4, 3), torch.zeros(4, dtype=torch.int64), {("per_branch", "running", "w2"): torch.rand(2, 4, 5)}).save(path)
    return path


def _parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"domain": ["a"] * 64, "mean": np.arange(64.0)}), path)
    return path


def _json(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seeds": {"0": {"bne": {"model_sha256": "0" * 64}}}, "note": "é" * 40}))
    return path


def _npy(path: Path) -> Path:
    from bne.io import save_npy

    save_npy(path, np.zeros(64, dtype=np.int64))
    return path


#: name: (make the torn file (layout, model folder) -> its path, the command, the stage the message names)
TORN = {
    "json: a fold's training record": (lambda lay, m: _truncate(_json(lay.fold(TARGET).train() / "train.json")),
                                       ["stats", "extract", "--target", TARGET], "train"),
    "json: an evaluation record": (lambda lay, m: _truncate(_json(lay.fold(TARGET).eval() / "fold.json")), ["report"], "evaluate"),
    "json: a model description": (lambda lay, m: _truncate(m / "model.json"), ["predict", "MODEL_IMAGE", "--model", "MODEL"], "final"),
    "npz: source-validation outputs": (lambda lay, m: (_npy(lay.fold(TARGET).embed(0) / "val_domains.npy"),
                                                       _truncate(_branch_outputs(lay.fold(TARGET).embed(0) / "val_outputs.npz")))[1],
                                       ["tune", "--target", TARGET], "embed"),
    "npy: source-validation domains": (lambda lay, m: (_branch_outputs(lay.fold(TARGET).embed(0) / "val_outputs.npz"),
                                                       _truncate(_npy(lay.fold(TARGET).embed(0) / "val_domains.npy")))[1],
                                       ["tune", "--target", TARGET], "embed"),
    "npy: the image cache": (lambda lay, m: _truncate(lay.cache(32) / f"{STYLES[0]}.npy"), ["train", "--target", TARGET], "cache"),
    "parquet: a fold's statistics (embed)": (lambda lay, m: _truncate(_parquet(lay.fold(TARGET).stats)), ["embed", "--target", TARGET], "stats"),
    "parquet: a fold's statistics (stats show)": (lambda lay, m: _truncate(_parquet(lay.fold(TARGET).stats)), ["stats", "show", "STATS"], "stats"),
    "parquet: a model's statistics (predict)": (lambda lay, m: _truncate(m / "stats.parquet"), ["predict", "MODEL_IMAGE", "--model", "MODEL"], "final"),
    "parquet: a model's statistics (stats show)": (lambda lay, m: _truncate(m / "stats.parquet"), ["stats", "show", "MODEL/stats.parquet"], "final"),
    "parquet: the ingest manifest": (lambda lay, m: _truncate(lay.ingest / MANIFEST), ["validate"], "ingest"),
}


@pytest.mark.parametrize("name", list(TORN))
def test_a_torn_artifact_is_one_line_naming_it_and_the_stage_to_rerun(name, fresh, model_dir, tmp_path):
    p, layout, tmp = fresh
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    make, command, stage = TORN[name]
    path = make(layout, model)
    image = _png(tmp_path / "x.png")
    args = [str(model) + a[len("MODEL"):] if a.startswith("MODEL/") else {"MODEL": str(model), "MODEL_IMAGE": str(image),
            "STATS": str(layout.fold(TARGET).stats)}.get(a, a) for a in command]
    if command[0] not in ("predict", "stats") or command[1] == "extract":
        args += ["--params", str(tmp / "params.yaml"), "--root", str(layout.root)]
    res = CliRunner().invoke(app, args)
    out = res.output.strip()
    assert res.exit_code == 1 and "Traceback" not in res.output, (name, res.output)
    assert out.count("\n") == 0 and out.startswith(f"error: {path}"), (name, out)
    assert f"rerun the {stage}" in out, (name, out)


def test_retraining_flow_names_a_torn_model_description(tmp_path):
    """flows/retrain.py reads the newest model's domains through the same one-line reader as the stages."""
    from flows.retrain import model_domains
    from tasks.paths import Layout

    layout = Layout(tmp_path, "toy")
    layout.final.mkdir(parents=True)
    (layout.final / "model.json").write_text('{"domains": ["a", "b"]')  # torn: the closing brace never written
    with pytest.raises(ValueError, match=r"model.json.*final"):
        model_domains(layout)
    (layout.final / "model.json").write_text('{"domains": ["a", "b"]}')
    assert model_domains(layout) == ["a", "b"]
