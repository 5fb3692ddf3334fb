"""Evaluation: branch outputs and per-layer distances in one batched pass, then BNE and its baselines."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bne.data import to_tensor
from bne.embedding import (
    DISTANCES,
    InferenceOptions,
    bne_weights,
    ensemble,
    layer_mean_matrix,
    per_layer_distances,
)
from bne.io import atomic_call, torn
from bne.model import DGNet
from bne.norm.dsbn import MEAN_DOMAIN
from bne.progress import progress
from bne.stats import DomainStats, InstanceRecorder

MODES = ("per_branch", "single_pass")


@dataclass
class BranchOutputs:
    """Every branch's class probabilities and per-layer distances for a set of images.

    ``dists[(mode, embedding, distance)]`` is (S, N, L): distance of each image's instance statistics at
    each layer to each domain's statistics of kind ``embedding``.
    """

    probs: torch.Tensor  # (S, N, K)
    labels: torch.Tensor  # (N,)
    dists: dict[tuple[str, str, str], torch.Tensor]

    def save(self, path) -> None:
        """Written atomically: a killed writer leaves the previous file or none, never a torn one."""
        arrays = {"probs": self.probs.numpy(), "labels": self.labels.numpy()}
        arrays.update({"dist/" + "/".join(k): v.numpy() for k, v in self.dists.items()})

        def write(tmp) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

        atomic_call(path, write)

    @classmethod
    def load(cls, path, stage: str) -> BranchOutputs:
        """The file ``stage`` wrote; missing, torn or without the arrays: one line naming it and the stage."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: missing branch outputs; run the {stage} stage first")
        try:
            with np.load(path, allow_pickle=False) as z:
                dists = {tuple(k.split("/")[1:]): torch.from_numpy(z[k]) for k in z.files if k.startswith("dist/")}
                return cls(torch.from_numpy(z["probs"]), torch.from_numpy(z["labels"]), dists)
        except Exception as e:  # noqa: BLE001 - BadZipFile, KeyError, EOFError, zlib.error, ValueError...
            raise torn(path, "branch-outputs file", stage, e) from None


def _batches(n: int, batch: int):
    return (slice(i, min(n, i + batch)) for i in range(0, n, batch))


@torch.no_grad()
def plain_probs(model: DGNet, images: np.ndarray, batch: int, device: torch.device, desc: str = "") -> torch.Tensor:
    """Class probabilities of an ordinary (DeepAll) network: (N, K)."""
    model.eval()
    out = [
        torch.softmax(model(to_tensor(images[sl]).to(device)).float(), 1).cpu()
        for sl in progress(list(_batches(len(images), batch)), desc=desc, unit="batch", enabled=bool(desc))
    ]
    return torch.cat(out)


def branch_chunk(setting: int | str, batch: int, device: torch.device) -> int:
    """Images per forward when running the S branches: ``auto`` is one branch (B images) per forward on the CPU,
    where a forward of S x B images costs up to twice per image what B images cost (caches), and every branch
    in one S x B forward on a GPU; 0 is always S x B; n is as many whole branches as fit in n images."""
    if setting == "auto":
        return 0 if device.type == "cuda" else batch
    return int(setting)


