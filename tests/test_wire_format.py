"""Tensors cross the wire as raw buffers, bit-exactly, whatever their dtype."""
import json
from pathlib import Path

import pytest
import torch

from fedml_core.distributed.communication.inprocess_transport import InProcessHub
from fedml_core.distributed.communication.message import Message
from fedml_core.distributed.communication.packed_tensors import BufferPool, PackedTensors, pack_module, plan_layout

PROGRAMS = Path(__file__).parent / "programs"


def _mixed_state():
    import sys

    sys.path.insert(0, str(PROGRAMS))
    from wire_roundtrip import mixed_state

    return mixed_state()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so NaN == NaN and -0.0 != 0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def assert_bit_exact(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(_bits(got[key]), _bits(value)), key


def test_layout_packs_each_dtype_tightly_in_order():
    specs, sizes = plan_layout([("a", torch.float32, (2, 3)), ("n", torch.int64, ()), ("b", torch.float32, (4,))])
    assert [(s.name, s.offset) for s in specs] == [("a", 0), ("n", 0), ("b", 6)]
    assert sizes == {torch.float32: 10, torch.int64: 1}


def test_packed_tensors_are_views_into_one_buffer_per_dtype():
    packed = PackedTensors.from_tensors({"a": torch.ones(2, 3), "n": torch.tensor(5), "b": torch.zeros(4)})
    assert packed.groups[torch.float32].numel() == 10
    packed.groups[torch.float32].fill_(7)
    assert torch.equal(packed.tensors()["b"], torch.full((4,), 7.0))


def test_buffer_pool_reuses_a_buffer_only_once_nothing_views_it():
    pool = BufferPool()
    first = pool.take(1024)
    view = first[:16].view(torch.float32)
    assert pool.take(1024).data_ptr() != first.data_ptr()  # still viewed: not reused
    del view
    assert pool.take(1024).data_ptr() == first.data_ptr()


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))


def test_a_packed_module_keeps_its_values_and_trains_in_its_packed_memory():
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # made before packing
    packed = pack_module(model)
    assert_bit_exact(model.state_dict(), before)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    # the step changed the packed buffers themselves, BatchNorm statistics included
    assert_bit_exact(packed.tensors(), model.state_dict())
    assert not torch.equal(packed.tensors()["3.weight"], before["3.weight"])
    assert not torch.equal(packed.tensors()["1.running_mean"], before["1.running_mean"])


def test_a_packed_modules_state_dict_is_recognised_as_its_packed_buffers():
    model = _small_model()
    packed = pack_module(model)
    found = PackedTensors.from_views(model.state_dict())
    assert found is not None and found.layout_key() == packed.layout_key()
    assert {d: g.data_ptr() for d, g in found.groups.items()} == {d: g.data_ptr() for d, g in packed.groups.items()}
    # separate tensors, or views out of order, are not one packed buffer
    assert PackedTensors.from_views(_small_model().state_dict()) is None
    assert PackedTensors.from_views(dict(reversed(list(model.state_dict().items())))) is None


def test_modules_with_tied_weights_are_left_unpacked():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight
    assert pack_module(model) is None
    assert model[1].weight is model[0].weight


def test_inprocess_transport_receives_into_the_target_of_a_matching_layout():
    hub = InProcessHub(2)
    server, client = hub.transport(0), hub.transport(1)
    model = _small_model()
    target = pack_module(model)
    client.receive_into(target)
    sent = {k: torch.full_like(v, 3) for k, v in model.state_dict().items()}
    server.send(Message(1, 0, 1, tensors=sent))
    server.send(Message(2, 0, 1, tensors={"other": torch.ones(2)}))
    arrived = client.receive(timeout=5)
    assert arrived.packed is target
    assert_bit_exact(model.state_dict(), sent)  # the model holds it without a load
    assert client.receive(timeout=5).packed is not target  # another layout: fresh memory


