"""FedPer (personal layers): the server step against the paper's rule in plain float64
arithmetic, then through the protocol in both modes (one process per client, and
--worker_processes) against a one-process reference, the personalised test phase,
bit-exact resume and the pre-flight's errors."""
import os
from argparse import Namespace

import pytest
import torch

from fedml_api.distributed.fedavg.checkpoint import load_checkpoint
from fedml_core.aggregation import ClientUpdate, FederationInfo
from fedml_core.aggregation.client_state import ClientStateStore
from fedml_core.aggregation.fedper import FedPer
from fedml_core.distributed.communication.packed_tensors import PackedTensors
from test_fedavg_protocol import federation_args, run_federation
from test_strategies_protocol import ListTrainer, records_of
from tiny_federation import TinyTrainer, make_model, reference_run, sampled_clients

FEDERATION = FederationInfo(num_clients=6, clients_per_round=3, seed=3)
# "head" is a module: it takes head.w and head.b, not header.w.
TRAINABLE = ["body.w", "head.w", "head.b", "header.w"]
PERSONAL = ["head.w", "head.b"]


def global_model():
    g = torch.Generator().manual_seed(0)
    return {"body.w": torch.randn(700_000, generator=g),  # more than one aggregation block
            "body.bn.running_mean": torch.randn(4, generator=g),
            "body.bn.num_batches_tracked": torch.tensor(10),
            "head.w": torch.randn(6, generator=g), "head.b": torch.randn(3, generator=g),
            "header.w": torch.randn(5, generator=g)}


def trained(x, round_idx, client):
    g = torch.Generator().manual_seed(100 * round_idx + client)
    return {k: v + 0.1 * client * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + client for k, v in x.items()}


def ready(strategy, x, directory=None):
    federation = FederationInfo(FEDERATION.num_clients, FEDERATION.clients_per_round, FEDERATION.seed, directory)
    strategy.setup(PackedTensors.from_tensors(x), TRAINABLE, federation)
    return strategy


def run_round(strategy, x, round_idx, clients, samples, nan_client=None):
    packed_x = PackedTensors.from_tensors(x)
    instructions = strategy.configure_round(round_idx, clients, packed_x)
    states = {}
    for client, n in zip(clients, samples):
        states[client] = trained(x, round_idx, client)
        if client == nan_client:
            states[client]["head.w"][0] = float("nan")
        strategy.add(ClientUpdate(client, PackedTensors.from_tensors(states[client]), n))
    return strategy.aggregate(packed_x, round_idx).copy_tensors(), instructions, states


def test_fedper_averages_the_base_layers_and_keeps_each_client_s_personal_layers_its_own(tmp_path):
    x0 = global_model()
    x = x0
    strategy = ready(FedPer("head"), x, str(tmp_path))
    own = {}  # client: its personal layers, as the paper's clients keep them
    samples = [5, 50, 500]
    for r, clients in enumerate([[1, 2, 3], [2, 4, 5], [1, 2, 6]]):
        new, instructions, states = run_round(strategy, x, r, clients, samples)
        for client in clients:  # each is sent its own personal layers, or none before its first training
            sent = instructions[client].tensors if client in instructions else None
            assert (sent is None) == (client not in own)
            if sent is not None:
                assert sorted(sent) == sorted(PERSONAL) and all(torch.equal(sent[k], own[client][k]) for k in PERSONAL)
        for key in ["body.w", "body.bn.running_mean", "header.w"]:  # the base: the sample-weighted mean
            mean = sum(states[c][key].double() * n for c, n in zip(clients, samples)) / sum(samples)
            assert torch.allclose(new[key].double(), mean, rtol=1e-5, atol=1e-6), key
        count = sum(states[c]["body.bn.num_batches_tracked"].item() * n for c, n in zip(clients, samples)) / sum(samples)
        assert new["body.bn.num_batches_tracked"].item() == round(count)
        for key in PERSONAL:  # never averaged: the global model keeps the initial values
            assert torch.equal(new[key], x0[key])
        for client in clients:
            own[client] = {k: states[client][k] for k in PERSONAL}
        x = new
    # what each client trained last is what it tests with, and what the store holds
    tested = strategy.configure_test(2, list(range(1, 7)), PackedTensors.from_tensors(x))
    assert sorted(tested) == sorted(own)
    for client, layers in own.items():
        assert all(torch.equal(tested[client].tensors[k], layers[k]) for k in PERSONAL)
        assert all(torch.equal(strategy.personal_layers.get(client)[k], layers[k]) for k in PERSONAL)
    assert strategy.personal_layers._in_memory == {}  # on disk, not in the server's memory


