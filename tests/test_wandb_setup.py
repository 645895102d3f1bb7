"""wandb's start in the background (fedml_api/utils/wandb_setup.py)."""
import logging
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
