"""FedAvg is the sample-weighted mean of the whole state: parameters and buffers."""
import pytest
import torch

from fedml_core.aggregation import ClientUpdate, FedAvg
from fedml_core.distributed.communication.packed_tensors import PackedTensors
from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(300_000, generator=g),  # spans more than one aggregation block
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(10 * seed, dtype=torch.int64),
        "half": torch.randn(6, generator=g).half(),
        "mask": torch.tensor([seed % 2 == 0, True, False]),
    }


def _fedavg(states, samples, max_buffered=None) -> dict:
    strategy = FedAvg(max_buffered)
    for cid, (state, n) in enumerate(zip(states, samples), start=1):
        strategy.add(ClientUpdate(cid, PackedTensors.from_tensors(state), n))
    return strategy.aggregate(None).tensors()


@pytest.mark.parametrize("max_buffered", [None, 1, 2])
def test_mean_is_weighted_by_sample_numbers_over_parameters_and_buffers(max_buffered):
    states, samples = [_state(s) for s in (1, 2, 3)], [10, 30, 60]
    mean = _fedavg(states, samples, max_buffered)
    for key in ("weight", "bn.running_mean"):
        expected = sum(s[key].double() * n for s, n in zip(states, samples)) / 100
        assert torch.allclose(mean[key].double(), expected, atol=1e-6), key
    # integer counter: the weighted mean (10*.1 + 20*.3 + 30*.6 = 25) rounded, dtype kept
    assert mean["bn.num_batches_tracked"].dtype == torch.int64 and mean["bn.num_batches_tracked"].item() == 25
    expected_half = sum(s["half"].float() * n for s, n in zip(states, samples)) / 100
    assert mean["half"].dtype == torch.float16 and torch.allclose(mean["half"].float(), expected_half, atol=1e-3)
    # boolean buffer: weighted majority (seed 2 alone is True in slot 0, with weight 0.3)
    assert mean["mask"].tolist() == [False, True, False]


def test_weights_matter():
    states = [_state(1), _state(2)]
    assert not torch.allclose(_fedavg(states, [1, 99])["weight"], _fedavg(states, [50, 50])["weight"])


def test_update_with_other_shape_is_rejected_with_the_tensor_named():
    strategy = FedAvg()
    strategy.add(ClientUpdate(1, PackedTensors.from_tensors({"w": torch.zeros(3)}), 5))
    with pytest.raises(ValueError, match="'w' is torch.float32 \\[4\\], expected torch.float32 \\[3\\]"):
        strategy.add(ClientUpdate(2, PackedTensors.from_tensors({"w": torch.zeros(4)}), 5))


def test_non_positive_sample_number_is_rejected():
    with pytest.raises(ValueError, match="client 3 reported 0 samples"):
        FedAvg().add(ClientUpdate(3, PackedTensors.from_tensors({"w": torch.zeros(3)}), 0))


def _poisoned(seed: int, value: float, index: int = 123_456) -> dict:
    state = _state(seed)
    state["weight"][index] = value
    return state


@pytest.mark.parametrize("max_buffered", [None, 1, 2])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_an_update_holding_nan_or_inf_is_left_out_and_named(max_buffered, bad_value):
    good = [_state(1), _state(3)]
    strategy = FedAvg(max_buffered)
    for cid, (state, n) in enumerate(zip([good[0], _poisoned(2, bad_value), good[1]], [10, 30, 60]), start=1):
        strategy.add(ClientUpdate(cid, PackedTensors.from_tensors(state), n))
    mean = strategy.aggregate(None).tensors()
    assert strategy.rejected_updates() == {2: "tensor 'weight' holds NaN or Inf values"}
    # exactly the mean of the other two, as if client 2 had never sent anything
    expected = _fedavg(good, [10, 60], max_buffered)
    assert all(torch.equal(mean[k], expected[k]) for k in expected)


def test_every_update_rejected_means_no_aggregate():
    strategy = FedAvg()
    strategy.add(ClientUpdate(1, PackedTensors.from_tensors(_poisoned(1, float("nan"))), 5))
    with pytest.raises(ValueError, match=r"no valid update to average; rejected: \{1: \"tensor 'weight' holds NaN"):
        strategy.aggregate(None)


@pytest.mark.parametrize("max_buffered", [None, 1])
def test_huge_but_finite_updates_are_averaged_without_overflow(max_buffered):
    strategy = FedAvg(max_buffered)
    for cid in (1, 2, 3):  # finite, but any sum of two overflows float32
        strategy.add(ClientUpdate(cid, PackedTensors.from_tensors({"w": torch.full((10,), 3e38)}), 1))
    # the accumulator holds a running mean, never a sum
    assert torch.allclose(strategy.aggregate(None).tensors()["w"], torch.full((10,), 3e38), rtol=1e-6)
    assert strategy.rejected_updates() == {}


def test_result_aggregator_weights_metrics_by_sample_number():
    combined = WeightedMeanResultAggregator().aggregate_result({
        0: {"result": {"accuracy": 1.0, "loss": 0.0}, "sample_number": 1},
        1: {"result": {"accuracy": 0.5, "loss": 2.0}, "sample_number": 3},
    })
    assert combined == {"accuracy": 0.625, "loss": 1.5, "sample_number": 4}
