import numpy as np
import pytest
from typer.testing import CliRunner

from tasks.cli import app
from bne.data import decode_image, load_cache, load_folder_dataset
from bne.ingest import dataset_from_manifest, ingest


def test_cache_from_manifest_matches_direct_decoding(synthetic_root, tmp_path):
    ingest(synthetic_root, tmp_path / "m", val_fraction=0.25, progress=False)
    ds = dataset_from_manifest(tmp_path / "m" / "manifest.parquet")
    assert ds.samples == load_folder_dataset(synthetic_root, val_fraction=0.25).samples
    res = CliRunner().invoke(app, ["cache", str(tmp_path / "m" / "manifest.parquet"), "--out", str(tmp_path / "c"), "--size", "16", "--no-progress"])
    assert res.exit_code == 0, res.output
    arrays = load_cache(ds, tmp_path / "c")
    dom = ds.domains[1]
    last = ds.of(dom)[-1]
    np.testing.assert_array_equal(arrays[dom].images[-1], decode_image(synthetic_root / last.path, 16))
    assert isinstance(arrays[dom].images, np.memmap)


def test_cache_refuses_a_manifest_with_undecodable_images(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "src"
    shutil.copytree(synthetic_root, root)
    (root / "noisy_gray" / "circle" / "circle_000.png").write_bytes(b"")
    ingest(root, tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match="do not decode.*circle_000.png"):
        dataset_from_manifest(tmp_path / "m" / "manifest.parquet")
