"""Per-process setup: freed memory is reused, not faulted in afresh on every batch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate and free a 4 MiB tensor (a batch's activations) 128 times; print the minor
# page faults the last 64 took. The first 64 warm the heap up: until the small blocks
# torch and Python allocate between two batches have free blocks of their own size, they
# are cut from the freed 4 MiB block, and the next batch's block comes from fresh memory
# (up to 16 times in a row, seen in CI; never past the 16th). A training run allocates
# thousands of batches, so its steady state is what the test measures.
PROGRAM = textwrap.dedent("""
    import resource, sys, torch
    from fedml_api.utils.process_setup import keep_freed_memory_for_reuse
    applied = keep_freed_memory_for_reuse() if sys.argv[1] == "tuned" else None
    for _ in range(64):
        torch.empty(1 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(64):
        torch.empty(1 << 20).fill_(1.0)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode: str, **env: str) -> tuple:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    environment.update({"PYTHONPATH": ROOT, "THP_MEM_ALLOC_ENABLE": "1", **env})  # THP: as the launcher runs ranks
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=environment, capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied, int(count)


def test_a_freed_batch_buffer_is_reused_without_new_page_faults():
    applied, tuned = faults("tuned")
    _, plain = faults("plain")
    assert applied == "True"
    # Untuned, glibc maps each 4 MiB block afresh: about 1,000 faults (4 KiB pages) per
    # allocation, or one per 2 MiB huge page; tuned, the block is reused.
    assert plain >= 64, f"the untuned allocator faulted only {plain} times: this test no longer shows the difference"
    assert tuned < plain / 10, f"{tuned} page faults for 64 reused allocations (untuned: {plain})"


def test_the_user_s_own_malloc_settings_are_left_alone():
    # glibc's default mmap threshold, set by the user: the 4 MiB blocks stay mapped afresh
    applied, tuned = faults("tuned", MALLOC_MMAP_THRESHOLD_="131072")
    _, plain = faults("plain", MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "True"  # the trim threshold, which the user did not set
    assert tuned > plain / 2, f"{tuned} page faults: the user's mmap threshold was overridden (untuned: {plain})"
    for user_settings in ({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"},
                          {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=0"}):
        applied, _ = faults("tuned", **user_settings)
        assert applied == "False", user_settings