def test_inprocess_transport_copies_every_dtype_bit_exactly_and_keeps_order():
    hub = InProcessHub(2)
    server, client = hub.transport(0), hub.transport(1)
    state = _mixed_state()
    server.send(Message(5, 0, 1, {"round_idx": 3}, state))
    server.send(Message(6, 0, 1))
    got = client.receive(timeout=1)
    assert (got.msg_type, got.sender_id, got.get("round_idx")) == (5, 0, 3)
    assert_bit_exact(got.tensors, state)
    state["conv.weight"].add_(1)  # the receiver owns a copy
    assert not torch.equal(got.tensors["conv.weight"], state["conv.weight"])
    assert client.receive(timeout=1).msg_type == 6
    assert client.receive(timeout=0.01) is None


def test_inprocess_transport_delivers_between_any_two_ranks():
    # Workers send each other partial sums (per-host combining), not only the server.
    hub = InProcessHub(4)
    hub.transport(3).send(Message(20, 3, 2, {"round_idx": 1}, {"sum:float32": torch.arange(3.0)}))
    got = hub.transport(2).receive(timeout=1)
    assert (got.sender_id, got.receiver_id) == (3, 2) and torch.equal(got.tensors["sum:float32"], torch.arange(3.0))


def test_a_failed_rank_is_reported_once_to_every_other_rank_and_cannot_be_sent_to():
    from fedml_core.distributed.communication.transport import PeerFailure

    hub = InProcessHub(3)
    server, worker, dying = hub.transport(0), hub.transport(1), hub.transport(2)
    dying.send(Message(7, 2, 1))  # sent before it died: still delivered
    hub.fail(2)
    assert worker.receive(timeout=1).msg_type == 7
    for transport in (server, worker):
        with pytest.raises(PeerFailure) as failure:
            transport.receive(timeout=1)
        assert failure.value.ranks == {2}
        assert transport.receive(timeout=0.01) is None  # reported once
    with pytest.raises(PeerFailure):
        worker.send(Message(8, 1, 2))


def test_params_that_are_not_plain_json_are_refused_by_the_sender():
    hub = InProcessHub(2)
    with pytest.raises(TypeError, match="message params must be plain JSON data"):
        hub.transport(0).send(Message(1, 0, 1, {"model": torch.nn.Linear(1, 1)}))


def test_a_peer_sending_something_that_is_not_a_header_is_treated_as_failed(run_mpi, tmp_path):
    result = run_mpi(3, str(PROGRAMS / "malformed_header.py"), str(tmp_path / "out.txt"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.txt").read_text().splitlines() == ["failed [1]", "message 7 from 2"]


def test_mpi_transport_moves_a_mixed_dtype_state_bit_exactly(run_mpi, tmp_path):
    result = run_mpi(2, str(PROGRAMS / "wire_roundtrip.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr
    echo = torch.load(tmp_path / "echo.pt")
    expected = _mixed_state()
    assert echo["params"] == {"note": "hello"}
    assert_bit_exact(echo["packed"], expected)   # sent back as one buffer per dtype
    assert_bit_exact(echo["separate"], expected)  # sent back tensor by tensor
    # received straight into the buffer the client asked for, sent back from its views
    assert echo["target_params"] == {"landed_in_target": True}
    assert_bit_exact(echo["views"], expected)


@pytest.mark.parametrize("mode", ["accept", "refuse"])
def test_a_receiver_on_the_same_host_reads_lent_tensors_in_place_bit_exactly_once_it_accepted(run_mpi, tmp_path, mode):
    result = run_mpi(2, str(PROGRAMS / "lending.py"), str(tmp_path), mode)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / f"lending-{mode}.json").read_text())
    assert report["exact"] == [True, True, True]  # every dtype, bit for bit, after every change
    # The first message carries the offer (and a copy); once accepted, no more copies.
    assert report["read_in_place"] == ([False, True, True] if mode == "accept" else [False, False, False])
    # Lent tensors outside the offered memory: the sender breaks the protocol.
    assert report["out_of_bounds"] == "failed [1]"