def test_a_rejected_update_leaves_the_client_its_last_personal_layers(tmp_path):
    x = global_model()
    strategy = ready(FedPer(["head"]), x)
    x, _, first = run_round(strategy, x, 0, [1, 2], [10, 20])
    _, _, _ = run_round(strategy, x, 1, [1, 2], [10, 20], nan_client=2)
    assert list(strategy.rejected_updates()) == [2]
    assert all(torch.equal(strategy.personal_layers.get(2)[k], first[2][k]) for k in PERSONAL)
    assert not torch.equal(strategy.personal_layers.get(1)["head.w"], first[1]["head.w"])


@pytest.mark.parametrize("prefixes, message", [
    ("heda", r"--personal_layers: 'heda' names no tensor of the model \(did you mean 'head'\?\); its top-level modules are body, head, header"),
    ("head,body,header", "takes every parameter of the model: FedPer would federate nothing"),
    ("head,header,body.w", "takes every parameter"),  # the buffers left are no parameters
    ("he", "'he' names no tensor"),  # a prefix ends at a dot
])
def test_personal_layers_that_name_nothing_or_everything_are_refused(prefixes, message):
    with pytest.raises(ValueError, match=message):
        ready(FedPer(prefixes), global_model())


@pytest.mark.parametrize("given", [None, "", "fc,,layer4"])
def test_fedper_needs_personal_layers(given):
    with pytest.raises(ValueError, match="personal_layers"):
        FedPer(given)


def test_the_preflight_names_bad_personal_layers_before_launch(tmp_path, capsys):
    from fedml_api.distributed.fedavg.preflight import run_preflight

    args = federation_args(3, 3, 1, tmp_path, tmp_path / "run", "--federated_optimizer", "FedPer", "--personal_layers", "4")
    with pytest.raises(SystemExit) as exit_:
        run_preflight(args, TinyTrainer(make_model()))
    assert exit_.value.code == 2
    assert "error: --personal_layers: '4' names no tensor of the model; its top-level modules are 0, 1, 3" \
        in capsys.readouterr().err


# -- through the protocol ------------------------------------------------------------

FEDPER = ["--federated_optimizer", "FedPer", "--personal_layers", "3"]
HEAD = {"3.weight", "3.bias"}  # the tiny model's last Linear


def stored_personal_layers(run_dir):
    """The clients' personal layers the run's last checkpoint names, read from its store."""
    store = ClientStateStore(None)
    store.restore(load_checkpoint(str(run_dir)).strategy_state["personal_layers"])
    return {client: store.get(client) for client in store.clients()}


def personalised_test_loss(data_path, clients, global_state, own):
    """The sample-weighted test loss of every client's own model (the global base with
    its personal layers; the initial ones for a client that never trained)."""
    total = weight = 0.0
    for client in clients:
        trainer = TinyTrainer(make_model())
        trainer.model.load_state_dict({**global_state, **own.get(client, {})})
        loss = trainer.test(torch.device("cpu"), Namespace(), os.path.join(data_path, str(client), "test"))["loss"]
        total, weight = total + loss * (4 + client), weight + 4 + client
    return total / weight


@pytest.mark.parametrize("workers", [None, 2])
def test_fedper_clients_train_their_own_personal_layers_and_test_with_them(tmp_path, workers):
    data_path, run_dir, errors = run_federation(tmp_path, clients=5, per_round=3, rounds=4, test_every=2, extra=FEDPER,
                                                workers=workers)
    assert not errors
    expected, own, _ = reference_run(str(data_path), 5, 3, 4, personal=HEAD)
    final, initial = torch.load(run_dir / "final_model.pt"), make_model().state_dict()
    for key, value in expected.items():  # the base is FedAvg's; the personal layers are never averaged
        if key in HEAD:
            assert torch.equal(final[key], initial[key]), key
        else:
            assert torch.allclose(final[key].double(), value.double(), atol=1e-5), key
    stored = stored_personal_layers(run_dir)
    trained = {c for r in range(4) for c in sampled_clients(0, r, 5, 3)}
    assert set(stored) == trained == set(own)
    for client in trained:  # what the client alone trained, from its own layers round after round
        assert sorted(stored[client]) == sorted(HEAD)
        for key in HEAD:
            assert torch.allclose(stored[client][key], own[client][key], atol=1e-5), (client, key)
    assert not torch.allclose(stored[min(trained)]["3.weight"], stored[max(trained)]["3.weight"], atol=1e-3)
    # the test rounds report the personalised models' metrics
    last = records_of(run_dir)[-1]
    assert last["tested_clients"] == [1, 2, 3, 4, 5]
    personalised = personalised_test_loss(str(data_path), range(1, 6), expected, own)
    assert last["test"]["loss"] == pytest.approx(personalised, abs=1e-5)
    assert abs(personalised_test_loss(str(data_path), range(1, 6), expected, {}) - personalised) > 1e-3


