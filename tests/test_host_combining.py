"""Per-host combining of partial sums (--worker_processes, --combine_per_host): the
workers of a host other than the server's add their partial sums together, and one sum
per host reaches the server. Distinct hosts are faked on this machine with
$FEDML_FAKE_HOSTS (one name per rank); in-process transport (the mpirun run is in
test_worker_processes_mpi.py)."""
import json
import threading
import time

import pytest
import torch

from fedml_api.distributed.fedavg.client_assignment import assign_clients
from fedml_api.distributed.fedavg.FedAvgWorkerManager import FedAvgWorkerManager
from fedml_api.distributed.fedavg.host_combining import (FAKE_HOSTS_ENV, HostCombination, combining_plan, host_name,
                                                          too_late_to_combine)
from fedml_api.distributed.fedavg.message_define import MyMessage
from fedml_core.aggregation.partial_sums import PartialSum
from fedml_core.distributed.communication.inprocess_transport import InProcessTransport
from fedml_core.distributed.communication.packed_tensors import PackedTensors
from test_fedavg_protocol import run_federation
from tiny_federation import ProcessDied, TinyTrainer, client_sample_number, reference_fedavg

# Workers 1-2 on host a, 3-4 on host b, none on the server's host s: worker 1 combines
# host a's sums, worker 3 host b's. 8 clients, all trained every round, 2 per worker.
TWO_HOSTS = "s,a,a,b,b"
CLIENTS, WORKERS = 8, 4
ASSIGNED = assign_clients(range(1, CLIENTS + 1), range(1, WORKERS + 1), {c: client_sample_number(c) for c in range(1, CLIENTS + 1)})


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_model(run_dir):
    return torch.load(run_dir / "final_model.pt")


def same_model(a, b):
    return list(a) == list(b) and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture
def sent(monkeypatch):
    """Every message the in-process transport carries: (type, sender, receiver, round, has tensors)."""
    log = []
    send = InProcessTransport.send

    def spying_send(self, message, timeout=None):
        log.append((message.msg_type, message.sender_id, message.receiver_id,
                    message.params.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX), bool(message.tensors)))
        return send(self, message, timeout)

    monkeypatch.setattr(InProcessTransport, "send", spying_send)
    return log


def partial_sums_to_server(log, round_idx):
    return sorted(s for t, s, r, rnd, tensors in log
                  if t == MyMessage.MSG_TYPE_C2S_CLIENTS_TRAINED and r == 0 and rnd == round_idx and tensors)


def two_host_run(tmp_path, monkeypatch, rounds=3, **options):
    monkeypatch.setenv(FAKE_HOSTS_ENV, TWO_HOSTS)
    return run_federation(tmp_path, clients=CLIENTS, per_round=CLIENTS, rounds=rounds, workers=WORKERS, **options)


def reference(data_path, rounds=3, left_out=None):
    return reference_fedavg(str(data_path), CLIENTS, CLIENTS, rounds, left_out=left_out)


# -- the pieces ---------------------------------------------------------------------

def test_each_remote_host_with_two_or_more_workers_is_combined_by_its_lowest_rank():
    hosts = {1: "s", 2: "s", 3: "a", 4: "a", 5: "a", 6: "b", 7: "b", 8: "c"}
    assert combining_plan([1, 2, 3, 4, 5, 6, 7, 8], hosts, server_host="s") == {3: [4, 5], 6: [7]}
    # only the phase's workers count: host b has one left, which sends directly
    assert combining_plan([1, 4, 5, 7], hosts, server_host="s") == {4: [5]}
    # a worker whose host is unknown (never reported) sends directly
    assert combining_plan([3, 4, 9], hosts, server_host="s") == {3: [4]}


def test_fake_hosts_are_read_from_the_environment_one_name_per_rank(monkeypatch):
    monkeypatch.setenv(FAKE_HOSTS_ENV, "s,a,a")
    assert [host_name(rank) for rank in range(3)] == ["s", "a", "a"]
    with pytest.raises(ValueError, match="names no host for rank 3"):
        host_name(3)
    monkeypatch.delenv(FAKE_HOSTS_ENV)
    import socket
    assert host_name(3) == socket.gethostname()


