"""Each algorithm's server step against its paper's update rule, computed here in plain
float64 arithmetic on fixed updates (not through the framework's code)."""
import json
import math
import os
import shutil
import subprocess
import sys

import dp_accounting
import pytest
import torch

from conftest import REPO_ROOT
from fedml_core.aggregation import ClientUpdate, FederationInfo
from fedml_core.aggregation.dp_fedavg import DPFedAvg
from fedml_core.aggregation.fedadagrad import FedAdagrad
from fedml_core.aggregation.fedadam import FedAdam
from fedml_core.aggregation.fedavgm import FedAvgM
from fedml_core.aggregation.fednova import FedNova, momentum_a_norm
from fedml_core.aggregation.fedyogi import FedYogi
from fedml_core.aggregation.krum import Krum, MultiKrum
from fedml_core.aggregation.median import FedMedian
from fedml_core.aggregation.norm_clipping import NormClipping
from fedml_core.aggregation.scaffold import SCAFFOLD
from fedml_core.aggregation.trimmed_mean import FedTrimmedAvg
from fedml_core.distributed.communication.packed_tensors import PackedTensors

TRAINABLE = ["w", "b"]
FEDERATION = FederationInfo(num_clients=6, clients_per_round=4, seed=3)


def global_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(700_000, generator=g),  # more than one aggregation block
        "bn.running_mean": torch.randn(4, generator=g),  # a float buffer: takes the mean
        "b": torch.randn(5, generator=g),
        "bn.num_batches_tracked": torch.tensor(10),
    }


def client_states(x, round_idx, count=4, spread=0.1):
    states = []
    for client in range(count):
        g = torch.Generator().manual_seed(100 * round_idx + client)
        states.append({k: v + spread * (client + 1) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + client + 1
                       for k, v in x.items()})
    return states


SAMPLES = [10, 20, 30, 40]


def run_round(strategy, x, states, samples=SAMPLES, round_idx=0, metadata=None, tensors=None, clients=None):
    clients = clients or list(range(1, len(states) + 1))
    packed_x = PackedTensors.from_tensors(x)
    instructions = strategy.configure_round(round_idx, clients, packed_x)
    for i, (client, state, n) in enumerate(zip(clients, states, samples)):
        extra = PackedTensors.from_tensors(tensors[i]) if tensors else None
        strategy.add(ClientUpdate(client, PackedTensors.from_tensors(state), n, extra, metadata[i] if metadata else {}))
    return strategy.aggregate(packed_x, round_idx).copy_tensors(), instructions


def ready(strategy, x):
    strategy.setup(PackedTensors.from_tensors(x), TRAINABLE, FEDERATION)
    return strategy


def mean64(states, weights, key):
    total = sum(weights)
    return sum(s[key].double() * w for s, w in zip(states, weights)) / total


def assert_close(got, want, key, rtol=1e-5, atol=1e-6):
    assert torch.allclose(got.double(), want, rtol=rtol, atol=atol), f"{key}: max error {(got.double() - want).abs().max()}"


def assert_buffers_are_the_mean(new, states, weights):
    assert_close(new["bn.running_mean"], mean64(states, weights, "bn.running_mean"), "bn.running_mean")
    assert new["bn.num_batches_tracked"].item() == round(float(mean64(states, weights, "bn.num_batches_tracked")))


def test_fedavgm_is_server_momentum_on_the_fedavg_pseudo_gradient():
    x = global_model()
    strategy = ready(FedAvgM(server_lr=0.7, server_momentum=0.9), x)
    momentum = {k: torch.zeros_like(x[k], dtype=torch.float64) for k in TRAINABLE}
    for r in range(3):
        states = client_states(x, r)
        new, _ = run_round(strategy, x, states, round_idx=r)
        for k in TRAINABLE:
            momentum[k] = 0.9 * momentum[k] + (mean64(states, SAMPLES, k) - x[k].double())
            assert_close(new[k], x[k].double() + 0.7 * momentum[k], k)
        assert_buffers_are_the_mean(new, states, SAMPLES)
        x = new