def test_fedper_runs_a_trainer_that_returns_a_list_as_it_runs_the_same_model_by_names(tmp_path):
    # The list's tensors ("0", "1", ...) are the model's state_dict by position: the
    # prefixes find the head by the model's names, and the run is the named run.
    runs = {}
    for name, factory in (("dict", TinyTrainer), ("list", ListTrainer)):
        _, run_dir, errors = run_federation(tmp_path / name, clients=4, per_round=3, rounds=3, test_every=3,
                                            extra=FEDPER, trainer_factory=factory)
        assert not errors
        runs[name] = run_dir
    named, listed = (list(torch.load(runs[n] / "final_model.pt").values()) for n in ("dict", "list"))
    assert len(named) == len(listed) and all(torch.equal(a, b) for a, b in zip(named, listed))
    by_position = {str(i): key for i, key in enumerate(make_model().state_dict())}
    named_layers, listed_layers = stored_personal_layers(runs["dict"]), stored_personal_layers(runs["list"])
    assert sorted(named_layers) == sorted(listed_layers) and named_layers
    for client, layers in listed_layers.items():
        assert {by_position[i] for i in layers} == HEAD
        assert all(torch.equal(t, named_layers[client][by_position[i]]) for i, t in layers.items())
    assert records_of(runs["list"])[-1]["test"] == records_of(runs["dict"])[-1]["test"]  # personalised, the same


@pytest.mark.parametrize("workers", [None, 2])
def test_a_resumed_fedper_run_ends_bit_exactly_like_an_uninterrupted_one(tmp_path, workers):
    def run(name, rounds, *extra):
        _, run_dir, errors = run_federation(tmp_path / name, clients=5, per_round=2, rounds=rounds, extra=[*FEDPER, *extra],
                                            workers=workers)
        assert not errors
        return run_dir

    full = run("full", 5)
    interrupted = run("part", 2)
    resumed = run("resumed", 5, "--resume", str(interrupted))
    a, b = torch.load(full / "final_model.pt"), torch.load(resumed / "final_model.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [r.get("test") for r in records_of(full)] == [r.get("test") for r in records_of(resumed)]
    full_layers, resumed_layers = stored_personal_layers(full), stored_personal_layers(resumed)
    assert sorted(full_layers) == sorted(resumed_layers) and len(full_layers) > 2
    for client, layers in full_layers.items():
        assert all(torch.equal(layers[key], resumed_layers[client][key]) for key in HEAD), client


def rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_the_server_s_memory_does_not_grow_with_the_clients_whose_personal_layers_it_keeps(tmp_path):
    # A 0.5 MB head: the 240 clients trained after the first round would hold 120 MB
    # more in memory; the store keeps them on disk.
    x = {"body.w": torch.zeros(1000), "head.w": torch.zeros(125_000)}
    strategy = FedPer("head")
    strategy.setup(PackedTensors.from_tensors(x), ["body.w", "head.w"], FederationInfo(300, 60, 0, str(tmp_path)))
    packed_x = PackedTensors.from_tensors(x)
    rss = []
    for r in range(5):
        clients = list(range(60 * r + 1, 60 * r + 61))
        strategy.configure_round(r, clients, packed_x)
        for client in clients:
            strategy.add(ClientUpdate(client, PackedTensors.from_tensors({k: v + client for k, v in x.items()}), 1))
        packed_x = strategy.aggregate(packed_x, r)
        rss.append(rss_mib())
    assert len(strategy.personal_layers) == 300 and strategy.personal_layers.get(300)["head.w"][0] == 300
    assert rss[-1] - rss[0] < 40, rss
