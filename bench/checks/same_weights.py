"""Old vs new code: the same training steps give bit-identical weights (evidence for `python tools/relock.py`).

Two steps of bne.train.train_step on fixed random minibatches with params.yaml's model (Lite0, pretrained) for
DeepAll, BNE and BNE with the ensemble loss, one torch thread; prints the loss and a hash of every weight and
buffer. Run it from the root of each tree (the older one, e.g. a worktree, on PYTHONPATH) and compare the lines:

    (cd /path/to/old/worktree && PYTHONPATH=$PWD python /path/to/bench/checks/same_weights.py) > old.txt
    python bench/checks/same_weights.py > new.txt && diff old.txt new.txt
"""
import dataclasses, hashlib, sys
import torch
torch.set_num_threads(1)
from tasks import params as P
from bne.model import DGNet
from bne.train import build_optimizer, seed_everything, train_step
p = P.load("params.yaml")
out = []
for method, ens in (("deepall", 0.0), ("bne", 0.0), ("bne", 0.1)):
    cfg = dataclasses.replace(p.train.config(0), ensemble_loss=ens)
    spec = p.model.spec(7, ("a", "b", "c") if method == "bne" else ())
    seed_everything(0)
    model = DGNet(spec)
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(2):
        mb = [(torch.rand(4, 3, 64, 64, generator=g), torch.randint(0, 7, (4,), generator=g)) for _ in range(3)]
        loss = train_step(model, opt, mb, cfg)
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
    out.append(f"{method} ens={ens}: loss {float(loss):.6f} state {h.hexdigest()[:16]}")
print("\n".join(out))
