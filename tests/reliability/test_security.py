"""Security: nothing is unpickled blindly, no path escapes its directory, no secret is written, and
no Ray dashboard or Jobs API listens beyond localhost unless the user deploys a cluster on purpose."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import pretrain
from reliability.conftest import SECRET, SECRET_ENV
from reliability.harness import ROOT
from pipeline.data.manifest import ManifestError, verify_manifest
from pipeline.train import checkpoint as ckpt

PIPELINE = ROOT / "pipeline"


# ---------------------------------------------------------------- unpickling


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


@pytest.mark.unit
def test_every_torch_load_in_our_code_is_weights_only():
    """torch.load(..., weights_only=True) everywhere; no pickle.load(s), no aliases of either."""
    offenders = []
    for path in sorted(PIPELINE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "cloudpickle"):
                if any(a.name in ("load", "loads") for a in node.names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import load")
        for call in _calls(tree):
            name = _dotted(call.func)
            where = f"{path.relative_to(ROOT)}:{call.lineno}: {name}"
            if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.load"):
                offenders.append(where)
            if name == "torch.load":
                kw = {k.arg: k.value for k in call.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(where + " without weights_only=True")
    assert not offenders, offenders


class _Payload:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _write_payload(path: Path, marker: Path) -> None:
    import torch

    torch.save({"torch": _Payload(marker), "module": _Payload(marker)}, path)


@pytest.mark.unit
def test_the_payload_really_runs_code_when_unpickled_blindly(tmp_path):
    """Control for the tests below: torch.load(weights_only=False) of the payload creates the marker."""
    _write_payload(tmp_path / "evil.pt", tmp_path / "pwned")
    code = f"import torch; torch.load({str(tmp_path / 'evil.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert (tmp_path / "pwned").read_text() == "pwned"


def _copy_of_reference(reference, tmp: Path, name: str) -> tuple[Path, Path]:
    """A run dir holding the reference run's checkpoints, and a config that resumes it (to step 10)."""
    run_dir = tmp / name
    shutil.copytree(reference.run_dir / "checkpoints", run_dir / "checkpoints", symlinks=True)
    raw = yaml.safe_load((reference.run_dir / "config.yaml").read_text())
    raw.update(run_dir=str(run_dir))
    raw["train"]["max_steps"] = 10
    raw["tracking"]["mode"] = "disabled"
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return run_dir, cfg


@pytest.mark.e2e
def test_malicious_pickle_placed_after_commit_is_refused_by_the_commit_hash(reference, tmp_path):
    run_dir, cfg = _copy_of_reference(reference, tmp_path, "tampered-rng")
    newest = ckpt.latest_committed(run_dir / "checkpoints", verify=False)
    _write_payload(newest.path / "rng_rank0.pt", tmp_path / "pwned")
    proc = pretrain("train", str(cfg), check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not (tmp_path / "pwned").exists(), "the payload ran"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "rng_rank0.pt" in lines[0] and "COMMIT" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def _rewrite_commit(checkpoint: Path) -> None:
    """What an attacker with write access does: make COMMIT match the altered files."""
    from pipeline.data.shards import sha256_file

    marker = json.loads((checkpoint / ckpt.COMMIT).read_text())
    marker["files"] = {name: sha256_file(checkpoint / name) for name in marker["files"]}
    (checkpoint / ckpt.COMMIT).write_text(json.dumps(marker))


@pytest.mark.e2e
@pytest.mark.parametrize("victim", ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    pytest.param("mp_rank_00_model_states.pt", marks=pytest.mark.slow),
                                    pytest.param("rng_rank1.pt", marks=pytest.mark.slow)])
def test_malicious_pickle_with_a_matching_commit_is_still_not_unpickled(reference, tmp_path, victim):
    """DeepSpeed loads its .pt files with weights_only=False; the resume forces weights-only loads."""
    run_dir, cfg = _copy_of_reference(reference, tmp_path, "tampered-" + victim.split(".")[0])
    newest = ckpt.latest_committed(run_dir / "checkpoints", verify=False)
    _write_payload(newest.path / victim, tmp_path / "pwned")
    _rewrite_commit(newest.path)
    proc = pretrain("train", str(cfg), check=False, timeout=300)
    assert not (tmp_path / "pwned").exists(), "the payload ran"
    assert proc.returncode != 0
    assert victim in proc.stderr and "refused to unpickle" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------- paths


def _tiny_dataset(root: Path) -> Path:
    from pipeline.data.manifest import write_manifest
    from pipeline.data.shards import ShardWriter

    (root / "train").mkdir(parents=True)
    with ShardWriter(root / "train" / "a-00000", "uint16") as w:
        w.add_document([1, 2, 3])
    (root / "tokenizer.json").write_text("{}")
    manifest = {"tokenizer": {"file": "tokenizer.json"},
                "splits": {"train": {"sources": {"a": {"shards": ["train/a-00000"]}}}}}
    write_manifest(root, manifest, ["tokenizer.json", "train/a-00000.bin", "train/a-00000.idx"])
    return root


