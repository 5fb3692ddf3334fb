"""Trained networks on disk: ``model.pt`` state dicts (``weights_only=True``) and the statistics they normalize with."""

from __future__ import annotations

from pathlib import Path

import torch

from bne.model import DGNet, ModelSpec
from bne.stats import DomainStats, read_stats_table


def load_model(spec: ModelSpec, path: Path | str, device: torch.device) -> DGNet:
    """The network of ``spec`` with the weights of ``path`` (a state dict), in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model; run the train stage first")
    model = DGNet(spec)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a crafted or torn file: name it, no traceback
        raise ValueError(f"{path}: not a loadable state dict ({_one_line(e)}); rerun the stage that wrote it") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - missing or unexpected keys, wrong shapes: one line
        raise ValueError(f"{path}: weights do not fit the model in model.json ({_one_line(e)})") from None
    return model.to(device).eval()


def _one_line(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def model_with_stats(spec: ModelSpec, model_path: Path | str, stats_path: Path | str, seed: int,
                     device: torch.device) -> tuple[DGNet, dict[str, DomainStats]]:
    """A BNE network whose branches normalize with the ``running`` statistics of a stats Parquet file.

    Returns the model and ``{kind: DomainStats}`` (the embeddings) read from the same file, for ``seed``.
    """
    _, kinds, domains = read_stats_table(str(stats_path), seed=seed, stage="stats")
    if list(domains) != list(spec.domains):
        raise ValueError(f"{stats_path}: domains {domains} differ from the model's {list(spec.domains)}")
    model = load_model(spec, model_path, device)
    run = kinds["running"]
    for layer, m, v in zip(model.norm_layers(), run.mean, run.var):
        layer.running_mean.copy_(torch.from_numpy(m))
        layer.running_var.copy_(torch.from_numpy(v))
    return model, kinds
