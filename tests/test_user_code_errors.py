"""A bug in the user's code (an exception, an unusable return value) on one client is
reported to the server at once, named, and handled like a dead client; the exit status
says whether the run really succeeded."""
import json
from functools import partial

from test_fedavg_protocol import run_federation
from tiny_federation import FaultyTrainer


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_with_faults(tmp_path, *faults, clients=3, rounds=3, extra=()):
    return run_federation(tmp_path, clients=clients, per_round=clients, rounds=rounds, test_every=1, extra=extra,
                          trainer_factory=partial(FaultyTrainer, faults=faults))


def test_an_exception_in_train_is_recorded_at_once_and_the_run_goes_on_without_that_client(tmp_path):
    # No --round_timeout: the server would wait forever if the failure were not reported.
    _, run_dir, errors = run_with_faults(tmp_path, "train:2:1")
    assert list(errors) == [2]  # the faulty client stopped; the server and the others succeeded
    assert errors[2].code == "client 2 stopped: FaultyTrainer.train() raised ValueError: injected bug in round 1"
    records = records_of(run_dir)
    assert records[1]["failures"] == {"2": "FaultyTrainer.train() raised ValueError: injected bug in round 1"}
    assert records[1]["sampled_clients"] == [1, 2, 3] and records[2]["sampled_clients"] == [1, 3]
    assert records[-1]["tested_clients"] == [1, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["failed_clients"] == {"2": "FaultyTrainer.train() raised ValueError: injected bug in round 1"}


def test_a_test_metric_that_is_a_tensor_is_named_as_the_clients_failure(tmp_path):
    _, run_dir, errors = run_with_faults(tmp_path, "test_tensor:3")
    assert list(errors) == [3]
    reason = records_of(run_dir)[0]["failures"]["3"]
    assert reason.startswith("FaultyTrainer.test() must return a JSON-serialisable dict of metrics")
    assert "Object of type Tensor is not JSON serializable" in reason


def test_a_sample_count_of_zero_is_found_at_start_up_before_any_training(tmp_path):
    _, run_dir, errors = run_with_faults(tmp_path, "sample_number_zero:1")
    assert list(errors) == [1]
    records = records_of(run_dir)
    assert "returned 0 for" in records[0]["failures"]["1"] and "expected a positive sample count" in records[0]["failures"]["1"]
    assert records[0]["sampled_clients"] == [2, 3]  # never sampled


def test_exceptions_in_get_local_sample_number_and_set_model_params_are_named(tmp_path):
    _, run_dir, errors = run_with_faults(tmp_path / "a", "get_local_sample_number:2")
    train_path = tmp_path / "a" / "data" / "2" / "train"
    assert records_of(run_dir)[0]["failures"] == {"2": f"FaultyTrainer.get_local_sample_number() raised ValueError: cannot read {train_path}"}
    _, run_dir, errors = run_with_faults(tmp_path / "b", "set_model_params:3")
    assert list(errors) == [3]
    assert records_of(run_dir)[0]["failures"] == {"3": "FaultyTrainer.set_model_params() raised ValueError: injected bug in set_model_params()"}


def test_a_run_whose_every_client_fails_at_test_time_exits_non_zero_with_the_reason(tmp_path):
    _, run_dir, errors = run_with_faults(tmp_path, "test_numpy:1", "test_numpy:2", clients=2, rounds=1)
    assert sorted(errors) == [0, 1, 2]
    assert isinstance(errors[0], SystemExit)
    assert errors[0].code.startswith("FedAvg stopped: all 1 rounds ran, but the final test produced no metrics: "
                                     "no client returned a test result")
    assert "FedAvg stopped:" in (run_dir / "server.log").read_text().splitlines()[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["final_test"] is None
    assert set(summary["failed_clients"]) == {"1", "2"}
    assert (run_dir / "final_model.pt").exists()  # the trained model is kept all the same


def test_clients_failing_in_later_rounds_stop_the_run_with_the_reason(tmp_path):
    _, run_dir, errors = run_with_faults(tmp_path, "test_numpy:1", "test_numpy:2", clients=2, rounds=2)
    assert sorted(errors) == [0, 1, 2]
    assert errors[0].code.startswith("FedAvg stopped: round 1: only 0 clients left")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"


def test_a_final_test_without_metrics_is_not_a_success(tmp_path):
    # Round 1 (the last): client 2's train() raises, client 1 trains, then its test()
    # raises: the final model has no metrics.
    _, run_dir, errors = run_with_faults(tmp_path, "train:2:1", "test:1", clients=2, rounds=2,
                                         extra=["--frequency_of_the_test", "5"])
    assert sorted(errors) == [0, 1, 2]
    assert "the final test produced no metrics" in errors[0].code
    assert records_of(run_dir)[1]["failures"] == {"2": "FaultyTrainer.train() raised ValueError: injected bug in round 1",
                                                  "1": "FaultyTrainer.test() raised ValueError: injected bug in test()"}
