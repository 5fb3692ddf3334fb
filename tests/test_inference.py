"""The deployed BNE path (one set of options) agrees with the analysis path that records every option."""

import numpy as np
import pytest
import torch
from conftest import options, spec

from bne.evaluate import bne_inference, bne_predict, branch_outputs
from bne.model import DGNet
from bne.stats import population_stats, running_stats

PAPER = dict(embedding="running", distance="w2", layers="all", aggregate="mean", weighting="inverse", power=1.0,
             temperature=1.0, instance_stats="per_branch")  # the paper's BNE (params.yaml's eval.options)


@pytest.mark.parametrize("opts", [
    options(**PAPER),
    options(**{**PAPER, "embedding": "population", "distance": "kl", "layers": "late", "weighting": "softmax",
               "temperature": 0.5}),
    options(**{**PAPER, "instance_stats": "single_pass", "power": 3.0, "aggregate": "sum"}),
])
def test_bne_inference_matches_branch_outputs(opts):
    torch.manual_seed(0)
    model = DGNet(spec(backbone="resnet18", weights="none", num_classes=3, domains=("a", "b", "c")))
    model.train()
    for d in (0, 1, 2):  # give the branches different statistics
        model(torch.rand(8, 3, 32, 32) * (0.5 + d), domains=d)
    images = (np.random.default_rng(0).random((10, 32, 32, 3)) * 255).astype(np.uint8)
    pop, inst = population_stats(model, [(d, [torch.rand(4, 3, 32, 32) * (0.5 + d)]) for d in (0, 1, 2)])
    emb = {"running": running_stats(model.norm_layers()), "population": pop, "instance_average": inst}
    out = branch_outputs(model, images, np.zeros(10, dtype=np.int64), emb, 4, torch.device("cpu"), single_pass=True)
    want_p, want_w = bne_predict(out, opts)
    for chunk in (0, 4, 8):  # one (S x B) forward, one branch per forward, two branches per forward
        p, w = bne_inference(model, images, emb[opts.embedding], opts, 4, torch.device("cpu"), chunk=chunk)
        torch.testing.assert_close(w, want_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p, want_p, rtol=1e-4, atol=1e-5)
    chunked = branch_outputs(model, images, np.zeros(10, dtype=np.int64), emb, 4, torch.device("cpu"), single_pass=True, chunk=4)
    torch.testing.assert_close(chunked.probs, out.probs, rtol=1e-4, atol=1e-5)
    for k, v in out.dists.items():
        torch.testing.assert_close(chunked.dists[k], v, rtol=1e-4, atol=1e-5)