def _partial(values, clients, weight=1):
    template = PackedTensors.from_tensors({"w": torch.zeros(len(values))})
    partial = PartialSum(template)
    for client in clients:
        partial.add(client, PackedTensors.from_tensors({"w": torch.tensor(values, dtype=torch.float32)}), weight)
    return partial


def test_a_combiner_adds_its_peers_sums_in_rank_order_and_ignores_late_duplicate_and_foreign_ones():
    own = _partial([1.0, 2.0], [1])
    combination = HostCombination(0, own, {3: [3], 5: [5, 7]}, deadline=None)
    # rank 5's sum comes first: it waits for rank 3's turn
    assert combination.add(5, [5, 7], _partial([10.0, 20.0], [5, 7]).tensors()) is None
    assert own.clients == [1] and combination.awaited() == [3]
    assert combination.add(4, [4], _partial([1.0, 1.0], [4]).tensors()) is not None  # not a peer
    assert combination.add(3, [3], _partial([100.0, 200.0], [3]).tensors()) is None
    assert combination.complete and own.clients == [1, 3, 5, 7] and not combination.missing
    assert torch.equal(own.sums[torch.float32], torch.tensor([1.0 + 100 + 20, 2.0 + 200 + 40], dtype=torch.float64))
    assert "not awaited" in combination.add(3, [3], _partial([1.0, 1.0], [3]).tensors())  # duplicate
    assert own.clients == [1, 3, 5, 7]


def test_a_peer_sum_naming_clients_not_assigned_to_it_is_not_added_and_the_peer_counts_as_missing():
    own = _partial([1.0], [1])
    combination = HostCombination(0, own, {2: [2]}, deadline=None)
    combination.add(2, [2, 6], _partial([5.0], [2, 6]).tensors())
    assert combination.complete and own.clients == [1]
    assert combination.missing == {2: "its sum names clients [2, 6], not all of its [2]"}


def test_a_peer_sends_its_sum_to_the_server_itself_only_in_the_last_tenth_of_its_combine_window():
    assert not too_late_to_combine(received=100.0, combine_seconds=10.0, now=108.9)
    assert too_late_to_combine(received=100.0, combine_seconds=10.0, now=109.0)
    assert not too_late_to_combine(received=100.0, combine_seconds=None, now=1e9)  # no deadline: always combined


def test_lost_and_timed_out_peers_are_missing_and_the_sums_that_came_still_count():
    own = _partial([1.0], [1])
    combination = HostCombination(0, own, {2: [2], 3: [3], 4: [4]}, deadline=time.monotonic())
    combination.add(4, [4], _partial([4.0], [4]).tensors())
    combination.lose(2, "its process died")
    combination.give_up("its partial sum did not arrive within 1 s")
    assert combination.complete and own.clients == [1, 4]
    assert combination.missing == {2: "its process died", 3: "its partial sum did not arrive within 1 s"}


# -- whole runs ---------------------------------------------------------------------

@pytest.mark.parametrize("hosts, plan, direct", [
    # workers 1-2 share the server's host: they send directly
    ("s,s,s,a,a,b,b", {3: [4], 5: [6]}, [1, 2]),
    # three workers on host a; worker 4 alone on host b sends directly
    ("s,a,a,a,b", {1: [2, 3]}, [4]),
])
def test_the_server_receives_one_partial_sum_per_remote_host_and_the_model_is_the_float64_mean(
        tmp_path, monkeypatch, sent, hosts, plan, direct):
    monkeypatch.setenv(FAKE_HOSTS_ENV, hosts)
    workers = hosts.count(",")
    data_path, run_dir, errors = run_federation(tmp_path / "on", clients=9, per_round=7, rounds=3, workers=workers)
    assert not errors
    for record in records_of(run_dir):
        assert record["combined_sums"] == {str(combiner): peers for combiner, peers in plan.items()}
        assert partial_sums_to_server(sent, record["round"]) == sorted(direct + list(plan))
        peer_sums = {(s, r) for t, s, r, rnd, _ in sent if t == MyMessage.MSG_TYPE_W2W_PARTIAL_SUM and rnd == record["round"]}
        assert peer_sums == {(peer, combiner) for combiner, peers in plan.items() for peer in peers}
        assert "failures" not in record
    combined = final_model(run_dir)
    assert same_model(combined, reference_fedavg(str(data_path), 9, 7, 3))

    sent.clear()
    _, off_dir, errors = run_federation(tmp_path / "off", clients=9, per_round=7, rounds=3, workers=workers,
                                        extra=["--combine_per_host", "off"])
    assert not errors
    assert partial_sums_to_server(sent, 0) == list(range(1, workers + 1))
    assert "combined_sums" not in records_of(off_dir)[0]
    assert same_model(final_model(off_dir), combined)


