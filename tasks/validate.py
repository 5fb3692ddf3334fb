"""Pipeline stage 2: a Great Expectations gate on the ingest manifest.

``validate_manifest`` always writes ``<reports>/<dataset>/validation.json`` (success, every failed check with its
count and examples naming file, domain and class; warnings) and ``validation.md`` (a short summary). Only when the
manifest passes is it copied, atomically, to ``manifest.validated.parquet`` next to it: later stages read that copy,
so a failed validation leaves the last good one (and everything built from it) untouched.

GX expresses the per-row checks (nulls, ranges, value sets, uniqueness, class/label pairs). Checks across rows that it
does not express (every class in every domain, images per domain and class, identical content across domains or
splits) are computed with pandas and reported in the same structure. Decoding, size and mode were recorded at ingest.
Near-duplicates across domains (the same picture re-encoded or resized: a perceptual hash, :mod:`bne.dedup`, within
``validation.near_duplicate_bits``) are a warning naming both files; the manifest is not changed by it.

The configured ``dataset.domains`` / ``dataset.classes`` / ``dataset.root`` apply only to a manifest of the configured
dataset (``dataset.name``); any other manifest is validated on its own, and the report says so.

Beside the validated copy, ``manifest.parquet.validation.json`` records its SHA-256 and the source it was checked
against: the stages after validation read the manifest through :func:`bne.ingest.dataset_from_manifest`, which
refuses a copy whose hash differs (edited after validation) and re-checks the rows it relies on.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.row_conditions import Column

from bne.dedup import BITS, near_pairs, perceptual_hashes
from bne.ingest import (
    RGB_MODES,
    SCHEMA,
    path_problem,
    read_manifest_meta,
    validated_path,
    write_validation_record,
)
from bne.io import atomic_call, atomic_write
from tasks.paths import resolve

EXAMPLES = 20
KWARGS = ("column", "column_A", "column_B", "min_value", "max_value")  # what the report shows of an expectation
WHERE = ["path", "domain", "class"]
HASH_WORKERS = 4  # decoding threads of the perceptual hashes


@dataclass(frozen=True)
class ValidationConfig:
    min_per_class: int  # fewer images of a class in a domain is a warning
    min_size: int  # smallest accepted width and height, pixels
    near_duplicate_bits: int  # perceptual hashes (of bne.dedup.BITS) this close across domains: a warning
    max_pixels: int  # the decode rules' limit when the images are read for the hashes
    domains: tuple[str, ...] | None = None  # when given, the manifest must have exactly these
    classes: tuple[str, ...] | None = None
    # when given, the manifest's source must be one of these folders: the configured dataset.root, relative to
    # the params file's folder when known, else to the project folder or the working folder
    source: tuple[str, ...] | None = None


PARAMS = ("dataset.name", "dataset.root", "dataset.domains", "dataset.classes", "dataset.max_pixels",
          "validation.min_per_class", "validation.min_size", "validation.near_duplicate_bits")


def config_for(p, manifest: Path | str, bases: Sequence[Path | str] = (".",)) -> tuple[ValidationConfig, str]:
    """The suite's settings for ``manifest`` and a note: the configured domains, classes and root only for its dataset.

    ``bases``: the folders ``dataset.root`` may be relative to (the params file's; where the stages run).
    """
    cfg = ValidationConfig(min_per_class=p.validation.min_per_class, min_size=p.validation.min_size,
                           near_duplicate_bits=p.validation.near_duplicate_bits, max_pixels=p.dataset.max_pixels)
    name = read_manifest_meta(manifest)["dataset"]
    source = tuple(dict.fromkeys(str(resolve(b, p.dataset.root)) for b in bases))
    if name != p.dataset.name:
        return cfg, (f"{manifest} is dataset {name!r}, not the configured {p.dataset.name!r}: "
                     "validated on its own (dataset.domains, dataset.classes and dataset.root not applied)")
    return replace(cfg, domains=tuple(p.dataset.domains), classes=tuple(p.dataset.classes) or None, source=source), ""


def run(p, layout, reports_root: Path, base: Path | str | None = None) -> dict:
    """The pipeline's gate: ``layout.ingest``'s manifest -> ``layout.manifest`` on success.

    ``base``: the params file's folder (``dataset.root`` is relative to it); when not given, the project folder
    or the working folder (the same folder under ``dvc repro`` and the flows).
    """
    manifest = layout.ingest / "manifest.parquet"
    cfg, note = config_for(p, manifest, [base] if base is not None else [Path("."), layout.root])
    return validate_manifest(manifest, reports_root, cfg, layout.manifest, note)


def _plain(v: object) -> object:
    """JSON-safe: numpy scalars to Python, NaN to None, whole floats to int, tuples to lists."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or v.is_integer()):  # ints that pandas made floats by a null
        return None if math.isnan(v) else int(v)
    return v


def _suite(meta: dict, cfg: ValidationConfig) -> list[tuple[str, gxe.Expectation]]:
    """(check name, expectation) pairs, in report order."""
    classes, domains = meta["classes"], meta["domains"]
    decoded = Column("error") == ""
    in_set, between = gxe.ExpectColumnValuesToBeInSet, gxe.ExpectColumnValuesToBeBetween
    same_set, pair_in_set = gxe.ExpectColumnDistinctValuesToEqualSet, gxe.ExpectColumnPairValuesToBeInSet
    checks = [("manifest columns", gxe.ExpectTableColumnsToMatchSet(column_set=SCHEMA.names, exact_match=True))]
    checks += [
        (f"no nulls in {c}", gxe.ExpectColumnValuesToNotBeNull(column=c))
        for c in ("path", "domain", "class", "label", "split", "sha256", "bytes", "converted", "error")
    ]
    checks += [
        (f"no nulls in {c} of decoded images", gxe.ExpectColumnValuesToNotBeNull(column=c, row_condition=decoded))
        for c in ("width", "height", "mode")
    ]
    pairs = [(c, i) for i, c in enumerate(classes)]
    checks += [
        ("every image decodes", in_set(column="error", value_set=[""])),
        ("no empty files", between(column="bytes", min_value=1)),
        (f"width at least {cfg.min_size} px", between(column="width", min_value=cfg.min_size)),
        (f"height at least {cfg.min_size} px", between(column="height", min_value=cfg.min_size)),
        ("RGB or converts cleanly", in_set(column="mode", value_set=list(RGB_MODES))),
        (f"labels within 0..{len(classes) - 1}", between(column="label", min_value=0, max_value=len(classes) - 1)),
        ("label matches class", pair_in_set(column_A="class", column_B="label", value_pairs_set=pairs)),
        ("split is train, val or test", in_set(column="split", value_set=["train", "val", "test"])),
        ("unique paths", gxe.ExpectColumnValuesToBeUnique(column="path")),
        ("sha256 is 64 hex digits", gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex="^[0-9a-f]{64}$")),
        ("domains match the manifest metadata", same_set(column="domain", value_set=domains)),
        ("classes match the manifest metadata", same_set(column="class", value_set=classes)),
    ]
    if cfg.domains:
        checks.append(("domains match the configuration", same_set(column="domain", value_set=list(cfg.domains))))
    if cfg.classes:
        checks.append(("classes match the configuration", same_set(column="class", value_set=list(cfg.classes))))
    return checks


