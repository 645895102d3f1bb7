"""The algorithms through the FedAvg protocol (in-process transport): client parts
around the user's train(), per-round config and extra tensors both ways, the
strategy's state in the checkpoint, attacks against the robust aggregators."""
import json
import os
from argparse import Namespace

import pytest
import torch
from torch import nn

from fedml_api.distributed.fedavg.checkpoint import load_checkpoint
from fedml_api.distributed.fedavg.FedAVGTrainer import FedAVGTrainer
from fedml_core.aggregation import ClientAlgorithm, ClientInstructions, ClientReport, FedAvg
from fedml_core.aggregation.attacks import ModelPoisoning
from fedml_core.aggregation.fedprox import FedProxClient
from fedml_core.aggregation.fednova import FedNovaClient
from fedml_core.aggregation.registry import REGISTRY
from fedml_core.aggregation.scaffold import ScaffoldClient
from test_fedavg_protocol import run_federation
from tiny_federation import LOCAL_STEPS, TinyTrainer, make_model, sampled_clients, write_client_data


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


OPTIONS = {"Krum": ["--krum_f", "0"], "MultiKrum": ["--krum_f", "0"], "NormClipping": ["--clip_norm", "0.5"],
           "FedPer": ["--personal_layers", "3"]}


def federated(name, key):
    """Whether the global model's ``key`` moves under algorithm ``name`` (FedPer's
    personal head, above, keeps its initial values there)."""
    return not (name == "FedPer" and key.startswith("3."))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_algorithm_runs_through_the_protocol(tmp_path, name):
    _, run_dir, errors = run_federation(tmp_path, clients=4, per_round=3, rounds=2, test_every=1,
                                        extra=["--federated_optimizer", name, *OPTIONS.get(name, [])], lr=0.1)
    assert not errors
    records = records_of(run_dir)
    assert [r["round"] for r in records] == [0, 1] and all("test" in r for r in records)
    final = torch.load(run_dir / "final_model.pt")
    assert all(torch.isfinite(t.double()).all() for t in final.values())
    assert not any(torch.equal(final[k], v) for k, v in make_model().state_dict().items() if k.endswith("weight") and federated(name, k))
    if name == "DPFedAvg":
        assert records[1]["dp"]["epsilon"] > records[0]["dp"]["epsilon"] > 0


def reference_fedadam(data_path, total, per_round, rounds, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-9):
    """FedAdam over the tiny federation in one process, in float64, without framework code."""
    x = {k: v.clone() for k, v in make_model().state_dict().items()}
    parameters = {name for name, _ in make_model().named_parameters()}
    m = {k: torch.zeros_like(x[k], dtype=torch.float64) for k in parameters}
    v = {k: torch.full_like(x[k], tau ** 2, dtype=torch.float64) for k in parameters}
    for r in range(rounds):
        states, weights = [], []
        for cid in sampled_clients(0, r, total, per_round):
            trainer = TinyTrainer(make_model())
            trainer.model.load_state_dict(x)
            path = os.path.join(data_path, str(cid), "train")
            trainer.train(torch.device("cpu"), Namespace(), path)
            states.append({k: t.clone() for k, t in trainer.model.state_dict().items()})
            weights.append(float(trainer.get_local_sample_number(path)))
        new = {}
        for k, value in x.items():
            mean = sum(s[k].double() * w for s, w in zip(states, weights)) / sum(weights)
            if k in parameters:
                delta = mean - value.double()
                m[k] = beta1 * m[k] + (1 - beta1) * delta
                v[k] = beta2 * v[k] + (1 - beta2) * delta ** 2
                mean = value.double() + eta * m[k] / (v[k].sqrt() + tau)
            new[k] = mean.round().to(value.dtype) if not value.is_floating_point() else mean.to(value.dtype)
        x = new
    return x


def test_fedadam_through_the_protocol_matches_the_paper_computed_in_one_process(tmp_path):
    # tau well above float32 rounding: with tau ~ 0 an element no client changed moves by
    # +-eta on the sign of rounding noise (in the reference too), which no oracle can match.
    data_path, run_dir, errors = run_federation(tmp_path, clients=4, per_round=2, rounds=3,
                                                extra=["--federated_optimizer", "FedAdam", "--tau", "1e-3"])
    assert not errors
    final, expected = torch.load(run_dir / "final_model.pt"), reference_fedadam(str(data_path), 4, 2, 3, tau=1e-3)
    for key, value in expected.items():
        assert torch.allclose(final[key].double(), value.double(), atol=1e-4), key