def test_algorithms_that_need_every_update_are_not_combined(tmp_path, monkeypatch):
    _, run_dir, errors = two_host_run(tmp_path, monkeypatch, rounds=2, extra=["--federated_optimizer", "FedMedian"])
    assert not errors
    assert not any("combined_sums" in record for record in records_of(run_dir))


class DyingTrainer(TinyTrainer):
    """Its process dies (as if killed) when it trains client ``victim`` in round 1."""

    victim = None

    def train(self, device, args, train_path):
        if args.round_idx == 1 and int(train_path.rstrip("/").split("/")[-2]) == self.victim:
            raise ProcessDied
        super().train(device, args, train_path)


def run_with_death(tmp_path, monkeypatch, worker, **options):
    monkeypatch.setattr(DyingTrainer, "victim", ASSIGNED[worker][0])
    return two_host_run(tmp_path, monkeypatch, trainer_factory=DyingTrainer, **options)


def test_a_killed_peer_fails_its_clients_for_that_round_only_and_the_others_sums_still_count(tmp_path, monkeypatch):
    # No --round_timeout: the combiner learns of the death from the transport (and the server).
    data_path, run_dir, errors = run_with_death(tmp_path, monkeypatch, worker=4)
    assert list(errors) == [4] and isinstance(errors[4], ProcessDied)
    before, hit, after = records_of(run_dir)
    assert before["combined_sums"] == hit["combined_sums"] == {"1": [2], "3": [4]}
    assert hit["lost_workers"] == {"4": "its process died"}
    assert hit["missing_sums"] == {"4": "its process died"}
    assert hit["failures"] == {str(c): "its worker process 4 failed: its process died" for c in ASSIGNED[4]}
    # the next round goes on with workers 1-3; host b has one worker left, which sends directly
    assert after["combined_sums"] == {"1": [2]} and set(after["assignments"]["train"]) == {"1", "2", "3"}
    assert "failures" not in after and after["tested_clients"] == list(range(1, CLIENTS + 1))
    assert same_model(final_model(run_dir), reference(data_path, left_out={1: ASSIGNED[4]}))


class PeerOfADyingCombiner(DyingTrainer):
    """Worker 4 (the peer) trains its last client of round 1 only once the combiner has died."""

    combiner_died = threading.Event()

    def train(self, device, args, train_path):
        client = int(train_path.rstrip("/").split("/")[-2])
        if args.round_idx == 1 and client == self.victim:
            self.combiner_died.set()
        elif args.round_idx == 1 and client == ASSIGNED[4][-1]:
            assert self.combiner_died.wait(timeout=300)
        super().train(device, args, train_path)


def test_a_killed_combiner_fails_its_own_clients_its_peer_sends_its_sum_itself_and_the_next_round_goes_on(
        tmp_path, monkeypatch):
    monkeypatch.setattr(DyingTrainer, "victim", ASSIGNED[3][0])
    data_path, run_dir, errors = two_host_run(tmp_path, monkeypatch, trainer_factory=PeerOfADyingCombiner)
    assert list(errors) == [3] and isinstance(errors[3], ProcessDied)
    _, hit, after = records_of(run_dir)
    assert hit["lost_workers"] == {"3": "its process died"}
    assert hit["failures"] == {str(c): "its worker process 3 failed: its process died" for c in ASSIGNED[3]}
    assert hit["direct_sums"] == [4]  # the peer knew its combiner dead: its clients count
    # worker 4 is not lost: alone on host b now, it sends its own sum
    assert after["combined_sums"] == {"1": [2]} and set(after["assignments"]["train"]) == {"1", "2", "4"}
    assert "failures" not in after
    assert same_model(final_model(run_dir), reference(data_path, left_out={1: ASSIGNED[3]}))


