"""`simulation.ray-address` (`fedsynth simulate --ray-address`): the simulated hospitals run
on a Ray cluster that was already running, across its nodes.

The test starts a two-node cluster on loopback with Ray's own test helper (a head and a
second node, one CPU each; Ray starts both nodes' processes on this machine, as on two),
runs four hospitals through Flower's simulation engine on it, and checks that hospitals
trained on both nodes and that the cluster outlives the run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedsynth.engine.launcher import run_simulation_engine
from fedsynth.engine.simulation import prepare_simulation
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

from .conftest import REPO, make_slices

pytestmark = pytest.mark.slow


def test_hospitals_train_on_both_nodes_of_a_running_ray_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.cluster_utils import Cluster

    nodes_file = tmp_path / "ray-nodes.txt"
    # The cluster's worker processes (started by its nodes, which this process starts) must
    # import tests.ray_node_client and know where to write.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FEDSYNTH_TEST_RAY_NODES", str(nodes_file))
    memory = 80 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": memory})
    try:
        second = cluster.add_node(num_cpus=1, object_store_memory=memory)
        cluster.wait_for_nodes()
        data = make_slices(n_patients=16, size=32).save(tmp_path / "slices.npz")
        run = RunDir(tmp_path / "run")
        cfg = RunConfig.from_overrides({
            "simulation.hospitals": 4, "simulation.ray-address": cluster.address, "federation.rounds": 1,
            "train.local-steps": 2, "train.batch-size": 8, "model.width": 8, "output.grid-per-class": 2,
        })
        cfg = prepare_simulation(cfg, data, run)
        assert cfg.simulation.client_cpus == 1 and cfg.simulation.parallel_hospitals == 0
        outcome = run_simulation_engine(cfg, run, client_app="tests.ray_node_client:app")
        assert outcome.ok, outcome.status
        [record] = run.read_rounds()
        assert len(record["hospitals"]) == 4
        ran_on = nodes_file.read_text().split()
        assert len(ran_on) == 4
        assert set(ran_on) == {cluster.head_node.node_id, second.node_id}, "hospitals ran on both nodes"
        assert all(node.remaining_processes_alive() for node in cluster.list_all_nodes()), "the cluster outlives the run"
    finally:
        cluster.shutdown()