def _gx_exception(info: dict) -> str | None:
    """The message of an exception GX caught (top level, or keyed by metric)."""
    raised = [info] + [v for v in info.values() if isinstance(v, dict)]
    return next((e["exception_message"] for e in raised if e.get("raised_exception")), None)


def _gx_examples(result: dict) -> list[dict]:
    """Failing rows (with path, domain, class), else missing/unexpected values, else what GX observed."""
    return (
        result.get("partial_unexpected_index_list")
        or [{"missing": v} for v in result.get("partial_missing_list", [])]
        + [{"unexpected": v} for v in result.get("partial_unexpected_list", [])]
        or [{"observed": result.get("observed_value"), **result.get("details", {})}]
    )


def _run_gx(df: pd.DataFrame, checks: list[tuple[str, gxe.Expectation]]) -> list[dict]:
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_pandas("pandas")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": df})
    )
    for name, exp in checks:
        exp.meta = {"check": name}
    res = batch.validate(
        gx.ExpectationSuite(name="manifest", expectations=[e for _, e in checks]),
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": WHERE,
            "partial_unexpected_count": EXAMPLES,
        },
    )
    out = []
    for r in res.results:
        cfg, result = r.expectation_config, r.result or {}
        error = _gx_exception(r.exception_info or {})
        examples = [] if r.success or error else _gx_examples(result)
        out.append(
            {
                "check": cfg.meta["check"],
                "expectation": cfg.type,
                "kwargs": {k: v for k, v in cfg.kwargs.items() if k in KWARGS},
                "severity": "error",
                "success": bool(r.success),
                "unexpected_count": result.get("unexpected_count", len(examples)),
                "examples": examples[:EXAMPLES],
            }
            | ({"exception": error} if error else {})
        )
    order = [name for name, _ in checks]
    return sorted(out, key=lambda c: order.index(c["check"]))


