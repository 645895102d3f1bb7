"""The FedAvg protocol, run in one process over the in-process transport (no mpirun)."""
import json
import threading
from argparse import ArgumentParser, Namespace

import pytest
import torch

from fedml_api.distributed.fedavg.args import add_federation_args
from fedml_api.distributed.fedavg.FedAvgAPI import FedML_FedAvg_distributed
from fedml_api.distributed.fedavg.FedAVGTrainer import FedAVGTrainer, UserCodeError
from fedml_core.aggregation import FedAvg
from fedml_core.distributed.communication.inprocess_transport import InProcessHub
from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator
from tiny_federation import ProcessDied, TinyTrainer, make_model, reference_fedavg, sampled_clients, write_client_data


def federation_args(clients, per_round, rounds, data_path, run_dir, *extra):
    return add_federation_args(ArgumentParser()).parse_args([
        "--client_num_in_total", str(clients), "--client_num_per_round", str(per_round), "--comm_round", str(rounds),
        "--data_path", str(data_path), "--run_dir", str(run_dir), *extra])


def run_federation(tmp_path, clients=4, per_round=2, rounds=3, test_every=2, extra=(), trainer_factory=TinyTrainer,
                   strategy_factory=None, workers=None, **arguments):
    """Run the server and the clients as threads over the in-process transport; returns
    (data_path, run_dir, {process_id: exception}) once every thread has ended. A thread
    that raises :class:`ProcessDied` is a dead process: the others are told (as ULFM does).

    ``strategy_factory()``: each process's strategy (default: from the arguments);
    ``workers``: run ``--worker_processes workers`` instead of one process per client;
    ``arguments``: more attributes of every process's args (e.g. ``lr=0.1``)."""
    data_path, run_dir = tmp_path / "data", tmp_path / "run"
    write_client_data(str(data_path), clients)
    if workers is not None:
        extra = ("--worker_processes", str(workers), *extra)
    args = federation_args(clients, per_round, rounds, data_path, run_dir, "--frequency_of_the_test", str(test_every), *extra)
    processes = (workers or clients) + 1
    hub = InProcessHub(processes)
    # Built here, in order: make_model() seeds torch's global RNG, which threads share.
    models = [make_model() for _ in range(processes)]
    errors = {}

    def process(pid):
        try:
            FedML_FedAvg_distributed(pid, processes, torch.device("cpu"), None, models[pid], Namespace(**vars(args), **arguments),
                                     str(data_path / str(pid) / "train"), str(data_path / str(pid) / "test"),
                                     WeightedMeanResultAggregator(), trainer_factory(models[pid]), transport=hub.transport(pid),
                                     strategy=strategy_factory() if strategy_factory is not None else None)
        except BaseException as error:  # reported to the test; a thread cannot raise into pytest
            errors[pid] = error
            if isinstance(error, ProcessDied):
                hub.fail(pid)

    threads = [threading.Thread(target=process, args=(pid,), daemon=True) for pid in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a process did not finish"
    return data_path, run_dir, errors


def test_rounds_sample_clients_test_on_schedule_and_match_reference_fedavg(tmp_path):
    data_path, run_dir, errors = run_federation(tmp_path, clients=4, per_round=2, rounds=3, test_every=2)
    assert not errors
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert [r["sampled_clients"] for r in records] == [sampled_clients(0, r, 4, 2) for r in range(3)]
    # test rounds: every 2nd round, and always the last
    assert ["test" in r for r in records] == [False, True, True]
    assert records[-1]["test"]["sample_number"] == sum(4 + c for c in range(1, 5))
    for r in records:
        assert r["train_seconds"] >= 0 and r["communication_seconds"] >= 0 and r["aggregation_seconds"] >= 0

    final = torch.load(run_dir / "final_model.pt")
    expected = reference_fedavg(str(data_path), 4, 2, 3)
    assert list(final) == list(expected)
    for key in expected:
        assert final[key].dtype == expected[key].dtype
        assert torch.allclose(final[key].double(), expected[key].double(), atol=1e-5), key

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["final_test"] == records[-1]["test"]
    assert (run_dir / "metrics.png").stat().st_size > 0
    assert "round 3/3" in (run_dir / "server.log").read_text()


def test_a_test_result_that_is_not_json_names_the_trainer(tmp_path, monkeypatch):
    write_client_data(str(tmp_path), 1)
    monkeypatch.setattr(TinyTrainer, "test", lambda self, device, args, path: {"accuracy": torch.tensor(1.0)})
    trainer = FedAVGTrainer(1, str(tmp_path / "1" / "train"), str(tmp_path / "1" / "test"),
                            torch.device("cpu"), Namespace(), TinyTrainer(make_model()))
    with pytest.raises(UserCodeError, match=r"TinyTrainer.test\(\) must return a JSON-serialisable dict"):
        trainer.test()


def test_client_count_must_match_the_process_count(tmp_path):
    args = federation_args(3, 3, 1, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="5 processes run, which means 4 clients, but --client_num_in_total is 3"):
        FedML_FedAvg_distributed(0, 5, torch.device("cpu"), None, make_model(), args, "", "",
                                 WeightedMeanResultAggregator(), TinyTrainer(make_model()))


class RelocatingTrainer(TinyTrainer):
    """Trains like TinyTrainer, then leaves its weights in new memory, as training on a
    GPU does: the trained state no longer lives in the client's packed memory."""

    def train(self, device, args, train_path):
        super().train(device, args, train_path)
        self.model.double().float()  # exact for float32 values; new storage


def test_a_state_trained_outside_the_packed_memory_is_still_sent_packed_and_aggregated_alike(tmp_path, monkeypatch):
    from fedml_api.distributed.fedavg.message_define import MyMessage
    from fedml_core.distributed.communication.inprocess_transport import InProcessTransport

    _, plain_run, errors = run_federation(tmp_path / "plain", rounds=2)
    assert not errors
    replies = []
    send = InProcessTransport.send

    def spying_send(self, message, timeout=None):
        if message.msg_type == MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER:
            replies.append(message.packed is not None)
        return send(self, message, timeout)

    monkeypatch.setattr(InProcessTransport, "send", spying_send)
    _, relocated_run, errors = run_federation(tmp_path / "relocated", rounds=2, trainer_factory=RelocatingTrainer)
    assert not errors
    assert replies == [True] * 4  # 2 rounds x 2 clients, each reply one buffer per dtype
    plain, relocated = torch.load(plain_run / "final_model.pt"), torch.load(relocated_run / "final_model.pt")
    assert all(torch.equal(plain[key], relocated[key]) for key in plain)


class LoadCountingTrainer(TinyTrainer):
    """Overrides set_model_params, as a trainer that keeps the global model would."""

    loads = []

    def set_model_params(self, model_parameters):
        LoadCountingTrainer.loads.append(float(sum(t.double().sum() for t in model_parameters.values())))
        super().set_model_params(model_parameters)


def test_an_overridden_set_model_params_gets_every_model_even_when_it_arrived_in_the_models_memory(tmp_path):
    LoadCountingTrainer.loads = []
    _, run_dir, errors = run_federation(tmp_path, clients=4, per_round=2, rounds=3, test_every=2, trainer_factory=LoadCountingTrainer)
    assert not errors
    # 3 rounds x 2 sampled clients train; rounds 2 and 3 test on all 4 clients.
    assert len(LoadCountingTrainer.loads) == 3 * 2 + 2 * 4
    final = torch.load(run_dir / "final_model.pt")
    assert LoadCountingTrainer.loads[-1] == pytest.approx(float(sum(t.double().sum() for t in final.values())))


def test_a_strategy_whose_setup_raises_stops_the_run_with_the_reason_and_releases_the_clients(tmp_path):
    class BrokenSetup(FedAvg):
        def setup(self, global_model, trainable, federation):
            raise ValueError("this strategy cannot serve this model")

    _, _, errors = run_federation(tmp_path, clients=2, per_round=2, rounds=1, strategy_factory=BrokenSetup)
    assert isinstance(errors[0], SystemExit)
    assert str(errors[0]) == "FedAvg stopped: this strategy cannot serve this model"
    assert set(errors) == {0}  # the clients were released and ended normally
