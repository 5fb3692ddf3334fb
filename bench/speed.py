"""The speed table: DeepAll vs BNE training steps, the loader, BNE inference, statistics extraction.

Every ratio compares sides timed in one process, alternated call by call (``_harness.interleaved``: one
training step or one eval batch each, the order rotated every round, so drift in the machine's load affects
every side alike); its value is the median of the per-repetition ratios; every raw time is kept in the JSON
with the load average and the cores other processes kept busy meanwhile (``details.<section>.load``).

* ``bne_vs_deepall_train_throughput``: BNE training images/s over DeepAll's (goal >= 0.9). Each side is
  ``bne.train.train_step``, the step ``bne.train.train`` runs (forward, cross-entropy, the ensemble loss and
  MBN's double forward when the params enable them, backward, SGD step, no read-back of the loss), on the
  params' model (``model:``) and recipe (``train:``), per-domain batch x 3 source domains of augmented source
  images at ``train.resolution``, with ``build_optimizer``'s frozen stages.
* ``loader_vs_trainer_throughput``: images/s of the training loader (``bne.data.Augment`` over the cached uint8
  arrays, a step's batch as ``bne.train.train`` draws it) over the faster trainer's (goal >= 3).
* ``bne_inference_vs_branch_forwards``: BNE time per image as ``bne predict`` runs it
  (``bne.evaluate.bne_inference`` with ``eval.options``: the branches with the per-branch instance-statistics
  recorder, the distances, the weights, the ensemble) over S plain forwards of one branch (goal <= 1.1).
  Beside it: ``single_pass_vs_deepall`` and ``bne_inference_vs_deepall`` (against DeepAll's plain forward),
  ``mixstats_vs_deepall`` (issue 19's one-forward statistics mixing, ``bne.mixing``, goal <= 1.3),
  and diagnostics of where BNE's time goes (the S x B batched forward; the branch forwards with three recorders:
  ``instance_stats`` as BNE runs it, a one-read floor, torch.compile's fused statistics unless ``--no-compile``).
* ``stats_extraction_images_per_s``: ``bne.stats.population_stats`` over source train images.

Data: the configured dataset decoded once into ``--cache`` (default data/bench-cache), else (or with
``--synthetic``) random uint8 arrays of the same shape (speed does not depend on the pixels). Prints a table
and writes ``reports/bench/speed.json`` (atomically): the one source of the speed table.

    python bench/speed.py                          # the table (7 repetitions)
    python bench/speed.py --threads 1 --reps 5     # while other processes share the cores (5.8 min beside other jobs)
    python bench/speed.py --quick --synthetic      # a check that the script works (speed.quick.json)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the harness

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _harness as H  # noqa: E402
from bne.data import Augment, DomainArrays, build_cache, domain_batches, load_cache, load_folder_dataset, to_tensor  # noqa: E402
from bne.evaluate import bne_inference, branch_chunk, plain_probs  # noqa: E402
from bne.mixing import mixed_probs, mixstats_fn  # noqa: E402
from bne.stats import instance_stats, population_stats, running_stats  # noqa: E402
from bne.train import pick_device  # noqa: E402
from tasks import params as P  # noqa: E402

SECTIONS = ("train", "inference", "stats")
FULL = {"reps": 7, "train_rounds": 4, "infer_images": 96, "stats_per_domain": 128, "stats_reps": 3}
QUICK = {"reps": 2, "train_rounds": 2, "infer_images": 16, "stats_per_domain": 8, "stats_reps": 1}


# ----------------------------------------------------------------------------------------------- data


def synthetic_arrays(resolution: int, domains: int = 4, classes: int = 7, per_domain: int = 320, seed: int = 0) -> dict[str, DomainArrays]:
    """Random uint8 images in the shape of the cached arrays (speed does not depend on the pixels)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(domains):
        images = rng.integers(0, 256, (per_domain, resolution, resolution, 3), dtype=np.uint8)
        labels = (np.arange(per_domain) % classes).astype(np.int64)
        perm = rng.permutation(per_domain)
        val, train = np.sort(perm[: per_domain // 10]), np.sort(perm[per_domain // 10 :])
        out[f"synthetic{i}"] = DomainArrays(f"synthetic{i}", images, labels, train, val)
    return out


def load_data(p: P.Params, params_dir: Path, cache: Path, synthetic: bool) -> tuple[dict[str, DomainArrays], list[str], int, str]:
    """(arrays per domain, domains, number of classes, description of the data)."""
    res = p.train.resolution
    root = P.resolve(params_dir, p.dataset.root)
    if not synthetic:
        if root is not None and root.is_dir():
            ds = load_folder_dataset(root, P.resolve(params_dir, p.dataset.splits), p.dataset.val_fraction, seed=0)
            out = build_cache(ds, res, cache / p.dataset.name / str(res), progress=False, max_pixels=p.dataset.max_pixels)
            return load_cache(ds, out), ds.domains, len(ds.classes), f"{p.dataset.name} cached arrays ({out})"
        print(f"dataset root {root} not found: synthetic arrays instead", flush=True)
    arrays = synthetic_arrays(res)
    return arrays, list(arrays), 7, "synthetic random uint8 arrays"


# ----------------------------------------------------------------------------------------------- training


def measure_training(p: P.Params, spec, cfg, sources: list[DomainArrays], device, settings, sync) -> tuple[dict, dict, dict]:
    """DeepAll step, BNE step and the loader's batch for one step, alternated call by call."""
    b, s = cfg.per_domain_batch, len(sources)
    augment = Augment(cfg.augment, p.train.resolution)
    names = tuple(a.name for a in sources)
    trainers = {"deepall": H.trainer(spec, cfg, (), device), "bne": H.trainer(spec, cfg, names, device)}

    def load(rows):  # a step's minibatches, as bne.train.train draws them on the CPU
        return [(augment(a.images[r]), torch.as_tensor(a.labels[r])) for a, r in zip(sources, rows)]

    # Both trainers step on the same few augmented batches (the loader is timed as its own side).
    fixed = [[(x.to(device), y.to(device)) for x, y in load(rows)]
             for rows in domain_batches([a.train for a in sources], b, 4, torch.Generator().manual_seed(0))]
    stream = domain_batches([a.train for a in sources], b, 10**9, torch.Generator().manual_seed(1))

    def train_side(m):
        def step(_k):
            t = trainers[m]
            t.step(fixed[t.steps % len(fixed)])
            return s * b

        return step

    def loader(_k):
        load(next(stream))
        return s * b

    runs = H.interleaved({"deepall": train_side("deepall"), "bne": train_side("bne"), "loader": loader},
                         settings["reps"], settings["train_rounds"], sync)
    ips = {k: H.per_second(v) for k, v in runs.items()}
    cpu = {k: H.per_second(v, cpu=True) for k, v in runs.items()}
    faster = [max(a, c) for a, c in zip(ips["deepall"], ips["bne"])]
    results = {
        "bne_vs_deepall_train_throughput": H.ratio_entry(
            ips["bne"], ips["deepall"], ">= 0.9",
            f"BNE training images/s over DeepAll's (bne.train.train_step, {s} x {b} images a step, {p.train.resolution} px, "
            f"freeze_stages {cfg.freeze_stages}, norm {spec.norm}, ensemble_loss {cfg.ensemble_loss})",
            cpu=(cpu["bne"], cpu["deepall"]),
        ),
        "loader_vs_trainer_throughput": H.ratio_entry(
            ips["loader"], faster, ">= 3", "augmenting loader images/s over the faster trainer's images/s (same repetition)",
            cpu=(cpu["loader"], [max(a, c) for a, c in zip(cpu["deepall"], cpu["bne"])]),
        ),
    }
    med = {k: H.median(v) for k, v in ips.items()}
    results["bne_vs_deepall_train_throughput"]["sides"] = f"bne {med['bne']:.1f} / deepall {med['deepall']:.1f} img/s"
    results["loader_vs_trainer_throughput"]["sides"] = f"loader {med['loader']:.0f} img/s"
    detail = {k: H.side_summary(v) for k, v in runs.items()}
    return results, detail, {m: t.model.eval() for m, t in trainers.items()}


# ----------------------------------------------------------------------------------------------- inference


class _StatsRecorder:
    """A recorder that applies ``fn`` to every layer input (the diagnostic recorder sides of the inference section)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.out = fn, {}

    def __call__(self, layer, x: torch.Tensor) -> None:
        self.out[layer.layer_index] = self.fn(x.detach())


def _mean_only(x: torch.Tensor) -> torch.Tensor:
    """One read of the layer input (its spatial mean): less than any implementation of the statistics can cost."""
    return x.float().mean((2, 3))


def _fused_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``instance_stats`` written for torch.compile, which fuses the mean and E[x^2] into one loop over ``x``."""
    x = x.float()
    mean, mean_sq = x.mean((2, 3)), (x * x).mean((2, 3))
    return mean, (mean_sq - mean * mean).clamp_min(0).sqrt()


def measure_inference(p: P.Params, bne_model, deep_model, embeddings, images, device, settings, sync, compile_stats: bool) -> tuple[dict, dict]:
    """Per eval batch, alternated: BNE, S plain branch forwards, single-pass BNE, DeepAll, and the diagnostic sides."""
    batch, s = p.eval.batch, bne_model.num_domains
    base = p.eval.options.options()
    opts, opts_sp = replace(base, instance_stats="per_branch"), replace(base, instance_stats="single_pass")
    emb = embeddings[opts.embedding]
    chunk = branch_chunk(p.eval.branch_chunk, batch, device)  # eval.branch_chunk (auto: one branch per forward on CPU)
    settings["branch_chunk"] = chunk
    chunks = [slice(i, min(len(images), i + batch)) for i in range(0, len(images), batch)]
    bne_model.eval(), deep_model.eval()

    def bne(k):  # the deployed path (bne predict): the branches with the recorder, one distance, weights, ensemble
        sl = chunks[k]
        bne_inference(bne_model, images[sl], emb, opts, batch, device, chunk=chunk)
        return sl.stop - sl.start

    @torch.no_grad()
    def branch_forwards(k):  # S plain forwards of one branch each on the same batch, no recorder
        sl = chunks[k]
        x = to_tensor(images[sl]).to(device)
        for d in range(s):
            bne_model(x, domains=d)
        return sl.stop - sl.start

    @torch.no_grad()
    def batched_forward(k):  # diagnostic: the S x B batched forward alone (no recorder, no distances)
        sl = chunks[k]
        bne_model.branches(to_tensor(images[sl]).to(device))
        return sl.stop - sl.start

    def single_pass(k):  # one pass with the averaged statistics for the weights, then the S branches
        sl = chunks[k]
        bne_inference(bne_model, images[sl], emb, opts_sp, batch, device, chunk=chunk)
        return sl.stop - sl.start

    def deepall(k):
        sl = chunks[k]
        plain_probs(deep_model, images[sl], batch, device)
        return sl.stop - sl.start

    def mixstats(k):  # issue 19's variant 2b: one forward, each layer normalized with the image's weight-mixed statistics
        sl = chunks[k]
        mixed_probs(bne_model, images[sl], batch, device, lambda layers, allowed: mixstats_fn(layers, base.power, allowed))
        return sl.stop - sl.start

    def branches_with(fn: Callable):  # S one-branch forwards, every layer input handed to fn
        @torch.no_grad()
        def side(k):
            sl = chunks[k]
            x = to_tensor(images[sl]).to(device)
            for d in range(s):
                bne_model(x, domains=d, recorder=_StatsRecorder(fn))
            return sl.stop - sl.start

        return side

    sides = {"bne": bne, "branch_forwards": branch_forwards, "batched_forward": batched_forward, "single_pass": single_pass,
             "deepall": deepall, "mixstats": mixstats, "recorder_eager": branches_with(instance_stats), "recorder_one_pass": branches_with(_mean_only)}
    if compile_stats:
        t0 = time.perf_counter()
        try:  # inductor needs a C++ compiler (CPU) or Triton (GPU); compiled once per process, every layer shape
            fused = branches_with(torch.compile(_fused_stats, dynamic=True))
            fused(0)
            sides["recorder_fused"] = fused
            settings["fused_stats"] = f"torch.compile(dynamic=True), compiled in {time.perf_counter() - t0:.1f} s"
        except Exception as e:  # noqa: BLE001 - a diagnostic: report why and go on
            settings["fused_stats"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    else:
        settings["fused_stats"] = "not measured (--no-compile)"
    runs = H.interleaved(sides, settings["reps"], len(chunks), sync)
    spi = {k: H.per_unit(v) for k, v in runs.items()}  # seconds per image
    cpi = {k: H.per_unit(v, cpu=True) for k, v in runs.items()}
    results = {
        "bne_inference_vs_branch_forwards": H.ratio_entry(
            spi["bne"], spi["branch_forwards"], "<= 1.1",
            f"BNE time/image (bne.evaluate.bne_inference: {s} branches x {batch} images with the instance-statistics recorder, "
            f"distances, weighting; branch_chunk {chunk}) over {s} plain forwards of one branch",
            cpu=(cpi["bne"], cpi["branch_forwards"]),
        ),
        "single_pass_vs_deepall": H.ratio_entry(
            spi["single_pass"], spi["deepall"], None,
            f"single-pass BNE time/image ({s} branches for the probabilities plus one mean-statistics pass with the recorder "
            "for the distances) over DeepAll's plain forward",
            cpu=(cpi["single_pass"], cpi["deepall"]),
        ),
        "bne_inference_vs_deepall": H.ratio_entry(
            spi["bne"], spi["deepall"], None, f"reference: BNE time/image over DeepAll's ({s} branches)", cpu=(cpi["bne"], cpi["deepall"])
        ),
        "mixstats_vs_deepall": H.ratio_entry(
            spi["mixstats"], spi["deepall"], "<= 1.3",
            "statistics mixing (bne.mixing.mixstats_fn, issue 19 variant 2b) time/image: one forward whose every BN layer "
            f"normalizes each image with the mixture of the {s} domains' statistics weighted by its distances so far, "
            "over DeepAll's plain forward",
            cpu=(cpi["mixstats"], cpi["deepall"]),
        ),
        "batched_forward_vs_branch_forwards": H.ratio_entry(
            spi["batched_forward"], spi["branch_forwards"], None,
            f"diagnostic: the {s} x {batch} batched forward alone (no recorder, no distances) over {s} plain branch forwards",
            cpu=(cpi["batched_forward"], cpi["branch_forwards"]),
        ),
    }
    recorders = {
        "recorder_eager": "bne.stats.instance_stats as BNE runs it",
        "recorder_one_pass": "a recorder that reads every layer input once (spatial mean only): the least any implementation of the statistics can cost",
        "recorder_fused": "the statistics from torch.compile (mean and E[x^2] fused into one loop)",
    }
    ms = {k: 1000 * H.median(v) for k, v in spi.items()}
    for name, what in recorders.items():
        if name in spi:
            results[f"{name}_vs_branch_forwards"] = H.ratio_entry(
                spi[name], spi["branch_forwards"], None,
                f"diagnostic: {s} one-branch forwards with {what}, over the same forwards without a recorder",
                cpu=(cpi[name], cpi["branch_forwards"]),
            )
            results[f"{name}_vs_branch_forwards"]["sides"] = f"{ms[name]:.1f} / {ms['branch_forwards']:.1f} ms/img"
    results["bne_inference_vs_branch_forwards"]["sides"] = f"bne {ms['bne']:.1f} / {s} branches {ms['branch_forwards']:.1f} ms/img"
    results["single_pass_vs_deepall"]["sides"] = f"single-pass {ms['single_pass']:.1f} / deepall {ms['deepall']:.1f} ms/img"
    results["bne_inference_vs_deepall"]["sides"] = f"bne {ms['bne']:.1f} / deepall {ms['deepall']:.1f} ms/img"
    results["mixstats_vs_deepall"]["sides"] = f"mixstats {ms['mixstats']:.1f} / deepall {ms['deepall']:.1f} ms/img"
    results["batched_forward_vs_branch_forwards"]["sides"] = f"batched {ms['batched_forward']:.1f} / {s} branches {ms['branch_forwards']:.1f} ms/img"
    detail = {k: {**H.side_summary(v), "median_ms_per_image": round(ms[k], 2)} for k, v in runs.items()}
    return results, detail


def measure_stats(p: P.Params, bne_model, sources, device, settings, sync) -> tuple[dict, dict, tuple]:
    """``population_stats`` over the first images of every source domain's train rows (batches of eval.batch)."""
    batch, k = p.eval.batch, settings["stats_per_domain"]
    subsets = [np.ascontiguousarray(a.images[a.train[:k]]) for a in sources]  # in memory: extraction, not disk
    n = sum(len(x) for x in subsets)
    last = {}

    def run(_k):
        batches = [(d, (to_tensor(imgs[i : i + batch]) for i in range(0, len(imgs), batch))) for d, imgs in enumerate(subsets)]
        last["stats"] = population_stats(bne_model, batches, device)
        return n

    runs = H.interleaved({"population_stats": run}, settings["stats_reps"], 1, sync)["population_stats"]
    ips = H.per_second(runs)
    results = {
        "stats_extraction_images_per_s": {
            "value": round(H.median(ips), 1),
            "goal": None,
            "what": f"bne.stats.population_stats images/s over {n} source images (batch {batch}, {len(sources)} domains)",
            "raw": [round(v, 2) for v in ips],
            "sides": f"{n} images in {H.median([w for w, _, _ in runs]):.2f} s",
        }
    }
    return results, H.side_summary(runs), last["stats"]


# ----------------------------------------------------------------------------------------------- main


def print_table(report: dict) -> None:
    rows = []
    for name, m in report["measurements"].items():
        met = m.get("met")
        spread = m.get("raw_ratios") or m.get("raw") or []
        rng = f"{min(spread):.3g} .. {max(spread):.3g}" if len(spread) > 1 else ""
        rows.append((name, m["value"], m.get("goal") or "", "" if met is None else ("yes" if met else "NO"), rng,
                     m.get("cpu_time_ratio", ""), m.get("sides", "")))
    for name, err in report["errors"].items():
        rows.append((name, "error", "", "", "", "", err.strip().splitlines()[-1][:100]))
    mach, st = report["machine"], report["settings"]
    title = (f"bench/speed.py {st['mode']}: {st['data']}; {mach['device']}, {mach['torch_threads']} torch threads, "
             f"{mach['cpu_count']} CPUs, load average {mach['loadavg_before']} -> {mach['loadavg_after']}")
    H.print_table(title, ("measurement", "value", "goal", "met", "range over reps", "CPU-time ratio", "medians"), rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=H.ROOT / "params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)")
    ap.add_argument("--cache", type=Path, default=H.ROOT / "data" / "bench-cache", help="decoded-array cache of the dataset")
    ap.add_argument("--out", type=Path, help="default reports/bench/speed.json (--quick: reports/bench/speed.quick.json)")
    ap.add_argument("--quick", action="store_true", help="few repetitions: a check that the script works")
    ap.add_argument("--synthetic", action="store_true", help="random arrays instead of the dataset")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="torch threads (default: all cores)")
    ap.add_argument("--reps", type=int, help="repetitions of the comparisons")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile diagnostic (needs a C++ compiler; ~20 s cold)")
    ap.add_argument("--target", help="held-out domain (default: the first of dataset.folds, else the first domain)")
    args = ap.parse_args()
    out_path = args.out or H.ROOT / "reports" / "bench" / ("speed.quick.json" if args.quick else "speed.json")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(sections) - set(SECTIONS):
        ap.error(f"unknown section(s) {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}")

    settings = dict(QUICK if args.quick else FULL)
    if args.reps:
        settings["reps"] = args.reps
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start, load_before = time.perf_counter(), H.loadavg()
    p = P.load(args.params, args.overrides)
    device = pick_device(p.train.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    measurements, details, errors = {}, {}, {}

    def section(name: str, fn: Callable[[], tuple]) -> tuple | None:
        """Run one section, keep its results, time and load; an error is recorded and the others go on."""
        meter = H.LoadMeter()
        print(f"{name} ...", flush=True)
        try:
            res, det, *rest = fn()
        except Exception as e:  # noqa: BLE001  (the other measurements are still worth writing)
            errors[name] = "".join(traceback.format_exception_only(e))
            details[name] = {"traceback": traceback.format_exc(), "load": meter.stop()}
            print(details[name]["traceback"], file=sys.stderr, flush=True)
            return None
        measurements.update(res)
        details[name] = {**det, "load": meter.stop()}
        print(f"{name}: {details[name]['load']}", flush=True)
        return tuple(rest)

    arrays, domains, classes, data_desc = load_data(p, args.params.resolve().parent, args.cache, args.synthetic)
    target = args.target or next((t for t in p.dataset.folds if t in domains), domains[0])
    if target not in domains:
        raise SystemExit(f"--target {target!r} is not a domain of the data ({domains})")
    sources = [arrays[d] for d in domains if d != target][:3]  # per-domain batch x 3 source domains
    spec = p.model.spec(classes)
    cfg = p.train.config(seed=p.train.seeds[0])
    settings.update(
        mode="quick" if args.quick else "full", data=data_desc, sections=sections, target=target,
        sources=[a.name for a in sources], resolution=p.train.resolution, eval_batch=p.eval.batch,
        overrides=args.overrides, model=asdict(spec), train=asdict(cfg), inference_options=asdict(p.eval.options.options()),
    )
    print(f"data: {data_desc}; sources {settings['sources']}, target {target}; load average {load_before}", flush=True)
    got = section("train", lambda: measure_training(p, spec, cfg, sources, device, settings, sync)) if "train" in sections else None
    # Inference and statistics use the models the training comparison stepped (fresh ones without it).
    models = got[0] if got else {"deepall": H.trainer(spec, cfg, (), device).model.eval(),
                                 "bne": H.trainer(spec, cfg, tuple(a.name for a in sources), device).model.eval()}
    embeddings = {"running": running_stats(models["bne"].norm_layers())}
    if "stats" in sections or p.eval.options.embedding != "running":
        got = section("stats", lambda: measure_stats(p, models["bne"], sources, device, settings, sync))
        if got:
            embeddings.update(population=got[0][0], instance_average=got[0][1])
        if "stats" not in sections:  # computed only for the inference embedding
            measurements.pop("stats_extraction_images_per_s", None)
    if "inference" in sections:
        tgt = arrays[target]
        images = np.ascontiguousarray(tgt.images[: min(settings["infer_images"], len(tgt.images))])
        section("inference", lambda: measure_inference(p, models["bne"], models["deepall"], embeddings, images, device, settings, sync,
                                                       compile_stats=not (args.no_compile or args.quick)))

    other = {k: d["load"]["other_cores"] for k, d in details.items() if "other_cores" in d.get("load", {})}
    cpus = os.cpu_count() or 1
    busy = max(other.values(), default=0.0)
    warning = ""
    if busy > 0.25 * cpus:
        warning = f"other processes kept up to {busy:.1f} of {cpus} cores busy; " + (
            "with more than one torch thread a descheduled thread stalls the others, so times can be several-fold off: "
            "rerun on a quiet machine, or with --threads 1 for stable ratios" if args.threads > 1 else "ratios stay comparable, absolute rates are low"
        )
    report = H.write_report(out_path, {
        "contention": {"other_cores_by_section": other, "warning": warning},
        "settings": settings,
        "method": (
            "sides alternated call by call (one training step, one eval batch), the order rotated each round, one untimed "
            "warm-up call each; a ratio's value is the median of its per-repetition ratios; details.*.load: cores this "
            "process and other processes kept busy during each section, and the load average before and after it"
        ),
        "measurements": measurements,
        "errors": errors,
        "details": details,
    }, device, t_start, load_before)
    print_table(report)
    if warning:
        print("warning: " + warning)
    print(f"wrote {out_path} ({report['seconds_total']} s)")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