@pytest.mark.parametrize("name, extra", [("FedAdam", []), ("SCAFFOLD", []), ("DPFedAvg", ["--noise_multiplier", "0.3"])])
def test_a_resumed_run_of_a_stateful_algorithm_ends_bit_exactly_like_an_uninterrupted_one(tmp_path, name, extra):
    options = ["--federated_optimizer", name, *extra]
    _, full_dir, errors = run_federation(tmp_path / "full", clients=4, per_round=2, rounds=5, extra=options, lr=0.1)
    assert not errors
    _, first_dir, errors = run_federation(tmp_path / "part", clients=4, per_round=2, rounds=2, extra=options, lr=0.1)
    assert not errors and load_checkpoint(str(first_dir)).strategy_state
    _, resumed_dir, errors = run_federation(tmp_path / "resumed", clients=4, per_round=2, rounds=5,
                                            extra=[*options, "--resume", str(first_dir)], lr=0.1)
    assert not errors
    full, resumed = torch.load(full_dir / "final_model.pt"), torch.load(resumed_dir / "final_model.pt")
    assert all(torch.equal(full[key], resumed[key]) for key in full)
    if name == "SCAFFOLD":  # the control variates of every client that trained persist
        state = load_checkpoint(str(resumed_dir)).strategy_state
        trained = {c for r in records_of(full_dir) for c in r["sampled_clients"]}
        assert {int(c) for c in state["client_controls"]["versions"]} == trained


class ScheduleStrategy(FedAvg):
    """A user-defined algorithm: sends each client a per-round value and a tensor, and
    expects a tensor and metadata back."""

    name = "Schedule"
    received = []

    def configure_round(self, round_idx, clients, global_model):
        return {c: ClientInstructions({"factor": round_idx + 1}, {"offset": torch.full((2,), float(c))}) for c in clients}

    def expected_client_tensors(self):
        return [("echo", torch.float32, (2,))]

    def add(self, update):
        ScheduleStrategy.received.append((update.client_id, update.metadata["factor"], update.tensors.tensors()["echo"].tolist()))
        super().add(update)

    def client_algorithm(self, args):
        return EchoClient()


class EchoClient(ClientAlgorithm):
    def before_train(self, model, round_info):
        self.round_info = round_info

    def after_train(self, model, state):
        factor = self.round_info.config["factor"]
        return ClientReport(tensors={"echo": self.round_info.tensors["offset"] * factor}, metadata={"factor": factor})


def test_a_user_defined_strategy_is_driven_by_the_server_with_config_and_tensors_both_ways(tmp_path):
    ScheduleStrategy.received = []
    _, run_dir, errors = run_federation(tmp_path, clients=3, per_round=2, rounds=2, strategy_factory=ScheduleStrategy)
    assert not errors
    expected = [(c, r + 1, [float(c * (r + 1))] * 2) for r in range(2) for c in sampled_clients(0, r, 3, 2)]
    assert sorted(ScheduleStrategy.received) == sorted(expected)


class WrongEcho(EchoClient):
    def after_train(self, model, state):
        return ClientReport(tensors={"echo": torch.full((3,), float("nan"))}, metadata={"factor": 1})


def test_extra_tensors_are_checked_like_the_model(tmp_path):
    class Strict(ScheduleStrategy):
        def client_algorithm(self, args):
            return WrongEcho()

    _, run_dir, errors = run_federation(tmp_path, clients=2, per_round=2, rounds=1, strategy_factory=Strict)
    assert list(errors) == [0]  # every update rejected: the run stops
    assert "expects the extra tensors ['echo']" in (run_dir / "server.log").read_text()


def test_a_client_running_another_algorithm_than_the_server_stops_with_both_named(tmp_path):
    data_path = tmp_path / "data"
    write_client_data(str(data_path), 1)
    from fedml_api.distributed.fedavg.FedAvgClientManager import FedAVGClientManager
    from fedml_core.distributed.communication.inprocess_transport import InProcessHub
    from fedml_core.distributed.communication.message import Message

    trainer = FedAVGTrainer(1, str(data_path / "1" / "train"), str(data_path / "1" / "test"), torch.device("cpu"), Namespace(),
                            TinyTrainer(make_model()))
    manager = FedAVGClientManager(Namespace(shared_memory="off"), trainer, InProcessHub(2).transport(1), "FedProx")
    message = Message(1, 0, 1, {"round_idx": 0, "config": {"algorithm": "FedAvg"}}, make_model().state_dict())
    with pytest.raises(RuntimeError, match="client 1 runs FedProx, but the server runs FedAvg"):
        manager.handle_message_receive_model_from_server(message)


