"""What a W&B offline run file records besides history: metric definitions and artifacts (lineage)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.wandb_log import _payloads


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record.WhichOneof("record_type"), record


def metric_definitions(path: Path) -> list[tuple[str, str]]:
    """(metric name or glob, its step metric) of each define_metric."""
    return [(r.metric.glob_name or r.metric.name, r.metric.step_metric) for kind, r in _records(path) if kind == "metric"]


def artifacts(path: Path) -> list[dict]:
    """Each artifact the run logged: type, name, digest, aliases, used (an input) or not (an output),
    its metadata and the paths and references of its entries."""
    out = []
    for kind, r in _records(path):
        if kind != "artifact":
            continue
        a = r.artifact
        out.append({"type": a.type, "name": a.name, "digest": a.digest, "aliases": list(a.aliases),
                    "used": a.use_after_commit, "metadata": json.loads(a.metadata or "{}"),
                    "entries": {c.path: c.ref for c in a.manifest.contents}})
    return out