def reddi(variant, beta1, beta2, tau, eta):
    """Reddi et al. 2021, Algorithm 2, in float64: returns step(x, delta, state) -> x'."""
    def step(x, delta, state):
        m, v = state.get("m", torch.zeros_like(delta)), state.get("v", torch.full_like(delta, tau ** 2))
        m = beta1 * m + (1 - beta1) * delta
        if variant == "adagrad":
            v = v + delta ** 2
        elif variant == "adam":
            v = beta2 * v + (1 - beta2) * delta ** 2
        else:
            v = v - (1 - beta2) * delta ** 2 * torch.sign(v - delta ** 2)
        state.update(m=m, v=v)
        return x + eta * m / (torch.sqrt(v) + tau)
    return step


@pytest.mark.parametrize("strategy, variant", [
    (FedAdagrad(server_lr=0.05, beta1=0.8, tau=1e-2), "adagrad"),
    (FedAdam(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2), "adam"),
    (FedYogi(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2), "yogi"),
], ids=["FedAdagrad", "FedAdam", "FedYogi"])
def test_adaptive_server_optimizers_follow_reddi_et_al_algorithm_2(strategy, variant):
    x = global_model()
    ready(strategy, x)
    step = reddi(variant, 0.8, 0.95, 1e-2, 0.05)
    states_by_key = {k: {} for k in TRAINABLE}
    for r in range(3):
        states = client_states(x, r)
        new, _ = run_round(strategy, x, states, round_idx=r)
        for k in TRAINABLE:
            want = step(x[k].double(), mean64(states, SAMPLES, k) - x[k].double(), states_by_key[k])
            assert_close(new[k], want, k, rtol=1e-4, atol=1e-5)
        assert_buffers_are_the_mean(new, states, SAMPLES)
        x = new


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("variant", ["adagrad", "adam", "yogi"])
def test_adaptive_server_optimizers_follow_the_rule_in_every_float_dtype(variant, dtype, rtol):
    # A float64 model steps in float64; a 16-bit one in float32, rounded at the end.
    make = {"adagrad": FedAdagrad(server_lr=0.05, beta1=0.8, tau=1e-2),
            "adam": FedAdam(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2),
            "yogi": FedYogi(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)}
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in global_model().items()}
    strategy = ready(make[variant], x)
    step = reddi(variant, 0.8, 0.95, 1e-2, 0.05)
    states_by_key = {k: {} for k in TRAINABLE}
    for r in range(2):
        states = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()} for s in client_states(x, r)]
        new, _ = run_round(strategy, x, states, round_idx=r)
        for k in TRAINABLE:
            assert new[k].dtype == dtype
            want = step(x[k].double(), mean64(states, SAMPLES, k) - x[k].double(), states_by_key[k])
            assert_close(new[k], want, k, rtol=rtol, atol=rtol)
        x = new


READ_ONLY_FEDADAM = """
import json
import torch
from fedml_core.aggregation import ClientUpdate
from fedml_core.aggregation.fedadam import FedAdam
from fedml_core.aggregation.strategy import FederationInfo
from fedml_core.distributed.communication.packed_tensors import PackedTensors
x = PackedTensors.from_tensors({"w": torch.zeros(3)})
strategy = FedAdam(server_lr=0.5, tau=1e-3)
strategy.setup(x, ["w"], FederationInfo(1, 1))
strategy.configure_round(0, [1], x)
strategy.add(ClientUpdate(1, PackedTensors.from_tensors({"w": torch.ones(3)}), 1))
import fedml_core
from fedml_core.aggregation import fedopt_kernel
print(json.dumps({"imported_from": fedml_core.__file__, "cache": type(fedopt_kernel._fedopt_loop._cache).__name__,
                  "w": strategy.aggregate(x, 0).tensors()["w"].tolist()}))
"""


def test_fedadam_runs_from_a_read_only_install_without_a_writable_home(tmp_path):
    # numba finds no place for its disk cache there: the step is compiled in the process.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a private read-only bind mount)")
    install = tmp_path / "install"
    shutil.copytree(os.path.join(REPO_ROOT, "fedml_core"), install / "fedml_core", ignore=shutil.ignore_patterns("__pycache__"))
    script = (f"mount --bind {install} {install} && mount -o remount,bind,ro {install} && "
              f"{sys.executable} -c '{READ_ONLY_FEDADAM}'")
    env = {**os.environ, "HOME": "/proc/no-home", "PYTHONPATH": str(install), "PYTHONDONTWRITEBYTECODE": "1"}
    for name in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME"):
        env.pop(name, None)
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["imported_from"].startswith(str(install))
    assert out["cache"] == "NullCache"  # the fallback: compiled without a disk cache
    # delta = 1: m = (1 - beta1) * delta, v = beta2 * tau^2 + (1 - beta2) * delta^2
    step = 0.5 * 0.1 / (math.sqrt(0.99 * 1e-6 + 0.01) + 1e-3)
    assert out["w"] == pytest.approx([step] * 3, rel=1e-5)