def test_a_peer_that_raises_is_not_waited_for_even_without_a_round_timeout(tmp_path, monkeypatch):
    send = FedAvgWorkerManager._send_to_combiner

    def broken_send(self, combiner, round_idx, partial, deadline):
        if self.rank == 4 and round_idx == 1:
            raise RuntimeError("injected bug")
        send(self, combiner, round_idx, partial, deadline)

    monkeypatch.setattr(FedAvgWorkerManager, "_send_to_combiner", broken_send)
    data_path, run_dir, errors = two_host_run(tmp_path, monkeypatch)
    assert list(errors) == [4] and "worker 4 stopped: RuntimeError: injected bug" in str(errors[4])
    _, hit, after = records_of(run_dir)
    # the server told worker 3 at once that worker 4's sum was not coming
    assert hit["missing_sums"] == {"4": "RuntimeError: injected bug"}
    assert hit["failures"] == {str(c): "its worker process 4 failed: RuntimeError: injected bug" for c in ASSIGNED[4]}
    assert "failures" not in after
    assert same_model(final_model(run_dir), reference(data_path, left_out={1: ASSIGNED[4]}))


class FreezingTrainer(TinyTrainer):
    """Client ``victim``'s training in round 1 takes ``seconds`` (its worker is frozen meanwhile)."""

    victim, seconds = None, 0.0

    def train(self, device, args, train_path):
        if args.round_idx == 1 and int(train_path.rstrip("/").split("/")[-2]) == self.victim:
            time.sleep(self.seconds)
        super().train(device, args, train_path)


def round_timeout_from_a_healthy_run(tmp_path, monkeypatch):
    """A round timeout 20 times the steady rounds' time on this machine (at least 5 s)."""
    _, healthy_dir, errors = two_host_run(tmp_path / "healthy", monkeypatch)
    assert not errors
    return max(5.0, 20 * max(r["round_seconds"] for r in records_of(healthy_dir)[1:]))


def freeze(monkeypatch, worker, seconds):
    """Worker ``worker`` is frozen for ``seconds`` while it trains its first client in round 1."""
    monkeypatch.setattr(FreezingTrainer, "victim", ASSIGNED[worker][0])
    monkeypatch.setattr(FreezingTrainer, "seconds", seconds)


def test_a_peer_frozen_past_the_server_s_deadline_fails_its_clients_and_its_late_sum_is_ignored(tmp_path, monkeypatch):
    round_timeout = round_timeout_from_a_healthy_run(tmp_path, monkeypatch)
    freeze(monkeypatch, 4, 2 * round_timeout)
    data_path, run_dir, errors = two_host_run(tmp_path / "frozen", monkeypatch, trainer_factory=FreezingTrainer,
                                              extra=["--round_timeout", str(round_timeout)])
    assert not errors
    records = records_of(run_dir)
    hit = records[1]
    # the combiner answered without it at its deadline; the server gave up on it at its own
    assert hit["missing_sums"]["4"].startswith("its partial sum did not arrive within")
    assert hit["lost_workers"] == {"4": f"no reply within --round_timeout={round_timeout} s"}
    assert hit["failures"] == {str(c): f"its worker process 4 failed: no reply within --round_timeout={round_timeout} s"
                               for c in ASSIGNED[4]}
    assert all("failures" not in r for r in records[2:])
    # the sum it sent the server on waking was not counted
    assert same_model(final_model(run_dir), reference(data_path, left_out={1: ASSIGNED[4]}))


