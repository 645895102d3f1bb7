"""wandb's start in the background (fedml_api/utils/wandb_setup.py)."""
import logging
import os
import subprocess
import sys
from argparse import Namespace

from fedml_api.utils.wandb_setup import start_wandb, wait_for_wandb


def test_without_a_start_there_is_no_run_to_wait_for():
    assert wait_for_wandb() is None


def test_a_disabled_wandb_starts_nothing():
    start_wandb(Namespace(wandb_mode="disabled"), project="fedml")
    assert wait_for_wandb() is None


def test_a_start_that_fails_is_logged_once_and_the_run_goes_on_without_wandb(caplog, tmp_path):
    start_wandb(Namespace(wandb_mode="no such mode", run_dir=str(tmp_path)), project="fedml")  # wandb.init refuses the mode
    with caplog.at_level(logging.ERROR):
        assert wait_for_wandb() is None
        assert wait_for_wandb() is None
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("wandb could not start (") and "metrics.jsonl has every round" in message


# A start that never finishes (wandb's server unreachable), then the process ends on an error.
HANGING_START = """
import sys, time
from argparse import Namespace
from fedml_api.utils import wandb_setup
wandb_setup._prepare_wandb = lambda *args: (lambda: time.sleep(600))
wandb_setup.start_wandb(Namespace(), project="fedml")
sys.exit(3)
"""


def test_a_run_that_fails_before_its_first_record_does_not_wait_at_exit_for_wandb_s_start():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # (A start waited for would take 600 s: subprocess.run's timeout fails the test first.)
    result = subprocess.run([sys.executable, "-c", HANGING_START], env={**os.environ, "PYTHONPATH": root},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