def test_a_fedopt_subclass_with_a_rule_the_compiled_step_does_not_know_is_refused_at_setup():
    class FedUnknown(FedAdam):
        rule = 7

    with pytest.raises(ValueError, match="FedUnknown.rule must be ADAGRAD, ADAM or YOGI"):
        ready(FedUnknown(), global_model())


def test_a_restored_fedadam_continues_bit_exactly():
    x = global_model()
    first = ready(FedAdam(), x)
    for r in range(2):
        x, _ = run_round(first, x, client_states(x, r), round_idx=r)
    state = first.state_dict()
    resumed = ready(FedAdam(), x)
    resumed.load_state_dict(state)
    states = client_states(x, 2)
    a, _ = run_round(first, x, states, round_idx=2)
    b, _ = run_round(resumed, x, states, round_idx=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w"], run_round(ready(FedAdam(), x), x, states, round_idx=2)[0]["w"])  # the state matters


def test_scaffold_updates_the_model_and_the_control_variates_as_in_algorithm_1():
    x = global_model()
    strategy = ready(SCAFFOLD(server_lr=0.5), x)
    c = {k: torch.zeros_like(x[k], dtype=torch.float64) for k in TRAINABLE}
    c_i = {}  # client: {k: tensor}
    uniform = [1, 1, 1]
    for r, clients in enumerate([[1, 2, 3], [2, 4, 5], [1, 2, 6]]):
        states = client_states(x, r, count=3)
        returned = [{k: torch.randn(x[k].shape, generator=torch.Generator().manual_seed(r * 10 + i)) for k in TRAINABLE}
                    for i in range(3)]
        new, instructions = run_round(strategy, x, states, samples=[5, 50, 500], round_idx=r, clients=clients,
                                      tensors=returned, metadata=[{"local_steps": 3}] * 3)
        for client in clients:  # each client is sent c - c_i
            for k in TRAINABLE:
                own = c_i.get(client, {}).get(k, torch.zeros_like(c[k]))
                assert_close(instructions[client].tensors[k], c[k] - own, k)
        for k in TRAINABLE:  # x + eta_g * uniform mean of (y_i - x)
            assert_close(new[k], x[k].double() + 0.5 * (mean64(states, uniform, k) - x[k].double()), k)
            drift = sum(returned[i][k].double() - c_i.get(client, {}).get(k, torch.zeros_like(c[k])) for i, client in enumerate(clients))
            c[k] = c[k] + drift / FEDERATION.num_clients
        for i, client in enumerate(clients):
            c_i[client] = {k: returned[i][k].double() for k in TRAINABLE}
        assert_buffers_are_the_mean(new, states, uniform)
        x = new
    state = strategy.state_dict()
    assert sorted(int(c) for c in state["client_controls"]["tensors"]) == [1, 2, 3, 4, 5, 6]
    restored = ready(SCAFFOLD(), x)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.control.groups[d], strategy.control.groups[d]) for d in strategy.control.groups)


def test_scaffold_rejects_an_update_without_its_step_count_or_its_control_variate():
    from fedml_core.aggregation import InvalidUpdate

    x = global_model()
    strategy = ready(SCAFFOLD(), x)
    assert [name for name, _, _ in strategy.expected_client_tensors()] == ["w", "b"]
    with pytest.raises(InvalidUpdate, match="local_steps"):
        strategy.check_update(ClientUpdate(1, PackedTensors.from_tensors(x), 1, None, {}))


def test_fednova_normalizes_each_update_by_its_local_work():
    x = global_model()
    strategy = ready(FedNova(), x)
    a = [1.0, 2.0, 5.0, 10.0]
    states = client_states(x, 0)
    new, _ = run_round(strategy, x, states, metadata=[{"a_norm": v, "local_steps": int(v)} for v in a])
    p = [n / sum(SAMPLES) for n in SAMPLES]
    tau_eff = sum(pi * ai for pi, ai in zip(p, a))
    for k in TRAINABLE:
        d = sum(pi * (x[k].double() - s[k].double()) / ai for pi, s, ai in zip(p, states, a))
        assert_close(new[k], x[k].double() - tau_eff * d, k)


