"""Read a W&B offline run file (``run-<id>.wandb``) without a server, to assert what was logged.

The file is W&B's record log: a 7-byte header (":W&B", u16 magic 0xBEE1, u8 version), then 32 KiB
blocks of chunks, each with a 7-byte header (u32 checksum, u16 length, u8 type: 1 full, 2 first,
3 middle, 4 last) and a piece of a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B record log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_run(path: str | Path) -> dict:
    """{'run': {id, project, group, job_type}, 'history': [{key: value}], 'config': {...}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"run": {}, "history": [], "config": {}}
    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out["run"] = {"id": r.run_id, "project": r.project, "group": r.run_group, "job_type": r.job_type}
            for item in r.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            out["history"].append(row)
    return out


def offline_runs(run_dir: str | Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
