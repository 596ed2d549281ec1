"""``cluster.yaml`` against the Ray cluster launcher's own config schema (shipped with Ray), and the
properties that keep a cluster's data: the store on S3, no local store mount, a small upload,
setup commands that install camscope and are safe to re-run."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(CONFIG, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(CONFIG))  # what `ray up` runs: the AWS defaults filled in, then checked


def test_the_store_is_on_s3_and_nodes_reach_it_by_instance_profile():
    text = (ROOT / "cluster.yaml").read_text()
    assert "/mnt/store" not in text and "nfs" not in text.lower()
    assert "CAMSCOPE_STORE=s3://" in " ".join(CONFIG["head_start_ray_commands"])
    for node in CONFIG["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert "AWS_SECRET_ACCESS_KEY" not in text


def test_upload_excludes_the_virtualenv_git_and_caches():
    assert CONFIG["file_mounts"] == {"~/camscope": "."}
    excluded = set(CONFIG["rsync_exclude"])
    assert {".venv", ".git", "**/__pycache__"} <= excluded


def test_setup_installs_camscope_and_is_safe_to_re_run():
    setup = CONFIG["setup_commands"]
    assert any("pip install" in c and "-e ~/camscope" in c for c in setup)
    venv = next(c for c in setup if "python3 -m venv" in c)
    assert venv.startswith("test -x ~/venv/bin/python ||"), "creating the venv twice must be a no-op"
    bashrc = [c for c in setup if ">> ~/.bashrc" in c]
    assert bashrc and all(c.startswith("grep -qxF") for c in bashrc), "re-running must not append twice"