def test_fednova_a_norm_with_momentum_is_the_sum_of_each_gradients_total_contribution():
    rho, steps = 0.9, 7
    # Gradient k's total weight in the final displacement: sum_{j=0}^{steps-1-k} rho^j.
    contributions = sum(sum(rho ** j for j in range(steps - k)) for k in range(steps))
    assert momentum_a_norm(steps, rho) == pytest.approx(contributions)
    assert momentum_a_norm(steps, 0.0) == steps


def test_coordinate_median_and_trimmed_mean_ignore_the_extremes():
    x = global_model()
    states = client_states(x, 0, count=5)
    states[4]["w"][:10] = 1e6  # one wild client
    median, _ = run_round(ready(FedMedian(), x), x, states, samples=[1] * 5)
    trimmed, _ = run_round(ready(FedTrimmedAvg(trim_ratio=0.2), x), x, states, samples=[1] * 5)
    stacked = torch.stack([s["w"].double() for s in states])
    assert_close(median["w"], stacked.median(dim=0).values, "w")
    ordered = stacked.sort(dim=0).values
    assert_close(trimmed["w"], ordered[1:4].mean(dim=0), "w")
    assert median["w"][:10].abs().max() < 100
    even, _ = run_round(ready(FedMedian(), x), x, states[:4], samples=[1] * 4)
    ordered = stacked[:4].sort(dim=0).values
    assert_close(even["w"], (ordered[1] + ordered[2]) / 2, "w")


def test_krum_picks_the_update_closest_to_its_neighbours_and_names_the_others():
    x = global_model()
    states = client_states(x, 0, count=6, spread=0.01)
    states[5] = {k: v * 3 if v.is_floating_point() else v for k, v in states[5].items()}  # far from everyone
    strategy = ready(Krum(krum_f=1), x)
    new, _ = run_round(strategy, x, states, samples=[1] * 6)
    flat = [torch.cat([s[k].double().flatten() for k in ("w", "bn.running_mean", "b")]) for s in states]
    scores = []
    for i, v in enumerate(flat):
        d = sorted(float(((v - u) ** 2).sum()) for j, u in enumerate(flat) if j != i)
        scores.append(sum(d[:6 - 1 - 2]))
    best = min(range(6), key=scores.__getitem__)
    assert all(torch.equal(new[k], states[best][k]) for k in new)
    # the others are valid updates: named in the round's metrics, not rejected
    assert sorted(int(c) for c in strategy.round_metrics()["krum_not_chosen"]) == [c for c in range(1, 7) if c != best + 1]
    assert strategy.rejected_updates() == {}
    multi = ready(MultiKrum(krum_f=1, krum_m=3), x)
    new, _ = run_round(multi, x, states, samples=[1] * 6)
    chosen = sorted(range(6), key=scores.__getitem__)[:3]
    assert_close(new["w"], sum(states[i]["w"].double() for i in chosen) / 3, "w")
    assert "6" in multi.round_metrics()["krum_not_chosen"]


def test_krum_needs_more_than_2f_plus_2_updates():
    x = global_model()
    with pytest.raises(ValueError, match=r"krum_f=1 needs more than 4 valid updates, got 4"):
        run_round(ready(Krum(krum_f=1), x), x, client_states(x, 0))


def clipped64(states, x, clip):
    deltas = []
    for s in states:
        delta = {k: s[k].double() - x[k].double() for k in x if x[k].is_floating_point()}
        norm = math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
        deltas.append((delta, min(1.0, clip / norm)))
    return deltas


def test_norm_clipping_scales_long_updates_to_the_clip_norm_and_names_them():
    x = global_model()
    states = client_states(x, 0)
    clip = 150.0  # client 1's update is shorter, the others longer
    strategy = NormClipping(clip_norm=clip)
    ready(strategy, x)
    new, _ = run_round(strategy, x, states)
    p = [n / sum(SAMPLES) for n in SAMPLES]
    deltas = clipped64(states, x, clip)
    assert [s < 1 for _, s in deltas] == [False, True, True, True]
    for k in ("w", "b", "bn.running_mean"):
        assert_close(new[k], x[k].double() + sum(pi * s * d[k] for pi, (d, s) in zip(p, deltas)), k)
    assert sorted(strategy.round_metrics()["clipped_updates"]) == ["2", "3", "4"]


