"""Reusable, stateful fakes of cloud APIs for tests: real clients talk to them over loopback.

- `gcp_server.FakeGcpServer`: Compute Engine REST (zones, accelerator/machine types, regions with
  quotas, managed instance groups with resize, zone operations).
- `k8s_server.FakeKubernetes`: Kubernetes API (nodes, pods, deployments and their scale, label and
  field selectors) with a tiny scheduler so GPU pods land on nodes with free GPUs.
- `aws_quotas.ec2_gpu_quotas`: adds EC2 GPU quotas to moto's Service Quotas (moto ships only VPC's).

Import as `from tests.fakes import gcp_server` (the tests' conftest puts the repo root on sys.path).
"""