def _check(name: str, severity: str, examples: list[dict], count: int | None = None) -> dict:
    return {
        "check": name,
        "expectation": "pandas",
        "severity": severity,
        "success": not examples,
        "unexpected_count": len(examples) if count is None else count,
        "examples": examples[:EXAMPLES],
    }


def _same_folder(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _source_checks(df: pd.DataFrame, meta: dict, cfg: ValidationConfig) -> list[dict]:
    """Paths inside the recorded source (resolved, links included), shaped ``<domain>/<class>/<file>`` of their row;
    the source the configured ``dataset.root``."""
    root = Path(str(meta.get("source")))
    resolved = root.resolve()
    outside, shape, folders = [], [], {}
    errors = df["error"] if "error" in df else pd.Series([""] * len(df))
    for r, error in zip(df[WHERE].itertuples(index=False), errors):
        if error:  # a row error (undecodable, an odd file name) already fails "every image decodes"
            continue
        problem = path_problem(root, r.path, resolved, folders)
        if problem:
            outside.append({"path": r.path, "domain": r.domain, "class": r[2], "problem": problem})
        elif r.path.split("/")[:-1] != [r.domain, r[2]]:
            shape.append({"path": r.path, "domain": r.domain, "class": r[2]})
    checks = [
        _check("paths are relative and inside the source", "error", outside),
        _check("path is <domain>/<class>/<file> of its row", "error", shape),
    ]
    if cfg.source is not None:
        same = _checked_root(meta, cfg)
        checks.append(_check("source is the configured dataset.root", "error",
                             [] if same else [{"source": meta.get("source"), "dataset.root": " or ".join(cfg.source)}]))
    return checks


def _near_duplicate_checks(df: pd.DataFrame, meta: dict, cfg: ValidationConfig) -> list[dict]:
    """The same picture in two domains though not the same bytes (those are an error above): a warning naming both.

    Only rows that decoded at ingest and lie inside the recorded source are opened; a file that cannot be hashed
    now (gone, changed into something else) is a warning of its own.
    """
    if any(c not in df for c in (*WHERE, "sha256")):  # "manifest columns" fails already
        return []
    root = Path(str(meta.get("source")))
    resolved, folders = root.resolve(), {}
    errors = df["error"] if "error" in df else pd.Series([""] * len(df))
    rows = [i for i, (path, error) in enumerate(zip(df["path"], errors))
            if not error and isinstance(path, str) and not path_problem(root, path, resolved, folders)]
    sub = df.iloc[rows][[*WHERE, "sha256"]].reset_index(drop=True)
    hashes, failed = perceptual_hashes([root / p for p in sub["path"]], cfg.max_pixels, HASH_WORKERS)
    shas = sub["sha256"].tolist()
    pairs = [(a, b, d) for a, b, d in near_pairs(hashes, sub["domain"].tolist(), cfg.near_duplicate_bits,
                                                  skip=[i in failed for i in range(len(sub))])
             if shas[a] != shas[b]]
    near = [{"path": sub.at[a, "path"], "domain": sub.at[a, "domain"], "class": sub.at[a, "class"],
             "near_duplicate": sub.at[b, "path"], "its_domain": sub.at[b, "domain"], "its_class": sub.at[b, "class"],
             "bits": d} for a, b, d in pairs[:EXAMPLES]]
    unhashed = [{"path": sub.at[i, "path"], "domain": sub.at[i, "domain"], "class": sub.at[i, "class"], "problem": msg}
                for i, msg in sorted(failed.items())]
    return [
        _check(f"no near-duplicate pictures across domains (perceptual hashes within {cfg.near_duplicate_bits} of {BITS} bits)",
               "warning", near, len(pairs)),
        _check("every image readable for its perceptual hash", "warning", unhashed),
    ]


def _checked_root(meta: dict, cfg: ValidationConfig) -> str | None:
    """The configured root the manifest's source is (resolved, links included); None when it is none of them."""
    return next((s for s in cfg.source or () if _same_folder(str(meta.get("source")), s)), None)


def _row_checks(df: pd.DataFrame, meta: dict, cfg: ValidationConfig) -> list[dict]:
    classes = sorted(set(meta["classes"]) | set(df["class"].dropna()))
    present = df.groupby("domain")["class"].agg(set)
    missing = [{"domain": d, "class": c} for d, have in present.items() for c in classes if c not in have]
    counts = df.groupby(["domain", "class"]).size()
    few = [{"domain": d, "class": c, "value": int(n)} for (d, c), n in counts.items() if n < cfg.min_per_class]
    checks = [
        _check("every class in every domain", "error", missing),
        _check(f"at least {cfg.min_per_class} images per domain and class", "warning", few),
    ]
    for across in ("domain", "split"):
        spread = df.groupby("sha256")[across].transform("nunique")
        dup = df[spread > 1].sort_values(["sha256", "path"])
        examples = [
            {"path": r.path, "domain": r.domain, "class": r["class"], "sha256": r.sha256, across: r[across]}
            for _, r in dup.head(EXAMPLES).iterrows()
        ]
        label = "domains" if across == "domain" else "train/val/test"
        checks.append(_check(f"no identical content across {label}", "error", examples, len(dup)))
    return checks


def _describe(example: dict) -> str:
    """``path (domain d, class c): other=value`` for a file, ``domain=d, class=c`` otherwise."""
    if "path" not in example:
        return ", ".join(f"{k}={v}" for k, v in example.items())
    rest = ", ".join(f"{k}={v}" for k, v in example.items() if k not in WHERE)
    where = f"{example['path']} (domain {example.get('domain')}, class {example.get('class')})"
    return f"{where}: {rest}" if rest else where


def summary(report: dict) -> str:
    """A few lines: the outcome, then each failed check and warning with its first examples."""
    n = len(report["failures"]) + len(report["warnings"]) + len(report["passed"])
    head = "passed" if report["success"] else f"FAILED ({len(report['failures'])} of {n} checks)"
    lines = [f"validation of {report['manifest']} ({report['rows']} images): {head}"]
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    for kind, group in (("error", report["failures"]), ("warning", report["warnings"])):
        for c in group:
            exc = f": {c['exception']}" if c.get("exception") else ""
            lines.append(f"- {kind}: {c['check']} ({c['unexpected_count']}){exc}")
            lines += [f"    {_describe(e)}" for e in c["examples"][:5]]
            if c["unexpected_count"] > 5:
                lines.append(f"    ... {c['unexpected_count'] - 5} more in validation.json")
    return "\n".join(lines)


def validate_manifest(
    manifest_path: Path | str,
    reports_dir: Path | str,
    config: ValidationConfig,
    validated: Path | str | None = None,
    note: str = "",
) -> dict:
    """Run the suite; write the report (always) and the validated copy (on success); return the report.

    ``validated`` is where the copy goes (default: ``manifest.validated.parquet`` beside the manifest).
    """
    manifest_path = Path(manifest_path)
    meta = read_manifest_meta(manifest_path)
    df = pd.read_parquet(manifest_path)
    missing = [c for c in SCHEMA.names if c not in df.columns]
    if missing:  # the row checks need every column: refuse before any work, nothing written
        raise ValueError(f"{manifest_path}: not a manifest of `bne ingest`: columns {missing} missing; rerun the ingest stage")
    checks = (_run_gx(df, _suite(meta, config)) + _row_checks(df, meta, config) + _source_checks(df, meta, config)
              + _near_duplicate_checks(df, meta, config))
    report = _plain(
        {
            "dataset": meta["dataset"],
            "manifest": str(manifest_path),
            "success": all(c["success"] for c in checks if c["severity"] == "error"),
            "rows": len(df),
            "config": asdict(config),
            "note": note,
            "great_expectations": gx.__version__,
            "failures": [c for c in checks if not c["success"] and c["severity"] == "error"],
            "warnings": [c for c in checks if not c["success"] and c["severity"] == "warning"],
            "passed": [c["check"] for c in checks if c["success"]],
        }
    )
    out = Path(reports_dir) / meta["dataset"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "validation.json", json.dumps(report, indent=1, ensure_ascii=False))
    atomic_write(out / "validation.md", summary(report) + "\n")
    if report["success"]:
        target = Path(validated) if validated else validated_path(manifest_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_call(target, lambda tmp: shutil.copyfile(manifest_path, tmp))
        # after the copy: a run killed in between leaves a record that does not match, and the copy is refused
        write_validation_record(target, {"dataset": meta["dataset"], "rows": len(df), "source": meta["source"],
                                         "dataset_root": _checked_root(meta, config), "great_expectations": gx.__version__})
    return report
