"""--worker_processes: CLIENT_NUM clients served by P worker processes (in-process
transport; the MPI runs, a dead worker included, are in test_worker_processes_mpi.py)."""
import json
import time

import pytest
import torch

from fedml_api.distributed.fedavg.args import check_federation_args
from fedml_api.distributed.fedavg.client_assignment import assign_clients, client_share
from fedml_api.distributed.fedavg.FedAvgAPI import FedML_FedAvg_distributed
from fedml_core.aggregation.registry import REGISTRY
from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator
from test_fedavg_protocol import federation_args, run_federation
from test_strategies_protocol import federated
from tiny_federation import FaultyTrainer, TinyTrainer, client_sample_number, make_model, reference_fedavg, sampled_clients


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_model(run_dir):
    return torch.load(run_dir / "final_model.pt")


def test_fedavg_over_workers_is_the_float64_mean_rounded_once_whatever_the_number_of_workers(tmp_path):
    finals = {}
    for workers in (1, 2, 3):
        data_path, run_dir, errors = run_federation(tmp_path / str(workers), clients=7, per_round=5, rounds=3, workers=workers)
        assert not errors
        finals[workers] = final_model(run_dir)
    # reference_fedavg: every round's mean computed in float64 from each client's state, then rounded.
    expected = reference_fedavg(str(data_path), 7, 5, 3)
    for workers, final in finals.items():
        assert list(final) == list(expected)
        assert all(torch.equal(final[key], expected[key]) for key in expected), workers


def test_each_round_samples_as_documented_and_balances_the_clients_over_the_workers(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=8, per_round=6, rounds=3, test_every=1, workers=3)
    assert not errors
    for record in records_of(run_dir):
        sampled = sampled_clients(0, record["round"], 8, 6)
        assert record["sampled_clients"] == sampled
        train = {int(rank): clients for rank, clients in record["assignments"]["train"].items()}
        assert sorted(c for clients in train.values() for c in clients) == sampled
        assert set(train) == {1, 2, 3}
        loads = [sum(client_sample_number(c) for c in clients) for clients in train.values()]
        assert max(loads) - min(loads) <= max(client_sample_number(c) for c in sampled)
        # every client tests, spread over the workers too
        assert record["tested_clients"] == list(range(1, 9))
        assert record["test"]["sample_number"] == sum(4 + c for c in range(1, 9))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_assignment_is_longest_first_to_the_least_loaded_worker():
    load = {1: 10, 2: 1, 3: 7, 4: 7, 5: 2}
    assert assign_clients([1, 2, 3, 4, 5], [1, 2], load) == {1: [1, 2, 5], 2: [3, 4]}
    # equal (e.g. zero) loads still spread out, by count
    assert assign_clients([1, 2, 3, 4], [1, 2, 3], {c: 0 for c in range(1, 5)}) == {1: [1, 4], 2: [2], 3: [3]}
    assert client_share(2, 3, 8) == [2, 5, 8]


@pytest.mark.parametrize("name", ["FedMedian", "SCAFFOLD"])
def test_an_algorithm_that_needs_every_update_gets_each_client_s_own(tmp_path, name):
    # The median needs each client's update, SCAFFOLD each client's control variate too:
    # the workers send them all, and the result is the one-process-per-client run's, bit
    # for bit (a client's update does not depend on the process that trained it).
    options = ["--federated_optimizer", name]
    _, flat_dir, errors = run_federation(tmp_path / "flat", clients=5, per_round=4, rounds=3, extra=options, lr=0.1)
    assert not errors
    _, pool_dir, errors = run_federation(tmp_path / "pool", clients=5, per_round=4, rounds=3, extra=options, workers=2, lr=0.1)
    assert not errors
    flat, pool = final_model(flat_dir), final_model(pool_dir)
    assert all(torch.equal(flat[key], pool[key]) for key in flat)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_algorithm_runs_over_workers(tmp_path, name):
    options = {"Krum": ["--krum_f", "0"], "MultiKrum": ["--krum_f", "0"], "FedPer": ["--personal_layers", "3"]}.get(name, [])
    _, run_dir, errors = run_federation(tmp_path, clients=5, per_round=4, rounds=2, workers=2,
                                        extra=["--federated_optimizer", name, *options], lr=0.1)
    assert not errors
    final = final_model(run_dir)
    assert all(torch.isfinite(t.double()).all() for t in final.values())
    assert not any(torch.equal(final[k], v) for k, v in make_model().state_dict().items() if k.endswith("weight") and federated(name, k))


