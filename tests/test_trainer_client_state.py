"""A trainer's own state per client (ModelTrainer.get_client_state / set_client_state):
kept by the server in the client-state store, handed back before the client's next
training, with every algorithm, in both modes, resumed bit-exactly; a trainer without
it sends nothing more than before."""
import pytest
import torch

from fedml_api.distributed.fedavg.checkpoint import load_checkpoint
from fedml_api.distributed.fedavg.message_define import MyMessage
from fedml_core.aggregation.client_state import ClientStateStore
from fedml_core.aggregation.registry import REGISTRY
from fedml_core.distributed.communication.inprocess_transport import InProcessTransport
from test_fedavg_protocol import federation_args, run_federation
from test_strategies_protocol import OPTIONS, records_of
from tiny_federation import MomentumTrainer, TinyTrainer, make_model, reference_run, sampled_clients

STATE_MESSAGES = {MyMessage.MSG_TYPE_S2C_CLIENT_STATE, MyMessage.MSG_TYPE_C2S_CLIENT_STATE}


def stored_client_states(run_dir):
    """The trainer states of the clients the run's last checkpoint names, read from its store."""
    snapshot = load_checkpoint(str(run_dir)).client_states
    store = ClientStateStore(None)
    if snapshot:
        store.restore(snapshot)
    return {client: store.get(client) for client in store.clients()}


@pytest.mark.parametrize("workers", [None, 2])
def test_each_client_s_momentum_buffers_persist_across_its_rounds(tmp_path, workers):
    data_path, run_dir, errors = run_federation(tmp_path, clients=5, per_round=3, rounds=4, trainer_factory=MomentumTrainer,
                                                workers=workers)
    assert not errors
    expected, _, momentum = reference_run(str(data_path), 5, 3, 4, trainer_factory=MomentumTrainer)
    final, stored = torch.load(run_dir / "final_model.pt"), stored_client_states(run_dir)
    # With workers, FedAvg takes their float64 partial sums: the reference's mean, bit for bit.
    same = torch.equal if workers else (lambda a, b: torch.allclose(a.double(), b.double(), atol=1e-5))
    assert all(same(final[key], expected[key]) for key in expected)
    assert set(stored) == set(momentum) == {c for r in range(4) for c in sampled_clients(0, r, 5, 3)}
    for client, buffers in momentum.items():
        assert sorted(stored[client]) == sorted(buffers)
        assert all(same(stored[client][name], buffers[name]) for name in buffers), client
    # the buffers mattered: without them every training starts from zero momentum
    fresh, _, _ = reference_run(str(data_path), 5, 3, 4, trainer_factory=ForgetfulMomentumTrainer)
    assert not torch.allclose(expected["0.weight"], fresh["0.weight"], atol=1e-3)


class ForgetfulMomentumTrainer(MomentumTrainer):
    def set_client_state(self, state):
        self.momentum = None


class CountingTrainer(TinyTrainer):
    """Keeps, per client, whose state it is and how often the client trained; refuses
    a state that is not its client's."""

    def set_client_state(self, state):
        if state is not None and int(state["client"]) != self.id + 1:
            raise ValueError(f"client {self.id + 1} was handed client {int(state['client'])}'s state")
        self.trainings = 0 if state is None else int(state["trainings"])

    def get_client_state(self):
        return {"client": torch.tensor(self.id + 1), "trainings": torch.tensor(self.trainings)}

    def train(self, device, args, train_path):
        super().train(device, args, train_path)
        self.trainings += 1


@pytest.mark.parametrize("workers", [None, 2])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_algorithm_hands_each_client_its_own_state_back(tmp_path, name, workers):
    options = {**OPTIONS, "FedPer": ["--personal_layers", "3"]}.get(name, [])
    _, run_dir, errors = run_federation(tmp_path, clients=5, per_round=3, rounds=3, trainer_factory=CountingTrainer,
                                        workers=workers, extra=["--federated_optimizer", name, *options], lr=0.1)
    assert not errors
    records = records_of(run_dir)
    assert not any("failures" in r or "rejected_updates" in r for r in records), records
    stored = stored_client_states(run_dir)
    times = {}
    for record in records:
        for client in record["sampled_clients"]:
            times[client] = times.get(client, 0) + 1
    assert {client: int(state["trainings"]) for client, state in stored.items()} == times


