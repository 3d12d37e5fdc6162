from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

BASE = """\
fleet: test-fleet
clouds:
  aws: {region: us-east-1, cluster: prod-eks}
  gcp: {project: acme-ml, region: us-central1, cluster: prod-gke}
nodepools:
  - name: aws-h100
    cloud: aws
    zones: [us-east-1a, us-east-1b]
    instance_type: p5.48xlarge
    priority: 100
    min_nodes: 1
    max_nodes: 4
    warm_nodes: 1
  - name: gcp-l4
    cloud: gcp
    zones: [us-central1-a, us-central1-b]
    instance_type: g2-standard-48
    priority: 50
    min_nodes: 0
    max_nodes: 2
deployments:
  - name: llama-8b
    model: meta-llama/Llama-3.1-8B-Instruct
    gpus_per_replica: 1
    min_replicas: 4
    max_replicas: 16
    max_model_len: 16384
"""


@pytest.fixture
def write_fleet(tmp_path: Path):
    """Write a declaration to tmp_path/fleet.yaml and return its path."""

    def write(text: str = BASE, name: str = "fleet.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write