def test_a_partial_sum_server_optimizer_does_not_depend_on_the_number_of_workers(tmp_path):
    options = ["--federated_optimizer", "FedAdam"]
    finals = []
    for workers in (1, 3):
        _, run_dir, errors = run_federation(tmp_path / str(workers), clients=6, per_round=4, rounds=3, workers=workers, extra=options)
        assert not errors
        finals.append(final_model(run_dir))
    assert all(torch.equal(finals[0][key], finals[1][key]) for key in finals[0])


def test_a_client_whose_code_raises_fails_alone_and_its_worker_serves_the_others(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=6, per_round=6, rounds=3, test_every=1, workers=2,
                                        trainer_factory=lambda model: FaultyTrainer(model, ["train:3:1"]))
    assert not errors
    records = records_of(run_dir)
    assert "ValueError: injected bug in round 1" in records[1]["failures"]["3"]
    assert records[1]["sampled_clients"] == [1, 2, 3, 4, 5, 6]
    # left out of later rounds, as in the one-process-per-client mode; the others go on
    assert records[2]["sampled_clients"] == [1, 2, 4, 5, 6]
    assert 3 not in records[2]["tested_clients"] and len(records[2]["tested_clients"]) == 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and list(summary["failed_clients"]) == ["3"]


def test_test_clients_evaluates_a_reproducible_sample(tmp_path):
    runs = []
    for name in ("a", "b"):
        _, run_dir, errors = run_federation(tmp_path / name, clients=9, per_round=3, rounds=3, test_every=1, workers=2,
                                            extra=["--test_clients", "4"])
        assert not errors
        runs.append([r["tested_clients"] for r in records_of(run_dir)])
    assert runs[0] == runs[1]
    assert all(len(tested) == 4 for tested in runs[0]) and len({tuple(t) for t in runs[0]}) > 1


def test_test_clients_also_samples_in_the_one_process_per_client_mode(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=5, per_round=2, rounds=2, test_every=1, extra=["--test_clients", "2"])
    assert not errors
    assert all(len(r["tested_clients"]) == 2 for r in records_of(run_dir))


@pytest.mark.parametrize("options, message", [
    (["--worker_processes", "0"], "--worker_processes must be between 1 and CLIENT_NUM=4, got 0"),
    (["--worker_processes", "5"], "--worker_processes must be between 1 and CLIENT_NUM=4, got 5"),
    (["--test_clients", "0"], "--test_clients must be between 1 and CLIENT_NUM=4, got 0"),
    (["--client_cache_mb", "-1"], "--client_cache_mb must be at least 0"),
])
def test_bad_worker_options_are_named(tmp_path, options, message):
    args = federation_args(4, 2, 1, tmp_path, tmp_path, *options)
    with pytest.raises(ValueError, match=message):
        check_federation_args(args)


def test_the_process_count_must_be_the_workers_plus_the_server(tmp_path):
    args = federation_args(10, 2, 1, tmp_path, tmp_path, "--worker_processes", "3")
    with pytest.raises(ValueError, match="5 processes run, but --worker_processes 3 takes 4"):
        FedML_FedAvg_distributed(0, 5, torch.device("cpu"), None, make_model(), args, "", "",
                                 WeightedMeanResultAggregator(), TinyTrainer(make_model()))


class SlowToCountTrainer(TinyTrainer):
    """Counting client 2's samples takes 2 s: its worker misses a 0.5 s start-up timeout."""

    def get_local_sample_number(self, train_path):
        if train_path.rstrip("/").split("/")[-2] == "2":
            time.sleep(2)
        return super().get_local_sample_number(train_path)


def test_a_worker_late_at_start_up_gets_its_clients_back_when_it_reports(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=4, per_round=4, rounds=6, test_every=6, workers=2,
                                        extra=["--startup_timeout", "0.5"], trainer_factory=SlowToCountTrainer, train_delay=0.5)
    assert not errors
    records = records_of(run_dir)
    # worker 2 (clients 2 and 4) had not reported: the first rounds ran without them
    assert records[0]["sampled_clients"] == [1, 3] and "2" in records[0]["lost_workers"]
    assert records[0]["failures"]["2"].startswith("its sample numbers were never counted")
    # once it reported, it and its clients were back
    assert records[-1]["sampled_clients"] == [1, 2, 3, 4]
    assert set(records[-1]["assignments"]["train"]) == {"1", "2"}
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