# The combine window is COMBINE_SHARE (80%) of the timeout; the peer goes to the server in its
# last tenth (from 72%). Frozen for 75%, its reply mostly reaches the server before the
# combiner's (at 80%); for 85%, after it. Either way, well before the server's deadline.
@pytest.mark.parametrize("share", [0.75, 0.85])
def test_a_peer_too_late_for_its_combiner_but_not_for_the_server_sends_its_sum_itself_and_loses_no_client(
        tmp_path, monkeypatch, share):
    round_timeout = round_timeout_from_a_healthy_run(tmp_path, monkeypatch)
    freeze(monkeypatch, 4, share * round_timeout)
    data_path, run_dir, errors = two_host_run(tmp_path / "late", monkeypatch, trainer_factory=FreezingTrainer,
                                              extra=["--round_timeout", str(round_timeout)])
    assert not errors
    records = records_of(run_dir)
    hit = records[1]
    assert hit["combined_sums"] == {"1": [2], "3": [4]}
    # the combiner stopped waiting at its deadline, or sooner, told that the sum went to the server
    why = hit["missing_sums"]["4"]
    assert why.startswith("its partial sum did not arrive within") or why == "it sent its partial sum to the server", why
    assert hit["direct_sums"] == [4]
    assert all(key not in record for record in records for key in ("failures", "lost_workers"))
    assert all("direct_sums" not in r for r in records[:1] + records[2:])
    # every client counted once: the model is the flat mean's
    assert same_model(final_model(run_dir), reference(data_path))


def test_a_frozen_combiner_fails_the_clients_it_carried_at_the_server_s_deadline_and_its_late_sum_is_ignored(
        tmp_path, monkeypatch):
    round_timeout = round_timeout_from_a_healthy_run(tmp_path, monkeypatch)
    freeze(monkeypatch, 3, 1.5 * round_timeout)  # past the server's deadline: its peer's sum waits in its inbox
    data_path, run_dir, errors = two_host_run(tmp_path / "frozen", monkeypatch, trainer_factory=FreezingTrainer,
                                              extra=["--round_timeout", str(round_timeout)])
    assert not errors
    hit = records_of(run_dir)[1]
    assert hit["lost_workers"] == {"3": f"no reply within --round_timeout={round_timeout} s"}
    assert set(hit["failures"]) == {str(c) for c in ASSIGNED[3] + ASSIGNED[4]}
    assert all("4" not in r.get("lost_workers", {}) for r in records_of(run_dir))  # the peer did its part
    # the combined sum it sent on waking, with worker 4's clients in it, was not counted
    assert same_model(final_model(run_dir), reference(data_path, left_out={1: ASSIGNED[3] + ASSIGNED[4]}))


def test_a_peer_sum_that_comes_before_the_combiner_s_own_train_message_is_kept(tmp_path, monkeypatch):
    # Messages of two senders may cross: hold the server's round-1 message to worker 3
    # until worker 4's sum for that round has reached worker 3.
    send = InProcessTransport.send
    held = []

    def crossing_send(self, message, timeout=None):
        round_idx = message.params.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX)
        if (message.msg_type, message.receiver_id, round_idx) == (MyMessage.MSG_TYPE_S2C_TRAIN_CLIENTS, 3, 1):
            held.append((self, message))
            return
        send(self, message, timeout)
        if (message.msg_type, message.sender_id, round_idx) == (MyMessage.MSG_TYPE_W2W_PARTIAL_SUM, 4, 1):
            send(*held.pop())

    monkeypatch.setattr(InProcessTransport, "send", crossing_send)
    data_path, run_dir, errors = two_host_run(tmp_path, monkeypatch)
    assert not errors and not held
    assert all("failures" not in r and "missing_sums" not in r for r in records_of(run_dir))
    assert same_model(final_model(run_dir), reference(data_path))


def test_a_combined_sum_naming_a_client_it_does_not_carry_is_rejected_whole(tmp_path, monkeypatch):
    add_sum = PartialSum.add_sum

    def lying_add_sum(self, clients, tensors):  # the combiner of host b also claims one of worker 1's clients
        add_sum(self, clients, tensors)
        if set(clients) == set(ASSIGNED[4]):
            self.clients.append(ASSIGNED[1][0])

    monkeypatch.setattr(PartialSum, "add_sum", lying_add_sum)
    data_path, run_dir, errors = two_host_run(tmp_path, monkeypatch, rounds=2)
    assert not errors
    carried = sorted(ASSIGNED[3] + ASSIGNED[4])
    for record in records_of(run_dir):
        assert set(record["rejected_updates"]) == set(map(str, carried))
        assert all(f"not all assigned to workers [3, 4]: {carried}" in reason for reason in record["rejected_updates"].values())
    # host a's sum counted (worker 1's claimed client too, once: in its own worker's sum)
    assert same_model(final_model(run_dir), reference(data_path, rounds=2, left_out={r: carried for r in range(2)}))
