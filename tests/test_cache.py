import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from tasks.cli import app
from bne.data import decode_image, load_cache, load_folder_dataset
from bne.ingest import dataset_from_manifest, ingest
from tasks.validate import ValidationConfig, validate_manifest

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)
NEAR_BITS = 32  # perceptual-hash bits across domains that warn (params.yaml validation.near_duplicate_bits)


def _validated(source, tmp_path, **kw):
    """Ingest ``source`` into ``tmp_path/m`` and validate it; the validated copy's path."""
    ingest(source, tmp_path / "m", progress=False, **kw, max_pixels=MAX_PIXELS)
    report = validate_manifest(tmp_path / "m" / "manifest.parquet", tmp_path / "reports",
                               ValidationConfig(min_per_class=1, min_size=8, near_duplicate_bits=NEAR_BITS, max_pixels=MAX_PIXELS), tmp_path / "v" / "manifest.parquet")
    assert report["success"], report["failures"]
    return tmp_path / "v" / "manifest.parquet"


def test_cache_from_manifest_matches_direct_decoding(synthetic_root, tmp_path):
    manifest = _validated(synthetic_root, tmp_path, val_fraction=0.25)
    ds = dataset_from_manifest(manifest)
    assert ds.samples == load_folder_dataset(synthetic_root, val_fraction=0.25).samples
    assert all(len(s.sha256) == 64 for s in ds.samples)  # the cache keys on them
    res = CliRunner().invoke(app, ["cache", str(manifest), "--out", str(tmp_path / "c"), "--size", "16", "--no-progress"])
    assert res.exit_code == 0, res.output
    arrays = load_cache(ds, tmp_path / "c")
    dom = ds.domains[1]
    last = ds.of(dom)[-1]
    np.testing.assert_array_equal(arrays[dom].images[-1], decode_image(synthetic_root / last.path, 16, max_pixels=MAX_PIXELS))
    assert isinstance(arrays[dom].images, np.memmap)


def test_cache_refuses_a_manifest_with_undecodable_images(synthetic_root, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(synthetic_root, root)
    (root / "noisy_gray" / "circle" / "circle_000.png").write_bytes(b"")
    ingest(root, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match="do not decode.*circle_000.png"):
        dataset_from_manifest(tmp_path / "m" / "manifest.parquet", validated=False)


def test_cache_refuses_a_manifest_that_did_not_pass_validation(synthetic_root, tmp_path):
    ingest(synthetic_root, tmp_path / "m", progress=False, max_pixels=MAX_PIXELS)
    res = CliRunner().invoke(app, ["cache", str(tmp_path / "m" / "manifest.parquet"), "--out", str(tmp_path / "c"), "--size", "16"])
    assert res.exit_code == 1 and "not a manifest that passed `bne validate`" in res.output
    assert not (tmp_path / "c").exists()