def test_dp_fedavg_clips_averages_over_the_expected_clients_and_adds_calibrated_noise():
    x = global_model()
    states = client_states(x, 0)
    clip, z = 150.0, 0.5
    quiet = ready(DPFedAvg(clip_norm=clip, noise_multiplier=0.0), x)
    new, _ = run_round(quiet, x, states)
    deltas = clipped64(states, x, clip)
    k_expected = FEDERATION.clients_per_round
    for k in ("w", "b", "bn.running_mean"):
        assert_close(new[k], x[k].double() + sum(s * d[k] for d, s in deltas) / k_expected, k)
    assert torch.equal(new["bn.num_batches_tracked"], x["bn.num_batches_tracked"])  # not released
    noisy = ready(DPFedAvg(clip_norm=clip, noise_multiplier=z), x)
    with_noise, _ = run_round(noisy, x, states)
    noise = with_noise["w"].double() - new["w"].double()
    assert noise.std().item() == pytest.approx(z * clip / k_expected, rel=0.01)
    again, _ = run_round(ready(DPFedAvg(clip_norm=clip, noise_multiplier=z), x), x, states)
    assert torch.equal(again["w"], with_noise["w"])  # seeded by (seed, round, position)


def test_dp_fedavg_reports_the_rdp_accountants_epsilon_each_round():
    x = global_model()
    strategy = ready(DPFedAvg(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5), x)
    epsilons = []
    for r in range(3):
        run_round(strategy, x, client_states(x, r), round_idx=r)
        epsilons.append(strategy.round_metrics()["dp"]["epsilon"])
    accountant = dp_accounting.rdp.RdpAccountant(list(range(2, 257)))
    q = FEDERATION.clients_per_round / FEDERATION.num_clients
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), 3))
    assert epsilons[0] < epsilons[1] < epsilons[2] == pytest.approx(accountant.get_epsilon(1e-5))


@pytest.mark.parametrize("make", [FedAvgM, FedAdam, FedYogi, FedMedian, lambda: Krum(krum_f=0), NormClipping])
def test_a_strategy_never_modifies_the_global_model_it_is_given(make):
    x = global_model()
    strategy = ready(make(), x)
    packed = PackedTensors.from_tensors(x)
    before = packed.copy_tensors()
    strategy.configure_round(0, [1, 2, 3, 4], packed)
    for client, state in enumerate(client_states(x, 0), start=1):
        strategy.add(ClientUpdate(client, PackedTensors.from_tensors(state), 5))
    strategy.aggregate(packed, 0)
    assert all(torch.equal(before[k], packed.tensors()[k]) for k in before)


@pytest.mark.parametrize("make", [FedAdam, FedMedian, NormClipping])
def test_an_update_holding_nan_is_left_out_and_named(make):
    x = global_model()
    strategy = ready(make(), x)
    states = client_states(x, 0)
    states[1]["w"][5] = float("nan")
    new, _ = run_round(strategy, x, states)
    assert list(strategy.rejected_updates()) == [2]
    assert torch.isfinite(new["w"]).all()


@pytest.mark.parametrize("make", [FedAvgM, FedAdagrad, FedAdam, FedYogi])
def test_a_round_with_a_nan_update_is_the_round_without_it_bit_for_bit(make):
    # The pass that met the NaN already ran the step on the other blocks: it is redone
    # from the same old model and state, which the step must leave as they were.
    x = global_model()
    with_nan, without = ready(make(), x), ready(make(), x)
    for r in range(2):
        states = client_states(x, r)
        a, _ = run_round(without, x, [states[0]] + states[2:], [SAMPLES[0]] + SAMPLES[2:], round_idx=r, clients=[1, 3, 4])
        states[1]["w"][600_000] = float("nan")  # in the second block: the pass finishes the first
        b, _ = run_round(with_nan, x, states, round_idx=r)
        assert list(with_nan.rejected_updates()) == [2]
        assert all(torch.equal(a[k], b[k]) for k in a)
        x = a
    for name, vectors in without.state_dict()["state"].items():
        assert all(torch.equal(v, with_nan.state_dict()["state"][name][d]) for d, v in vectors.items())
