"""`pretrain submit` and `pretrain plan` for a run on object storage need no shared filesystem:
the job's config goes to the store and every node reads it from there (a real S3 API server on
loopback: moto's server, an emulator of the S3 API, not AWS)."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from conftest import pretrain

pytestmark = pytest.mark.e2e


def test_a_slurm_dry_run_of_an_s3_run_puts_its_config_on_the_store(s3, tmp_path):
    run = f"s3://{s3.bucket}/runs/cluster"
    proc = pretrain("submit", "configs/demo.yaml", "--to", "slurm", "--nodes", "2", "--dry-run",
                    "--set", f"run_dir={run}", "--set", f"data.output_dir=s3://{s3.bucket}/data")
    script = proc.stdout
    ref = re.search(r"-m pipeline\.cli train (s3://\S+\.yaml)", script)
    assert ref and ref.group(1).startswith(f"{run}/submitted/slurm-"), script
    assert "#SBATCH --output=/tmp/" in script  # no folder the nodes share: the log stays on the first node
    key = ref.group(1).removeprefix(f"s3://{s3.bucket}/")
    body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    cfg = yaml.safe_load(body)
    assert cfg["run_dir"] == run and cfg["data"]["output_dir"] == f"s3://{s3.bucket}/data"
    assert "testing" not in body.decode()  # no credential in what is shipped
    # what the job's nodes do first: load that config from the store
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    loaded = pretrain("plan", ref.group(1), "--world-size", "2", check=False)
    assert "config file not found" not in loaded.stderr and "Traceback" not in loaded.stderr, loaded.stderr[-2000:]


def test_plan_reads_a_dataset_on_the_store_without_staging_it(trained_run, s3, tmp_path):
    c = s3.client()
    data_dir = trained_run["data_dir"]
    for p in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        c.upload_file(str(p), s3.bucket, f"data/{p.relative_to(data_dir).as_posix()}")
    sets = list(trained_run["sets"])
    sets = [s.replace(str(data_dir), f"s3://{s3.bucket}/data").replace(str(trained_run["run_dir"]),
                                                                       f"s3://{s3.bucket}/run") for s in sets]
    proc = pretrain("plan", "configs/demo.yaml", *sets, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert not (tmp_path / "node-cache" / "data").exists()  # read the manifest only, staged nothing
