"""The results registry: one JSON record per trained run, written only by code, never by hand.

``python -m mlcore.evaluate RUN`` scores a run's ``best.pt`` and writes ``RUN/record.json``:

==================  ==================================================================================
``run``, ``preset``  the folder's name and the preset it was trained from; ``method``, ``seed``
``config``           every hyper-parameter (the run's ``config.json``)
``training``         steps trained, wall time summed over sessions, each session (device, torch,
                     threads, dates, the command line), and the validation history (step, wall time,
                     validation score) for time-to-accuracy curves
``checkpoint``       the evaluated file (relative to the record), its sha256, the step and validation
                     score it was saved at (the best on validation)
``evaluations``      one entry per protocol: split, ways, shots, queries per class, episodes, inner
                     steps, transductive or not, seed; mean ± 95% CI over episodes, seconds per
                     episode, device, torch, date, and the command that produced it
==================  ==================================================================================

Evaluating again with the same protocol replaces that entry; another protocol adds one.
:func:`summarise` groups records of the same preset and protocol (several seeds) into mean ± 95% CI
over seeds (Student's t, since there are few) beside the mean CI over episodes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["RECORD_FORMAT", "sha256", "sessions", "update_record", "load_records", "summarise", "Summary", "t_quantile",
           "time_to"]

RECORD_FORMAT = "mlcore.results/1"

# 97.5% quantiles of Student's t with df = 1..30 degrees of freedom (two-sided 95% intervals).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (1.96 beyond 30)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile: df must be a positive integer, got {df!r}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sessions(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The training sessions of a run folder, one dict per line of ``RUN/sessions.jsonl`` ([] if none)."""
    path = Path(run) / "sessions.jsonl"
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}, is not JSON ({err}); the file is append-only, one "
                                 f"object per line") from err
    return out


def update_record(run: str | os.PathLike, evaluation: dict[str, Any], *, checkpoint: str | os.PathLike,
                  checkpoint_meta: dict[str, Any], history: Any | None) -> dict[str, Any]:
    """Write (or update) ``run/record.json`` with one evaluation; return the record.

    ``history`` (an :class:`~mlcore.train.History` or ``None``) provides the validation curve and
    the training wall time; without it, the curve of an existing record is kept.
    """
    from .experiment import write_json

    run = Path(run)
    path = run / "record.json"
    old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    config = json.loads((run / "config.json").read_text())["config"]
    run_sessions = sessions(run)
    training = dict(old.get("training", {}))
    training["sessions"] = run_sessions
    training["devices"] = sorted({s["device"] for s in run_sessions})
    training["torch"] = sorted({s["torch"] for s in run_sessions})
    if history is not None and len(history):
        metric = "val_acc" if "val_acc" in history else "val_mse" if "val_mse" in history else None
        steps, wall, values = [], [], []
        if metric is not None:
            for s, w, v in zip(history.steps, history.wall_time, history[metric], strict=True):
                if not math.isnan(v):
                    steps.append(s + 1)
                    wall.append(round(w, 2))
                    values.append(v)
        training.update(steps=history.steps[-1] + 1, wall_seconds=round(history.wall_time[-1], 1),
                        validation={"metric": metric, "steps": steps, "wall_seconds": wall, "values": values})
    checkpoint = Path(checkpoint)
    entry = {"file": os.path.relpath(checkpoint, run), "sha256": sha256(checkpoint),
             "step": checkpoint_meta.get("step"), "val_metric": checkpoint_meta.get("val_metric"),
             "val_value": checkpoint_meta.get("val_value")}
    evaluations = [e for e in old.get("evaluations", []) if e["protocol"] != evaluation["protocol"]]
    evaluations.append(evaluation)
    evaluations.sort(key=lambda e: json.dumps(e["protocol"], sort_keys=True))
    record = {"format": RECORD_FORMAT, "run": run.name, "preset": config.get("preset", ""),
              "method": config["method"], "seed": config["seed"], "config": config, "training": training,
              "checkpoint": entry, "evaluations": evaluations,
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(path, record)
    return record


def load_records(root: str | os.PathLike = "results") -> list[dict[str, Any]]:
    """Every ``record.json`` under ``root`` (sorted by run name); a malformed one raises, naming it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"load_records: {root} is not a folder; the registry lives in results/ at the "
                                f"repository's root (or pass the folder that holds the run folders)")
    records = []
    for path in sorted(root.rglob("record.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        if record.get("format") != RECORD_FORMAT:
            raise ValueError(f"{path} is not a results record (format {record.get('format')!r}, "
                             f"expected {RECORD_FORMAT!r})")
        record["_path"] = str(path)
        records.append(record)
    return records


@dataclass(frozen=True)
class Summary:
    """Several seeds of one preset under one protocol."""

    preset: str
    protocol: dict[str, Any]
    metric: str
    seeds: tuple[int, ...]
    means: tuple[float, ...]          # one per seed (mean over its episodes)
    mean: float                       # mean over seeds
    ci95_seeds: float                 # t-based 95% CI over seeds (nan for one seed)
    ci95_episodes: float              # mean of the per-seed episode CIs
    steps: tuple[int, ...]
    wall_seconds: tuple[float, ...]
    devices: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(records: Iterable[dict[str, Any]]) -> list[Summary]:
    """Group evaluations by (preset, protocol) across seeds: mean ± t-based 95% CI over seeds."""
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for record in records:
        for evaluation in record["evaluations"]:
            key = json.dumps([record["preset"], evaluation["protocol"]], sort_keys=True)
            groups.setdefault(key, []).append((record, evaluation))
    out = []
    for key, items in groups.items():
        items.sort(key=lambda item: item[0]["seed"])
        means = tuple(e["mean"] for _, e in items)
        n = len(means)
        mean = sum(means) / n
        if n > 1:
            sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1))
            ci = t_quantile(n - 1) * sd / math.sqrt(n)
        else:
            ci = math.nan
        out.append(Summary(
            preset=items[0][0]["preset"], protocol=items[0][1]["protocol"], metric=items[0][1]["metric"],
            seeds=tuple(r["seed"] for r, _ in items), means=means, mean=mean, ci95_seeds=ci,
            ci95_episodes=sum(e["ci95"] for _, e in items) / n,
            steps=tuple(r["training"].get("steps", 0) for r, _ in items),
            wall_seconds=tuple(r["training"].get("wall_seconds", math.nan) for r, _ in items),
            devices=tuple(sorted({d for r, _ in items for d in r["training"].get("devices", [])}))))
    out.sort(key=lambda s: (s.preset, json.dumps(s.protocol, sort_keys=True)))
    return out


def time_to(record: dict[str, Any], threshold: float) -> tuple[int, float] | None:
    """(step, training seconds) at which validation first reached ``threshold`` (accuracy), or None."""
    validation = record.get("training", {}).get("validation") or {}
    for step, wall, value in zip(validation.get("steps", []), validation.get("wall_seconds", []),
                                 validation.get("values", []), strict=True):
        if value >= threshold:
            return step, wall
    return None
