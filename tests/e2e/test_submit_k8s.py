"""`pretrain submit --to k8s` end to end, short of a Kubernetes cluster (none runs in CI)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from conftest import pretrain

pytestmark = pytest.mark.e2e


def test_dry_run_prints_the_configmap_and_the_rayjob(tmp_path):
    out = pretrain("submit", "configs/demo.yaml", "--to", "k8s", "--dry-run", "--nodes", "2",
                   "--gpus-per-node", "8", "--set", "launch.k8s.storage_claim=lm").stdout
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert docs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2


def test_apply_without_a_reachable_cluster_is_one_clear_line(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
        "users": [{"name": "none", "user": {}}],
    }))
    done = pretrain("submit", "configs/demo.yaml", "--to", "k8s", "--set", "launch.k8s.storage_claim=lm",
                    check=False, timeout=120,
                    env={"KUBECONFIG": str(kubeconfig)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    expected = "kubectl apply failed" if shutil.which("kubectl") else "`kubectl` is not on PATH"
    assert done.stderr.startswith("pretrain submit: error: ") and expected in done.stderr, done.stderr
