"""The model for use: prediction on new images, and new domains added to a saved model as branches.

A model folder holds ``model.pt`` (state dict, loaded with ``weights_only=True``), ``model.json`` (the network
spec, classes, domains, resolution, inference options, the weights' SHA-256) and ``stats.parquet`` (every
domain's statistics, the embedding that places new images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from bne.data import IMAGE_SUFFIXES, DomainArrays, decode_image, to_tensor
from bne.embedding import InferenceOptions
from bne.evaluate import (
    accuracy,
    bne_inference,
    branch_chunk,
    options_from_dict,
)
from bne.io import atomic_torch_save, file_sha256, read_json, read_parquet, write_json, write_parquet
from bne.model import DGNet, ModelSpec
from bne.model_io import load_model
from bne.stats import (
    population_stats,
    precise_running_stats,
    read_stats_table,
    running_stats,
    stats_table,
)
from bne.train import pick_device

#: Files decoded and predicted at a time: memory stays bounded whatever the size of the folder.
CHUNK = 256


def batches(arr: DomainArrays, rows: np.ndarray, batch: int):
    for i in range(0, len(rows), batch):
        yield to_tensor(arr.images[np.sort(rows[i : i + batch])])


def write_stats(path: Path, tables: list[pa.Table], meta: dict) -> None:
    write_parquet(pa.concat_tables(tables).replace_schema_metadata(meta), path)


def save_model(model: DGNet, out: Path, info: dict) -> dict:
    """``model.pt`` and ``model.json`` (``info`` + the weights' SHA-256 and the time), both atomic; returns the record."""
    atomic_torch_save(model.state_dict(), out / "model.pt")
    info = {**info, "model_sha256": file_sha256(out / "model.pt"), "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(out / "model.json", info)
    return info


def stats_tables(model: DGNet, arrays: list[DomainArrays], names: list[str], dataset: str, batch: int, device, only: int | None = None) -> list[pa.Table]:
    """Running, population and instance-average statistics; ``only``: just that domain index (a new branch)."""
    idx = range(len(arrays)) if only is None else [only]
    pop, inst = population_stats(model, [(d, batches(arrays[d], arrays[d].train, batch)) for d in idx], device, partial=only is not None)
    run = running_stats(model.norm_layers())
    table = pa.table(stats_table([run, pop, inst], names, dataset=dataset, held_out="none"))
    if only is not None:
        table = table.filter(pc.equal(table.column("domain"), names[only]))
    return [table]


class Predictor:
    """A saved model folder, ready to classify images and to say how much each source domain weighs."""

    def __init__(self, model_dir: Path | str, batch: int, device: torch.device | None = None) -> None:
        self.dir = Path(model_dir)
        for name in ("model.json", "model.pt", "stats.parquet"):
            if not (self.dir / name).is_file():
                raise FileNotFoundError(f"{self.dir / name}: missing; train the final model first (`dvc repro final`)")
        stage = "extend" if "extend" in self.dir.resolve().parts else "final"  # the stage that wrote the folder
        self.info = read_json(self.dir / "model.json", "model description", stage)
        try:
            spec = self.info["spec"]
            spec = ModelSpec(**{**spec, "domains": tuple(spec["domains"]), "weights": "none"})  # the weights come from model.pt
        except (KeyError, TypeError) as e:
            raise ValueError(f"{self.dir / 'model.json'}: not a model description ({type(e).__name__}: {e})") from None
        self.device = device or pick_device()
        self.model = load_model(spec, self.dir / "model.pt", self.device)  # weights_only; a crafted file is one line
        _, self.embeddings, domains = read_stats_table(str(self.dir / "stats.parquet"), stage=stage)
        if domains != list(spec.domains):
            raise ValueError(f"{self.dir}/stats.parquet: domains {domains} differ from the model's {list(spec.domains)}")
        self.options: InferenceOptions = options_from_dict(self.info["options"])
        self.batch = batch

    @property
    def domains(self) -> list[str]:
        return list(self.model.spec.domains)

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    def predict_arrays(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """BNE class probabilities (N, K) and domain weights (S, N) of uint8 HWC images at the model's resolution."""
        return bne_inference(self.model, images, self.embeddings[self.options.embedding], self.options, self.batch, self.device,
                             chunk=branch_chunk("auto", self.batch, self.device))

    def predict_files(self, files: list[Path], *, max_pixels: int, chunk: int = CHUNK) -> tuple[list[dict], list[dict]]:
        """Per decodable file: class, probability, weight per domain; and the files that did not decode.

        Files are decoded ``chunk`` at a time (the ingest rules: 16-bit and float modes and images above
        ``max_pixels`` (``dataset.max_pixels``) are refused with the reason), so a folder is never held in memory at once.
        """
        rows, errors = [], []
        for start in range(0, len(files), chunk):
            images, kept = [], []
            for f in files[start : start + chunk]:
                try:
                    images.append(decode_image(f, self.info["resolution"], max_pixels=max_pixels))
                    kept.append(f)
                except ValueError as e:
                    errors.append({"file": str(f), "error": str(e)})
            if not images:
                continue
            probs, weights = self.predict_arrays(np.stack(images))
            for i, f in enumerate(kept):
                k = int(probs[i].argmax())
                rows.append({"file": str(f), "class": self.classes[k], "probability": round(float(probs[i, k]), 4),
                             **{f"w_{d}": round(float(weights[s, i]), 4) for s, d in enumerate(self.domains)}})
        return rows, errors


def image_files(inputs: list[Path]) -> list[Path]:
    """Files given directly, plus the image files under given folders (recursively, sorted); missing paths raise."""
    files = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


def add_domain(model: DGNet, name: str) -> None:
    """One more domain branch in every normalization layer, initialised from the mean of the existing ones."""
    for layer in model.norm_layers():
        for buf in ("running_mean", "running_var"):
            old = getattr(layer, buf)
            setattr(layer, buf, torch.cat([old, old.mean(0, keepdim=True)]))
        layer.num_batches_tracked = torch.cat([layer.num_batches_tracked, layer.num_batches_tracked.new_zeros(1)])
        if layer.domain_affine and layer.weight is not None:
            layer.weight = torch.nn.Parameter(torch.cat([layer.weight.data, layer.weight.data.mean(0, keepdim=True)]))
            layer.bias = torch.nn.Parameter(torch.cat([layer.bias.data, layer.bias.data.mean(0, keepdim=True)]))
        layer.num_domains += 1
    model.spec = replace(model.spec, domains=(*model.spec.domains, name))


def extend_with_domain(
    model_dir: Path | str, arrays: DomainArrays, out: Path | str, batch: int, log: Callable[[str], None] = print,
) -> dict:
    """Add ``arrays``' domain to a saved model as a new branch, the shared weights frozen.

    With shared affine parameters the branch is a statistics pass (PreciseBN over the new domain's train
    images, no gradient step). Measures BNE on the new domain's validation images before (an unseen domain,
    existing branches only) and after (with its own branch). Earlier branches stay bit-identical (checked).
    """
    pred = Predictor(model_dir, batch)
    name = arrays.name
    if getattr(pred.model.spec, "norm", "bn") != "bn":
        raise ValueError(f"adding a domain branch is implemented for norm 'bn', not {pred.model.spec.norm!r}")
    if name in pred.domains:
        raise ValueError(f"domain {name!r} is already a branch of {model_dir} ({pred.domains})")
    if pred.model.spec.domain_affine:
        raise ValueError("domain-specific affine parameters need a gradient step per new domain: not supported here")
    val_x, val_y = arrays.images[np.sort(arrays.val)], arrays.labels[np.sort(arrays.val)]
    before_probs, before_w = pred.predict_arrays(val_x)
    before = accuracy(before_probs, torch.as_tensor(val_y))
    old = {k: v.clone() for k, v in pred.model.state_dict().items()}
    s = pred.model.num_domains
    add_domain(pred.model, name)
    precise_running_stats(pred.model, [(s, batches(arrays, arrays.train, pred.batch))], pred.device)
    new_state = pred.model.state_dict()
    for k, v in old.items():
        nv = new_state[k]
        same = torch.equal(nv[:s], v) if nv.shape != v.shape else torch.equal(nv, v)
        if not same:
            raise RuntimeError(f"extending changed an earlier branch: {k}")
    tables = [read_parquet(Path(model_dir) / "stats.parquet", "statistics file", "final")]
    names = pred.domains
    stand_in = [arrays] * len(names)  # only the new index is read (``only``)
    tables += stats_tables(pred.model, stand_in, names, pred.info["dataset"], pred.batch, pred.device, only=s)
    _, pred.embeddings, _ = _embeddings_from(tables)
    after_probs, after_w = pred.predict_arrays(val_x)
    after = accuracy(after_probs, torch.as_tensor(val_y))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = save_model(pred.model, out, {**pred.info, "spec": asdict(pred.model.spec), "domains": names,
                                         "extended_from": pred.info["model_sha256"], "added_domain": name})
    write_stats(out / "stats.parquet", tables, {"dataset": pred.info["dataset"], "held_out": "none",
                                                 "checkpoint_sha256": info["model_sha256"], "norm": getattr(pred.model.spec, "norm", "bn"),
                                                 "created_at": info["created_at"], "added_domain": name})
    result = {
        "domain": name, "val_images": int(len(val_y)), "train_images": int(len(arrays.train)),
        "unseen_bne_acc": round(100 * before, 2), "own_branch_bne_acc": round(100 * after, 2),
        "unseen_mean_weights": dict(zip(names[:s], before_w.mean(1).tolist())),
        "own_branch_mean_weight": float(after_w[s].mean()),
    }
    log(f"new domain {name}: BNE {result['unseen_bne_acc']:.1f}% as an unseen domain -> {result['own_branch_bne_acc']:.1f}% with its own branch")
    return result


def _embeddings_from(tables: list[pa.Table]):
    """``read_stats_table`` on in-memory tables (via a temporary Parquet buffer)."""
    import io

    buf = io.BytesIO()
    pq.write_table(pa.concat_tables(tables), buf)
    buf.seek(0)
    return read_stats_table(buf, stage="extend")
