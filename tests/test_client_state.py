"""The client-state store: per-client tensors on disk, versioned by round, kept for the
checkpoints that name them (fedml_core/aggregation/client_state.py)."""
import os

import pytest
import torch

from fedml_core.aggregation.client_state import ClientStateStore


def files(directory):
    return sorted(name for _, _, names in os.walk(directory) for name in names)


def state(value):
    return {"w": torch.full((3,), float(value)), "n": torch.tensor(int(value))}


def test_a_state_is_read_back_as_written_and_only_version_numbers_stay_in_memory(tmp_path):
    store = ClientStateStore(str(tmp_path))
    assert store.get(7) is None and 7 not in store
    store.put(7, 0, state(1.5))
    got = store.get(7)
    assert torch.equal(got["w"], state(1.5)["w"]) and got["n"].dtype == torch.int64
    assert 7 in store and store.clients() == [7] and store._in_memory == {}
    assert files(tmp_path) == ["7-0.pt"]


def test_a_newer_version_replaces_the_older_one_unless_a_kept_snapshot_names_it(tmp_path):
    store = ClientStateStore(str(tmp_path))
    store.put(1, 0, state(0))
    store.put(1, 1, state(1))
    assert files(tmp_path) == ["1-1.pt"]  # no snapshot names version 0
    first = store.snapshot()
    assert first == {"directory": str(tmp_path), "versions": {"1": 1}}
    store.put(1, 2, state(2))
    store.put(1, 3, state(3))  # 2: named by no snapshot, removed; 1: the last checkpoint's
    assert files(tmp_path) == ["1-1.pt", "1-3.pt"]
    store.snapshot()
    store.put(1, 4, state(4))  # both kept snapshots (versions 1 and 3) are still named
    assert files(tmp_path) == ["1-1.pt", "1-3.pt", "1-4.pt"]
    store.snapshot()  # the snapshot naming version 1 drops out of the last two
    assert files(tmp_path) == ["1-3.pt", "1-4.pt"]


def test_a_resumed_store_reads_the_versions_its_checkpoint_names(tmp_path):
    store = ClientStateStore(str(tmp_path / "run"))
    for client in (1, 2):
        store.put(client, 0, state(client))
    snapshot = store.snapshot()
    store.put(1, 1, state(10))  # after the checkpoint: the crashed run's future
    resumed = ClientStateStore(str(tmp_path / "elsewhere"))
    resumed.restore(snapshot)
    assert resumed.get(1)["w"][0] == 1 and resumed.get(2)["w"][0] == 2
    resumed.put(1, 1, state(11))  # the resumed run rewrites that round
    assert resumed.get(1)["w"][0] == 11


def test_a_snapshot_whose_files_are_gone_is_refused_naming_them(tmp_path):
    store = ClientStateStore(str(tmp_path))
    store.put(3, 5, state(3))
    snapshot = store.snapshot()
    os.remove(tmp_path / "0" / "3-5.pt")
    with pytest.raises(ValueError, match=r"clients \[3\] are missing .*3-5.pt"):
        ClientStateStore(None).restore(snapshot)


def test_without_a_directory_states_stay_in_memory_and_the_snapshot_holds_them():
    store = ClientStateStore(None)
    store.put(2, 0, state(4))
    snapshot = store.snapshot()
    restored = ClientStateStore(None)
    restored.restore(snapshot)
    assert torch.equal(restored.get(2)["w"], state(4)["w"])


def test_a_checkpoint_of_plain_client_tensors_from_before_the_store_is_read(tmp_path):
    store = ClientStateStore(str(tmp_path))
    store.restore({4: state(9), "5": state(8)})
    assert store.clients() == [4, 5] and store.get(5)["w"][0] == 8


def test_a_resumed_run_works_on_links_of_its_own_and_leaves_the_checkpoint_s_files_as_they_were(tmp_path):
    original = ClientStateStore(str(tmp_path / "run"))
    for client in (1, 2):
        original.put(client, 0, state(client))
    snapshot = original.snapshot()  # the checkpoint a user resumes from, maybe more than once
    for attempt in range(2):
        resumed = ClientStateStore(str(tmp_path / f"resumed{attempt}"))
        resumed.restore(snapshot)
        for round_idx in (1, 2, 3):  # three checkpoints later, version 0 is named by none of them
            resumed.put(1, round_idx, state(10 * round_idx + attempt))
            resumed.snapshot()
        assert files(tmp_path / f"resumed{attempt}") == ["1-2.pt", "1-3.pt", "2-0.pt"]
        assert resumed.get(1)["w"][0] == 30 + attempt and resumed.get(2)["w"][0] == 2
        assert files(tmp_path / "run") == ["1-0.pt", "2-0.pt"]  # every time: resumable again
        assert original.get(1)["w"][0] == 1


def test_a_store_without_a_directory_reads_a_checkpoint_s_files_where_they_are_one_when_asked(tmp_path, monkeypatch):
    original = ClientStateStore(str(tmp_path / "run"))
    for client in range(1, 101):
        original.put(client, 2, state(client))
    snapshot = original.snapshot()
    loads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or load(*a, **k))
    restored = ClientStateStore(None)  # e.g. the launcher's pre-flight check of a --resume
    restored.restore(snapshot)
    assert loads == []  # a thousand clients' states are not read into memory to check a checkpoint
    assert restored.get(4)["w"][0] == 4 and len(loads) == 1
    restored.put(4, 3, state(70))
    assert restored.get(4)["w"][0] == 70 and restored.snapshot()["tensors"]["4"]["w"][0] == 70
    assert restored.snapshot()["tensors"]["5"]["w"][0] == 5
    assert files(tmp_path / "run") == sorted(f"{c}-2.pt" for c in range(1, 101))  # nothing written there
    assert original.get(4)["w"][0] == 4