@pytest.mark.parametrize("workers", [None, 2])
def test_a_resumed_run_hands_the_clients_their_states_bit_exactly(tmp_path, workers):
    def run(name, rounds, *extra):
        _, run_dir, errors = run_federation(tmp_path / name, clients=4, per_round=2, rounds=rounds, extra=extra,
                                            trainer_factory=MomentumTrainer, workers=workers)
        assert not errors
        return run_dir

    full = run("full", 5)
    resumed = run("resumed", 5, "--resume", str(run("part", 2)))
    a, b = torch.load(full / "final_model.pt"), torch.load(resumed / "final_model.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)
    full_states, resumed_states = stored_client_states(full), stored_client_states(resumed)
    assert sorted(full_states) == sorted(resumed_states) and len(full_states) > 2
    for client, state in full_states.items():
        assert all(torch.equal(state[k], resumed_states[client][k]) for k in state), client


@pytest.fixture
def sent_types(monkeypatch):
    """The types of the messages the in-process transport carries."""
    types = []
    send = InProcessTransport.send

    def recording(self, message, timeout=None):
        types.append(message.msg_type)
        return send(self, message, timeout)

    monkeypatch.setattr(InProcessTransport, "send", recording)
    return types


@pytest.mark.parametrize("workers", [None, 2])
def test_a_trainer_without_client_state_sends_and_keeps_nothing_more(tmp_path, workers, sent_types):
    _, run_dir, errors = run_federation(tmp_path / "plain", clients=4, per_round=2, rounds=2, workers=workers)
    assert not errors
    assert sent_types and not STATE_MESSAGES & set(sent_types)
    assert load_checkpoint(str(run_dir)).client_states == {} and not (run_dir / "client_state").exists()
    sent_types.clear()
    _, run_dir, errors = run_federation(tmp_path / "momentum", clients=4, per_round=2, rounds=2, workers=workers,
                                        trainer_factory=MomentumTrainer)
    assert not errors and STATE_MESSAGES <= set(sent_types)  # (what the first run would have shown)
    assert (run_dir / "client_state" / "trainer").is_dir()


def test_a_trainer_defining_one_hook_of_the_pair_is_refused():
    class OnlyGets(TinyTrainer):
        def get_client_state(self):
            return {}

    with pytest.raises(TypeError, match=r"OnlyGets \(the ModelTrainer\) defines get_client_state\(\) but not set_client_state\(\)"):
        OnlyGets(make_model())


class ReturnsAList(CountingTrainer):
    def get_client_state(self):
        return [torch.zeros(2)]


def test_a_client_state_that_is_not_named_tensors_fails_the_client_with_the_reason(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=2, workers=1, trainer_factory=ReturnsAList)
    assert list(errors) == [0]  # every client failed: the run stops
    failures = records_of(run_dir)[0]["failures"] if records_of(run_dir) else None
    log = (run_dir / "server.log").read_text()
    assert "ReturnsAList.get_client_state() must return None or a dict of name (str) -> torch tensor, got list" in log, failures


def test_the_preflight_refuses_client_states_for_a_trainer_that_keeps_none(tmp_path, capsys):
    from fedml_api.distributed.fedavg.preflight import run_preflight

    data_path, run_dir, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=1, trainer_factory=MomentumTrainer)
    assert not errors
    args = federation_args(3, 3, 3, data_path, tmp_path / "again", "--resume", str(run_dir))
    with pytest.raises(SystemExit) as exit_:
        run_preflight(args, TinyTrainer(make_model()))
    assert exit_.value.code == 2
    assert "TinyTrainer keeps no client state (no get_client_state), but the checkpoint holds its clients' states" \
        in capsys.readouterr().err
