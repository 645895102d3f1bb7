"""FedAvg over a real mpirun: the same answer as FedAvg computed in one process."""
import json
from pathlib import Path

import torch

from tiny_federation import reference_fedavg, sampled_clients, write_client_data

TINY_MAIN = str(Path(__file__).parent / "programs" / "tiny_main.py")
CLIENTS, PER_ROUND, ROUNDS = 4, 3, 3


def run_tiny(run_mpi, data_path: Path, run_dir: Path, seed: int = 0, *options: str):
    result = run_mpi(CLIENTS + 1, TINY_MAIN, "--client_num_in_total", str(CLIENTS), "--client_num_per_round", str(PER_ROUND),
                     "--comm_round", str(ROUNDS), "--data_path", str(data_path), "--run_dir", str(run_dir),
                     "--seed", str(seed), "--wandb_mode", "disabled", *options)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MPI_ABORT" not in result.stdout + result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return torch.load(run_dir / "final_model.pt"), records


def test_mpi_global_model_equals_sample_weighted_fedavg_computed_in_one_process(run_mpi, tmp_path):
    write_client_data(str(tmp_path / "data"), CLIENTS)
    final, records = run_tiny(run_mpi, tmp_path / "data", tmp_path / "run")

    assert [r["sampled_clients"] for r in records] == [sampled_clients(0, r, CLIENTS, PER_ROUND) for r in range(ROUNDS)]
    expected = reference_fedavg(str(tmp_path / "data"), CLIENTS, PER_ROUND, ROUNDS)
    unweighted = reference_fedavg(str(tmp_path / "data"), CLIENTS, PER_ROUND, ROUNDS, weighted=False)
    assert list(final) == list(expected)
    for key, value in expected.items():  # buffers included: running stats, num_batches_tracked
        assert final[key].dtype == value.dtype, key
        assert torch.allclose(final[key].double(), value.double(), atol=1e-5), key
    # the weights follow the sample numbers: an unweighted mean is measurably different
    assert not torch.allclose(final["0.weight"], unweighted["0.weight"], atol=1e-4)
    assert final["1.num_batches_tracked"].item() == ROUNDS * 3  # 3 local steps per round


def test_same_seed_gives_same_clients_and_same_model_other_seed_other_clients(run_mpi, tmp_path):
    write_client_data(str(tmp_path / "data"), CLIENTS)
    first, first_records = run_tiny(run_mpi, tmp_path / "data", tmp_path / "run1", seed=7)
    second, second_records = run_tiny(run_mpi, tmp_path / "data", tmp_path / "run2", seed=7)
    assert [r["sampled_clients"] for r in first_records] == [r["sampled_clients"] for r in second_records]
    for key in first:
        assert torch.equal(first[key], second[key]), key
    other_seeds = [[sampled_clients(s, r, CLIENTS, PER_ROUND) for r in range(ROUNDS)] for s in range(7, 12)]
    assert len({json.dumps(x) for x in other_seeds}) > 1  # sampling does depend on the seed


def test_updates_lent_in_shared_memory_give_the_same_model_as_updates_sent_as_copies(run_mpi, tmp_path):
    write_client_data(str(tmp_path / "data"), CLIENTS)
    lent, _ = run_tiny(run_mpi, tmp_path / "data", tmp_path / "lent")
    copied, _ = run_tiny(run_mpi, tmp_path / "data", tmp_path / "copied", 0, "--shared_memory", "off")
    for key in lent:
        assert torch.equal(lent[key], copied[key]), key
    # Every client runs on the server's host: each lent its updates after its first one.
    lenders = (tmp_path / "lent" / "server.log").read_text().count("tensors in its memory from now on")
    assert lenders == CLIENTS
    assert "in its memory" not in (tmp_path / "copied" / "server.log").read_text()


def test_mpi_fedadam_equals_fedadam_computed_in_one_process(run_mpi, tmp_path):
    from test_strategies_protocol import reference_fedadam

    write_client_data(str(tmp_path / "data"), CLIENTS)
    final, _ = run_tiny(run_mpi, tmp_path / "data", tmp_path / "run", 0, "--federated_optimizer", "FedAdam", "--tau", "1e-3")
    expected = reference_fedadam(str(tmp_path / "data"), CLIENTS, PER_ROUND, ROUNDS, tau=1e-3)
    for key, value in expected.items():
        assert torch.allclose(final[key].double(), value.double(), atol=1e-4), key


def test_mpi_scaffold_sends_control_variates_both_ways_and_lends_the_model(run_mpi, tmp_path):
    write_client_data(str(tmp_path / "data"), CLIENTS)
    final, records = run_tiny(run_mpi, tmp_path / "data", tmp_path / "run", 0, "--federated_optimizer", "SCAFFOLD", "--lr", "0.1")
    assert len(records) == ROUNDS and not any("rejected_updates" in r for r in records)
    assert all(torch.isfinite(t.double()).all() for t in final.values())
    assert (tmp_path / "run" / "server.log").read_text().count("tensors in its memory from now on") == CLIENTS