# -- the client parts, around a user's train() they do not touch ----------------------

def local_training(tmp_path, algorithms, config=None, tensors=None, trainer_factory=TinyTrainer, args=None):
    write_client_data(str(tmp_path), 1)
    model = make_model()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = FedAVGTrainer(1, str(tmp_path / "1" / "train"), str(tmp_path / "1" / "test"), torch.device("cpu"),
                            args or Namespace(lr=0.1), trainer_factory(model), algorithms)
    trainer.update_model(global_state)
    state, _, _, report = trainer.train(0, config or {}, tensors or {})
    return global_state, model, state, report


def reference_local_training(tmp_path, extra_loss=None, correction=None):
    """TinyTrainer's full-batch SGD with the extra loss term or gradient correction
    written into the loop (what the paper's client does)."""
    model = make_model()
    data = torch.load(tmp_path / "1" / "train" / "data.pt")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(LOCAL_STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data["x"]), data["y"])
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        if correction is not None:
            for name, p in model.named_parameters():
                p.grad += correction[name]
        opt.step()
    return model


class KeepsTheGlobalDict(TinyTrainer):
    """The FedProx trap: keeps the dict set_model_params gets as "the global model"
    (a view of the model's own memory)."""

    def set_model_params(self, model_parameters):
        self.global_model = model_parameters
        super().set_model_params(model_parameters)


def test_fedprox_adds_the_proximal_term_to_local_training_and_it_is_non_zero_after_local_steps(tmp_path):
    mu = 0.5
    prox = FedProxClient()
    global_state, model, _, _ = local_training(tmp_path, [prox], config={"mu": mu}, trainer_factory=KeepsTheGlobalDict)
    assert prox.proximal_term(model) > 0
    w0 = {name: global_state[name] for name, _ in make_model().named_parameters()}
    expected = reference_local_training(
        tmp_path, extra_loss=lambda m: mu / 2 * sum(((p - w0[n]) ** 2).sum() for n, p in m.named_parameters()))
    plain = reference_local_training(tmp_path)
    for (name, p), q, r in zip(model.named_parameters(), expected.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert not all(torch.allclose(p, r, atol=1e-6) for p, r in zip(model.parameters(), plain.parameters()))
    # no hook is left behind on the user's model
    assert all(not p._backward_hooks for p in model.parameters())


def test_scaffold_client_corrects_every_gradient_and_returns_option_two_control_variate(tmp_path):
    g = torch.Generator().manual_seed(7)
    correction = {name: 0.1 * torch.randn(p.shape, generator=g) for name, p in make_model().named_parameters()}
    global_state, model, _, report = local_training(tmp_path, [ScaffoldClient()], tensors=correction)
    expected = reference_local_training(tmp_path, correction=correction)
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
        c_plus = (global_state[name].double() - q.detach().double()) / (LOCAL_STEPS * 0.1) - correction[name].double()
        assert torch.allclose(report.tensors[name].double(), c_plus, atol=1e-4), name
    assert report.metadata == {"local_steps": LOCAL_STEPS}


class FrozenFirstBias(TinyTrainer):
    """A user's trainer that freezes a parameter (fine-tuning): it is still one of the
    model's named_parameters(), which the server's strategy is set up with."""

    def __init__(self, model):
        model[0].bias.requires_grad_(False)
        model.register_parameter("step_count", nn.Parameter(torch.tensor([3]), requires_grad=False))  # not a float
        super().__init__(model)


def test_scaffold_runs_a_model_with_a_frozen_parameter_through_the_protocol(tmp_path):
    _, run_dir, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=2, trainer_factory=FrozenFirstBias,
                                        extra=["--federated_optimizer", "SCAFFOLD"], lr=0.1)
    assert not errors, errors
    records = records_of(run_dir)
    assert all("rejected_updates" not in r for r in records), records
    final, initial = torch.load(run_dir / "final_model.pt"), make_model().state_dict()
    assert torch.allclose(final["0.bias"], initial["0.bias"], atol=1e-6)  # frozen: it never moves (but for the mean's rounding)
    assert not torch.equal(final["0.weight"], initial["0.weight"])