def run_branches(model: DGNet, x: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, InstanceRecorder]:
    """Logits of all S branches (S, B, K) and their instance statistics (per layer: S x B rows, branch-major).

    ``chunk`` 0: one (S x B) forward; else groups of ``max(1, chunk // B)`` branches per forward.
    """
    s, b = model.num_domains, x.shape[0]
    k = s if chunk <= 0 else max(1, min(s, chunk // b))
    if k == s:
        rec = InstanceRecorder()
        return model.branches(x, recorder=rec), rec
    logits, recs = [], []
    for d0 in range(0, s, k):
        ds = list(range(d0, min(s, d0 + k)))
        rec = InstanceRecorder()
        logits.append(model(x.repeat(len(ds), 1, 1, 1), domains=ds, recorder=rec).view(len(ds), b, -1))
        recs.append(rec)
    merged = InstanceRecorder()
    for i in recs[0].mean:
        merged.mean[i] = torch.cat([r.mean[i] for r in recs])
        merged.std[i] = torch.cat([r.std[i] for r in recs])
    return torch.cat(logits), merged


@torch.no_grad()
def branch_outputs(
    model: DGNet,
    images: np.ndarray,
    labels: np.ndarray,
    embeddings: dict[str, DomainStats],
    batch: int,
    device: torch.device,
    single_pass: bool = True,
    desc: str = "",
    chunk: int = 0,
) -> BranchOutputs:
    """Run all S branches (one (S x B) forward per batch, or ``chunk``-sized groups: :func:`run_branches`),
    recording instance statistics at every layer.

    ``per_branch`` distances compare branch d's instance statistics with domain d; ``single_pass`` ones
    come from one extra pass with the domains' averaged statistics and are compared with every domain.
    """
    model.eval()
    s = model.num_domains
    layer_mean = layer_mean_matrix([layer.num_features for layer in model.norm_layers()])
    emb = {  # all layers' channels concatenated: (S, 1, C_total)
        kind: (
            torch.from_numpy(np.concatenate(st.mean, 1)).float().unsqueeze(1),
            torch.from_numpy(np.sqrt(np.concatenate(st.var, 1))).float().unsqueeze(1),
        )
        for kind, st in embeddings.items()
    }
    probs, dists = [], {(m, k, d): [] for m in MODES[: 1 + single_pass] for k in emb for d in DISTANCES}
    for sl in progress(list(_batches(len(images), batch)), desc=desc, unit="batch", enabled=bool(desc)):
        x = to_tensor(images[sl]).to(device)
        logits, rec = run_branches(model, x, chunk)
        probs.append(torch.softmax(logits.float(), -1).cpu())
        recs = {"per_branch": rec}
        if single_pass:
            recs["single_pass"] = InstanceRecorder()
            model(x, domains=MEAN_DOMAIN, recorder=recs["single_pass"])
        for mode, r in recs.items():
            n = len(r.mean)
            mx = torch.cat([r.mean[i] for i in range(n)], -1).cpu().view(-1, x.shape[0], layer_mean.shape[0])
            sx = torch.cat([r.std[i] for i in range(n)], -1).cpu().view(-1, x.shape[0], layer_mean.shape[0])
            for kind, (md, sd) in emb.items():
                for dist in DISTANCES:
                    d = per_layer_distances(mx, sx, md, sd, dist, layer_mean)
                    dists[(mode, kind, dist)].append(d.expand(s, -1, -1))
    return BranchOutputs(
        torch.cat(probs, 1),
        torch.as_tensor(labels),
        {k: torch.cat(v, 1) for k, v in dists.items()},
    )


@torch.no_grad()
def bne_inference(
    model: DGNet, images: np.ndarray, embedding: DomainStats, opts: InferenceOptions, batch: int, device: torch.device,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BNE as deployed: class probabilities (N, K) and domain weights (S, N) for one set of options.

    The lean path of :func:`branch_outputs` (which records every embedding kind and distance for analysis):
    one (S x B) forward per batch with per-branch instance statistics, or, with ``single_pass``, one pass with
    the domains' averaged statistics for the weights and then the branches for the probabilities.
    """
    model.eval()
    layer_mean = layer_mean_matrix([layer.num_features for layer in model.norm_layers()])
    md = torch.from_numpy(np.concatenate(embedding.mean, 1)).float().unsqueeze(1)
    sd = torch.from_numpy(np.sqrt(np.concatenate(embedding.var, 1))).float().unsqueeze(1)
    s = model.num_domains
    probs, weights = [], []
    for sl in _batches(len(images), batch):
        x = to_tensor(images[sl]).to(device)
        logits, rec = run_branches(model, x, chunk)
        if opts.instance_stats == "single_pass":
            rec = InstanceRecorder()
            model(x, domains=MEAN_DOMAIN, recorder=rec)
        p = torch.softmax(logits.float(), -1).cpu()
        n = len(rec.mean)
        mx = torch.cat([rec.mean[i] for i in range(n)], -1).cpu().view(-1, x.shape[0], layer_mean.shape[0])
        sx = torch.cat([rec.std[i] for i in range(n)], -1).cpu().view(-1, x.shape[0], layer_mean.shape[0])
        w = bne_weights(per_layer_distances(mx, sx, md, sd, opts.distance, layer_mean).expand(s, -1, -1), opts)
        probs.append(ensemble(p, w))
        weights.append(w)
    return torch.cat(probs), torch.cat(weights, 1)


def _dists(out: BranchOutputs, opts: InferenceOptions) -> torch.Tensor:
    key = (opts.instance_stats, opts.embedding, opts.distance)
    if key not in out.dists:
        raise ValueError(f"no distances recorded for instance_stats={key[0]}, embedding={key[1]}, distance={key[2]}")
    return out.dists[key]


def bne_predict(out: BranchOutputs, opts: InferenceOptions, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BNE class probabilities (N, K) and weights (S, N); ``exclude[n]`` drops that branch for image n."""
    w = bne_weights(_dists(out, opts), opts)
    if exclude is not None:
        w = w.clone()
        w[exclude, torch.arange(w.shape[1])] = 0
        w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
    return ensemble(out.probs, w), w


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(-1) == labels).float().mean())


def method_accuracies(out: BranchOutputs, opts: InferenceOptions) -> dict[str, float]:
    """BNE, uniform ensemble, nearest domain, and the oracle branch (best single branch, a reference)."""
    probs, w = bne_predict(out, opts)
    nearest = out.probs[w.argmax(0), torch.arange(out.probs.shape[1])]
    return {
        "bne": accuracy(probs, out.labels),
        "uniform": accuracy(out.probs.mean(0), out.labels),
        "nearest": accuracy(nearest, out.labels),
        "oracle": max(accuracy(p, out.labels) for p in out.probs),
        "mean_max_weight": float(w.max(0).values.mean()),
    }


def domain_id_accuracy(out: BranchOutputs, domains: torch.Tensor, opts: InferenceOptions) -> float:
    """How often the nearest domain in the embedding is the image's own (source) domain."""
    w = bne_weights(_dists(out, opts), opts)
    return float((w.argmax(0) == domains).float().mean())


def leave_own_out_accuracy(out: BranchOutputs, domains: torch.Tensor, opts: InferenceOptions) -> float:
    """Source-validation accuracy with each image's own branch removed: a stand-in for an unseen domain."""
    probs, _ = bne_predict(out, opts, exclude=domains)
    per_domain = [accuracy(probs[domains == d], out.labels[domains == d]) for d in domains.unique()]
    return float(np.mean(per_domain))


def options_dict(opts: InferenceOptions) -> dict:
    d = asdict(opts)
    d["layers"] = list(d["layers"]) if isinstance(d["layers"], tuple) else d["layers"]
    return d


def options_from_dict(d: dict) -> InferenceOptions:
    """The inverse of :func:`options_dict` (JSON lists back to tuples)."""
    return InferenceOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
