"""Placement against a fake multi-device Ray cluster (its own module: the test process stays connected
to it until the module ends)."""

import pytest
import ray
from ray.cluster_utils import Cluster

from runner.config import build_experiment
from runner.launch.sweep import assigned_device, task_options

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fake_cluster():
    """A head with CPUs only, a worker with a (fake) GPU and a worker with the custom resource mps."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.add_node(num_cpus=1, resources={"mps": 1})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("experiment, expected", [
    ({}, "cuda"),                                           # the cluster has GPUs: runs ask for one
    ({"resources": {"gpus_per_run": 0}}, "mps"),            # no GPU wanted: the MPS worker
    ({"train": {"device": "cpu"}}, "cpu"),                  # pinned to CPUs
    ({"train": {"device": "mps"}}, "mps"),
])
def test_placement_on_fake_cluster(fake_cluster, experiment, expected):
    """A task placed with a run's options finds the device and the CPUs the run would train on."""
    options = task_options(build_experiment({"name": "x", **experiment}), ray.cluster_resources())
    device, threads = ray.get(ray.remote(assigned_device).options(**options).remote())
    assert (device, threads) == (expected, 1)