def test_fednova_client_counts_the_local_steps(tmp_path):
    _, _, _, report = local_training(tmp_path, [FedNovaClient()])
    assert report.metadata == {"local_steps": LOCAL_STEPS, "a_norm": float(LOCAL_STEPS)}


@pytest.mark.parametrize("attack", ["sign_flip", "scale", "gaussian"])
def test_an_attacker_replaces_its_update(tmp_path, attack):
    global_state, _, honest_state, _ = local_training(tmp_path / "honest", [])
    honest = {k: v.clone() for k, v in honest_state.items()}
    _, _, poisoned, _ = local_training(tmp_path / "attacker", [ModelPoisoning(attack, attack_scale=10.0, attack_std=0.5)])
    x, y, z = global_state["0.weight"], honest["0.weight"], poisoned["0.weight"]
    if attack == "sign_flip":
        assert torch.allclose(z, x - (y - x), atol=1e-6)
    elif attack == "scale":
        assert torch.allclose(z, x + 10 * (y - x), atol=1e-5)
    else:
        assert abs((z - x).std().item() - 0.5) < 0.25 and not torch.allclose(z, y)
    assert torch.equal(poisoned["1.num_batches_tracked"], honest["1.num_batches_tracked"])


def test_krum_leaves_out_a_scaling_attacker_that_fedavg_lets_through(tmp_path):
    attack = ["--attack", "scale", "--attackers", "2", "--attack_scale", "50"]
    # The updates Krum does not choose are valid: they count towards --min_clients_per_round.
    _, krum_dir, errors = run_federation(tmp_path / "krum", clients=5, per_round=5, rounds=2,
                                         extra=["--federated_optimizer", "Krum", "--krum_f", "1", "--min_clients_per_round", "5",
                                                *attack])
    assert not errors
    for record in records_of(krum_dir):
        assert "Krum chose" in record["krum_not_chosen"]["2"] and "rejected_updates" not in record
    _, clean_dir, _ = run_federation(tmp_path / "clean", clients=5, per_round=5, rounds=2)
    _, attacked_dir, _ = run_federation(tmp_path / "fedavg", clients=5, per_round=5, rounds=2, extra=attack)
    clean, krum, attacked = (torch.load(d / "final_model.pt")["0.weight"] for d in (clean_dir, krum_dir, attacked_dir))
    assert (krum - clean).norm() < (attacked - clean).norm() / 5


class FailingOnce(TinyTrainer):
    failed = False

    def train(self, device, args, train_path):
        if not FailingOnce.failed:
            FailingOnce.failed = True
            raise RuntimeError("user code failed")
        super().train(device, args, train_path)


def test_a_round_whose_training_raised_leaves_no_hook_behind_for_the_next(tmp_path):
    FailingOnce.failed = False
    prox = FedProxClient()
    write_client_data(str(tmp_path), 1)
    model = make_model()
    trainer = FedAVGTrainer(1, str(tmp_path / "1" / "train"), str(tmp_path / "1" / "test"), torch.device("cpu"),
                            Namespace(), FailingOnce(model), [prox])
    with pytest.raises(RuntimeError, match="user code failed"):
        trainer.train(0, {"mu": 0.5})
    trainer.train(1, {"mu": 0.5})
    expected = reference_local_training(
        tmp_path, extra_loss=lambda m: 0.25 * sum(((p - w0) ** 2).sum() for p, w0 in zip(m.parameters(), make_model().parameters())))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), expected.parameters()))


def test_metadata_that_is_not_a_json_object_is_rejected_like_a_bad_tensor(tmp_path):
    from fedml_api.distributed.fedavg.FedAVGAggregator import FedAVGAggregator
    from fedml_core.aggregation import InvalidUpdate
    from fedml_core.distributed.communication.packed_tensors import PackedTensors
    from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator

    args = Namespace(client_num_in_total=2, client_num_per_round=2, seed=0)
    aggregator = FedAVGAggregator(TinyTrainer(make_model()), WeightedMeanResultAggregator(), args)
    with pytest.raises(InvalidUpdate, match="metadata must be a JSON object, got int"):
        aggregator.add_local_trained_result(1, PackedTensors.from_tensors(make_model().state_dict()), 5, None, 5)


