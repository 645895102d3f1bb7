"""The server survives bad and missing clients, checkpoints every round, and resumes exactly."""
import json
import time

import torch

from fedml_api.distributed.fedavg.checkpoint import load_checkpoint, save_checkpoint
from test_fedavg_protocol import run_federation
from tiny_federation import TinyTrainer


def client_of(path: str) -> int:
    return int(path.rstrip("/").split("/")[-2])


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class PoisoningTrainer(TinyTrainer):
    """Client 2 sends NaN weights; client 3 sends a model with an extra tensor."""

    def train(self, device, args, train_path):
        super().train(device, args, train_path)
        self.client = client_of(train_path)
        if self.client == 2:
            with torch.no_grad():
                self.model[0].weight[0, 0] = float("nan")

    def get_model_params(self):
        state = super().get_model_params()
        return {**state, "extra": torch.zeros(1)} if getattr(self, "client", None) == 3 else state


def test_non_finite_or_misshapen_updates_are_rejected_and_the_round_goes_on(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=2, test_every=1,
                                        trainer_factory=PoisoningTrainer)
    assert not errors
    for record in records_of(run_dir):
        rejected = record["rejected_updates"]
        assert rejected["2"] == "tensor '0.weight' holds NaN or Inf values"
        assert "unexpected ['extra']" in rejected["3"]
        assert "test" in record  # the round completed on client 1's update
    final = torch.load(run_dir / "final_model.pt")
    assert all(torch.isfinite(t.double()).all() for t in final.values())


def test_when_rejected_updates_leave_too_few_the_run_stops_and_the_round_is_not_checkpointed(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=2, per_round=2, rounds=2,
                                        extra=["--min_clients_per_round", "2"], trainer_factory=PoisoningTrainer)
    assert list(errors) == [0] and isinstance(errors[0], SystemExit)
    assert "round 0: 1 usable updates, fewer than --min_clients_per_round=2" in str(errors[0].code)
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "final_model.pt").exists()
    assert "rejected the update of client 2: tensor '0.weight' holds NaN or Inf values" in (run_dir / "server.log").read_text()


def test_checkpoint_every_n_rounds_keeps_the_last_multiple_of_n_and_always_the_final_round(tmp_path):
    import fedml_api.distributed.fedavg.FedAvgServerManager as server_manager

    written = []
    submit = server_manager.CheckpointWriter.submit
    server_manager.CheckpointWriter.submit = lambda self, make: (written.append(make().round_idx), submit(self, make))
    try:
        _, run_dir, errors = run_federation(tmp_path, clients=2, per_round=2, rounds=5, extra=["--checkpoint_every", "2"])
    finally:
        server_manager.CheckpointWriter.submit = submit
    assert not errors
    assert written == [1, 3, 4]  # after rounds 2 and 4 (1-based), and the last
    assert load_checkpoint(str(run_dir)).round_idx == 4


class SlowTrainer(TinyTrainer):
    """Every round takes 0.25 s; client 2 takes 4 s in round 1 (misses a 1.5 s round timeout)."""

    def train(self, device, args, train_path):
        slow = client_of(train_path) == 2 and args.round_idx == 1
        time.sleep(4 if slow else 0.25)
        super().train(device, args, train_path)


def test_a_client_missing_the_round_timeout_is_dropped_then_readmitted_once_it_answers(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=24, test_every=100,
                                        extra=["--round_timeout", "1.5"], trainer_factory=SlowTrainer)
    assert not errors
    records = records_of(run_dir)
    assert len(records) == 24
    assert records[1]["failures"] == {"2": "no reply within --round_timeout=1.5 s"}
    assert records[1]["sampled_clients"] == [1, 2, 3] and records[2]["sampled_clients"] == [1, 3]
    back = next(i for i, r in enumerate(records) if r.get("recovered_clients") == [2])
    assert all(2 in r["sampled_clients"] for r in records[back + 1:])


class FirstRoundSlowTrainer(TinyTrainer):
    """Round 0 carries a one-time cost of 4 s on every client (data loading, first passes)."""

    def train(self, device, args, train_path):
        time.sleep(4 if args.round_idx == 0 else 0)
        super().train(device, args, train_path)


def test_a_round_timeout_set_from_the_steady_rounds_does_not_fail_the_first_round(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=2, per_round=2, rounds=3, test_every=1, extra=[
        "--round_timeout", "1.5", "--startup_timeout", "60"], trainer_factory=FirstRoundSlowTrainer)
    assert not errors
    records = records_of(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert not any("failures" in r for r in records)
    assert records[0]["train_seconds"] >= 4  # waited past --round_timeout, within the start-up allowance


def test_too_few_clients_stops_the_run_with_a_checkpoint_and_an_error(tmp_path):
    class DeadlineMissingTrainer(TinyTrainer):
        def train(self, device, args, train_path):
            if args.round_idx == 1 and client_of(train_path) != 1:
                time.sleep(5)
            super().train(device, args, train_path)

    _, run_dir, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=4, extra=[
        "--round_timeout", "2", "--min_clients_per_round", "2"], trainer_factory=DeadlineMissingTrainer)
    assert list(errors) == [0]  # only the server failed; every client was released
    assert isinstance(errors[0], SystemExit) and errors[0].code != 0
    assert "round 1: 1 usable updates, fewer than --min_clients_per_round=2" in str(errors[0].code)
    assert load_checkpoint(str(run_dir)).round_idx == 0  # round 0 is kept
    assert "FedAvg stopped: round 1" in (run_dir / "server.log").read_text().splitlines()[-1]


def test_every_round_is_checkpointed_and_a_resumed_run_ends_bit_exactly_like_an_uninterrupted_one(tmp_path):
    _, full_dir, errors = run_federation(tmp_path / "full", clients=4, per_round=2, rounds=5)
    assert not errors
    _, first_dir, errors = run_federation(tmp_path / "part", clients=4, per_round=2, rounds=2)
    assert not errors and load_checkpoint(str(first_dir)).round_idx == 1
    _, resumed_dir, errors = run_federation(tmp_path / "resumed", clients=4, per_round=2, rounds=5,
                                            extra=["--resume", str(first_dir)])
    assert not errors
    full, resumed = torch.load(full_dir / "final_model.pt"), torch.load(resumed_dir / "final_model.pt")
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert [r["sampled_clients"] for r in records_of(resumed_dir)] == [r["sampled_clients"] for r in records_of(full_dir)]
    assert not list(resumed_dir.glob("*.partial"))


def test_resuming_from_another_models_checkpoint_is_refused_and_nothing_runs(tmp_path):
    _, first_dir, errors = run_federation(tmp_path / "first", clients=2, per_round=2, rounds=1)
    checkpoint = load_checkpoint(str(first_dir))
    checkpoint.global_model["0.weight"] = torch.zeros(8, 5)
    save_checkpoint(str(first_dir), checkpoint)
    _, run_dir, errors = run_federation(tmp_path / "second", clients=2, per_round=2, rounds=2,
                                        extra=["--resume", str(first_dir)])
    assert list(errors) == [0]
    assert "is from another model: tensor '0.weight' is torch.float32 [8, 5] there, torch.float32 [8, 4] here" in str(errors[0].code)
    assert not (run_dir / "metrics.jsonl").exists()
