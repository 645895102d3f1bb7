"""Picking an algorithm from the command line: --federated_optimizer and its options."""
import argparse

import pytest

from fedml_api.distributed.fedavg.args import add_federation_args, check_federation_args
from fedml_core.aggregation.registry import REGISTRY, make_strategy

BASE = ["--client_num_in_total", "6", "--client_num_per_round", "3", "--comm_round", "2", "--data_path", "d"]


def parse(*options):
    return add_federation_args(argparse.ArgumentParser()).parse_args([*BASE, *options])


def test_help_lists_the_algorithms_and_every_option():
    text = add_federation_args(argparse.ArgumentParser()).format_help()
    for option in ("--federated_optimizer", "--mu", "--server_lr", "--server_momentum", "--beta1", "--beta2", "--tau",
                   "--trim_ratio", "--krum_f", "--clip_norm", "--noise_multiplier", "--attack", "--attackers"):
        assert option in text, option
    assert all(name in text for name in REGISTRY)


def test_no_option_is_fedavg_and_a_name_picks_its_class_with_the_options_given():
    assert type(make_strategy(parse())).__name__ == "FedAvg"
    adam = make_strategy(parse("--federated_optimizer", "fedadam", "--server_lr", "0.03", "--beta2", "0.9"))
    assert (type(adam).__name__, adam.server_lr, adam.beta1, adam.beta2) == ("FedAdam", 0.03, 0.9, 0.9)
    assert make_strategy(parse("--federated_optimizer", "FedProx", "--mu", "0.5")).mu == 0.5
    dp = make_strategy(parse("--federated_optimizer", "DPFedAvg", "--noise_multiplier", "2", "--dp_delta", "1e-6"))
    assert (dp.noise_multiplier, dp.delta) == (2.0, 1e-6)


@pytest.mark.parametrize("options, message", [
    (["--federated_optimizer", "FedSomething"], "unknown --federated_optimizer 'FedSomething'; choose one of FedAvg, FedAvgM"),
    (["--federated_optimizer", "FedAvgM", "--server_momentum", "1.5"], "0 <= server_momentum < 1"),
    (["--attack", "sign_flip"], "--attack and --attackers go together"),
    (["--attack", "scale", "--attackers", "2,7"], "names a client above CLIENT_NUM=6"),
])
def test_bad_choices_are_refused_before_anything_runs(options, message):
    with pytest.raises(ValueError, match=message):
        check_federation_args(parse(*options))


def test_attackers_are_a_list_of_client_ids():
    assert parse("--attack", "gaussian", "--attackers", "2,5").attackers == [2, 5]
    with pytest.raises(SystemExit):
        parse("--attackers", "two")