class ListTrainer(TinyTrainer):
    """FineFL style: get_model_params returns a list (tensors named "0", "1", ... on the wire)."""

    def get_model_params(self):
        return list(self.model.state_dict().values())

    def set_model_params(self, params):
        self.model.load_state_dict(dict(zip(self.model.state_dict(), params)))


def test_a_server_optimizer_steps_the_parameters_of_a_trainer_that_returns_a_list(tmp_path):
    # The list's tensors are the model's state_dict in order: its parameters are found by position.
    options = ["--federated_optimizer", "FedAvgM", "--server_lr", "1"]
    finals = []
    for name, factory in (("dict", TinyTrainer), ("list", ListTrainer)):
        _, run_dir, errors = run_federation(tmp_path / name, clients=3, per_round=3, rounds=3, trainer_factory=factory, extra=options)
        assert not errors
        finals.append(list(torch.load(run_dir / "final_model.pt").values()))
    _, plain_dir, _ = run_federation(tmp_path / "fedavg", clients=3, per_round=3, rounds=3)
    plain = list(torch.load(plain_dir / "final_model.pt").values())
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    assert not torch.allclose(finals[1][0], plain[0])  # the momentum was applied


class ParametersListTrainer(TinyTrainer):
    """FineFL style too: a list of the parameters only (the BatchNorm statistics stay local)."""

    def get_model_params(self):
        return [p.detach() for p in self.model.parameters()]

    def set_model_params(self, params):
        with torch.no_grad():
            for p, value in zip(self.model.parameters(), params):
                p.copy_(value)


@pytest.mark.parametrize("factory", [ListTrainer, ParametersListTrainer])
def test_scaffold_runs_a_trainer_that_returns_a_list_as_it_runs_the_same_model_by_names(tmp_path, factory):
    # The control variates travel under the list's names ("0", "1", ...) and are matched
    # with the model's parameters by position, so the run is the named run, bit for bit.
    options = ["--federated_optimizer", "SCAFFOLD"]
    finals = []
    for name, trainer in (("named", TinyTrainer if factory is ListTrainer else NamedParametersTrainer), ("list", factory)):
        _, run_dir, errors = run_federation(tmp_path / name, clients=3, per_round=2, rounds=3, trainer_factory=trainer,
                                            extra=options, lr=0.1)
        assert not errors
        records = records_of(run_dir)
        assert not any(r.get("rejected_updates") for r in records)
        finals.append(list(torch.load(run_dir / "final_model.pt").values()))
    assert len(finals[0]) == len(finals[1]) and all(torch.equal(a, b) for a, b in zip(*finals))
    assert not torch.equal(finals[1][0], make_model().state_dict()["0.weight"])


class NamedParametersTrainer(TinyTrainer):
    """The parameters only, by name: the named counterpart of ParametersListTrainer."""

    def get_model_params(self):
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def set_model_params(self, params):
        self.model.load_state_dict(params, strict=False)


def test_the_preflight_refuses_a_checkpoint_of_another_algorithm(tmp_path, capsys):
    from fedml_api.distributed.fedavg.preflight import run_preflight
    from test_fedavg_protocol import federation_args

    data_path, run_dir, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=1, extra=["--federated_optimizer", "SCAFFOLD"],
                                                lr=0.1)
    assert not errors
    args = federation_args(3, 3, 3, data_path, tmp_path / "again", "--resume", str(run_dir), "--federated_optimizer", "FedAvg")
    with pytest.raises(SystemExit) as exit_:
        run_preflight(args, TinyTrainer(make_model()))
    assert exit_.value.code == 2
    assert "FedAvg keeps no state, but the checkpoint holds" in capsys.readouterr().err


def test_the_preflight_of_a_resume_reads_one_client_state_and_writes_nothing(tmp_path, monkeypatch):
    from fedml_api.distributed.fedavg.preflight import run_preflight
    from test_fedavg_protocol import federation_args

    data_path, run_dir, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=1, extra=["--federated_optimizer", "SCAFFOLD"],
                                                lr=0.1)
    assert not errors
    loaded = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: loaded.append(str(path)) or load(path, *a, **k))
    args = federation_args(3, 3, 3, data_path, tmp_path / "again", "--resume", str(run_dir), "--federated_optimizer", "SCAFFOLD")
    with pytest.raises(SystemExit) as exit_:
        run_preflight(args, TinyTrainer(make_model()))
    assert exit_.value.code == 0
    assert not (tmp_path / "again").exists()
    assert len([path for path in loaded if "client_state" in path]) == 1  # of 3: the layout is checked on one