def _edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.unit
@pytest.mark.parametrize("entry", ["../outside.bin", "/etc/hostname", "train/link.bin"])
def test_manifest_entries_cannot_point_outside_the_dataset(tmp_path, entry):
    root = _tiny_dataset(tmp_path / "data")
    (tmp_path / "outside.bin").write_bytes(b"x")
    (root / "train" / "link.bin").symlink_to(tmp_path / "outside.bin")
    _edit_manifest(root, lambda m: m["files"].__setitem__(entry, "0" * 64))
    with pytest.raises(ManifestError, match="outside the dataset directory"):
        verify_manifest(root)


@pytest.mark.unit
def test_a_shard_read_by_training_must_have_a_hash_in_the_manifest(tmp_path):
    root = _tiny_dataset(tmp_path / "data")
    verify_manifest(root)
    _edit_manifest(root, lambda m: m["splits"]["train"]["sources"]["a"]["shards"].append("../elsewhere/b-00000"))
    with pytest.raises(ManifestError, match="elsewhere/b-00000.bin"):
        verify_manifest(root)


@pytest.mark.unit
@pytest.mark.parametrize("entry", ["../../outside", "/etc/hostname", "link"])
def test_commit_entries_cannot_point_outside_the_checkpoint(tmp_path, entry):
    tmp = tmp_path / "ckpts" / f".tmp-{ckpt.tag_for(1)}"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_text("w")
    final = ckpt.commit(tmp_path / "ckpts", tmp, 1, keep_last=3)
    (tmp_path / "outside").write_text("o")
    (final / "link").symlink_to(tmp_path / "outside")
    marker = json.loads((final / ckpt.COMMIT).read_text())
    marker["files"][entry] = "0" * 64
    (final / ckpt.COMMIT).write_text(json.dumps(marker))
    with pytest.raises(ckpt.CheckpointError, match="outside the checkpoint"):
        ckpt.verify_checkpoint(final)


@pytest.mark.unit
def test_invalid_yaml_error_does_not_echo_the_file(tmp_path):
    from pipeline.config import ConfigError, load_config

    bad = tmp_path / "c.yaml"
    bad.write_text("wandb_password: hunter2-very-secret [\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "hunter2" not in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- secrets


@pytest.mark.e2e
def test_wandb_key_and_tokens_are_never_written(tiny, reference):
    """prepare and train ran with WANDB_API_KEY (and HF_TOKEN) set and W&B offline: no file under
    the run directory or the data directory, and nothing the CLI printed, holds either value."""
    assert list(reference.run_dir.glob("wandb/offline-run-*")), "W&B did not run: the check would prove nothing"
    needles = [v.encode() for k, v in SECRET_ENV.items() if "MODE" not in k]
    assert SECRET.encode() in needles
    found = []
    for root in (reference.run_dir, tiny.data_dir):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {n.decode()}" for n in needles if n in data]
    assert not found, found
    assert not any(n.decode() in reference.output for n in needles)


@pytest.mark.unit
def test_secret_pasted_into_a_config_field_is_redacted_in_the_wandb_config(monkeypatch):
    from pipeline.config import load_config
    from pipeline.tracking import public_config

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"tracking.group=team-{SECRET}"])
    text = json.dumps(public_config(cfg))
    assert SECRET not in text and "<redacted>" in text


# ---------------------------------------------------------------- Ray


@pytest.mark.unit
def test_embedded_ray_starts_without_dashboard_or_jobs_api(monkeypatch):
    import ray

    from pipeline.data import prepare

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    prepare.init_ray(num_cpus=1)
    # a new local instance (never an address found on the machine), with no dashboard / Jobs API
    assert seen.get("include_dashboard") is False and seen.get("address", "local") == "local"
    assert "dashboard_host" not in seen


@pytest.mark.unit
def test_no_launcher_binds_a_dashboard_beyond_localhost():
    """Rendered and shipped launch files: no `--dashboard-host` other than inside a container whose
    port is published on 127.0.0.1 only, no NodePort/LoadBalancer/Ingress for the Ray head."""
    from pipeline.config import load_config
    from pipeline.launch import k8s

    texts = {str(p.relative_to(ROOT)): p.read_text() for d in ("launch", "pipeline/launch")
             for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in ("", ".py", ".sbatch", ".yaml", ".sh")}
    for name, text in texts.items():
        assert "dashboard-host=0.0.0.0" not in text and "dashboard_host=\"0.0.0.0\"" not in text, name
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["launch.gpus_per_node=1", "launch.nodes=2",
                                                        "launch.k8s.storage_claim=pretrain-data"])  # required now
    rendered = yaml.safe_dump_all(k8s.render(cfg))
    for exposure in ("NodePort", "LoadBalancer", "Ingress", "dashboard-host"):
        assert exposure not in rendered, exposure
    compose = ROOT / "docker" / "compose.yaml"
    if compose.is_file():
        services = yaml.safe_load(compose.read_text()).get("services", {})
        ports = [str(p) for s in services.values() for p in s.get("ports", [])]
        assert all(p.startswith("127.0.0.1:") for p in ports), ports


@pytest.mark.e2e
def test_embedded_ray_really_serves_no_dashboard():
    code = (
        "import os; os.environ.pop('RAY_ADDRESS', None)\n"
        "from pipeline.data.prepare import init_ray\n"
        "import ray\n"
        "init_ray(num_cpus=1)\n"
        "info = ray._private.worker.global_worker.node.address_info\n"
        "print('webui', repr(info.get('webui_url')))\n"
        "ray.shutdown()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "webui None" in proc.stdout or "webui ''" in proc.stdout, proc.stdout
