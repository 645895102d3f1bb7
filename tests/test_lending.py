"""Lending memory to a peer on the same host: what may be mapped, and what is refused."""
import os

import pytest
import torch

from fedml_core.distributed.communication.lending import CannotBorrow, LendableSegment, borrow, host_identity


def test_a_borrowed_segment_is_the_lenders_memory_not_a_copy():
    segment = LendableSegment(3 * 4096 + 5)
    borrowed = borrow(segment.offer(0))
    segment.memory[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert borrowed[:4].tolist() == [1, 2, 3, 4]
    assert borrowed.numel() == segment.nbytes


def test_a_lendable_segment_cannot_be_resized_so_a_borrower_never_faults():
    segment = LendableSegment(4096)
    with pytest.raises(PermissionError):
        os.ftruncate(segment.fd, 0)


@pytest.mark.parametrize("change, reason", [
    ({"boot_id": "another-kernel"}, "another host"),
    ({"pid_namespace": [0, 1]}, "another host"),
    ({"inode": 1}, "not the memory it offered"),
    ({"nbytes": 8192}, "not the memory it offered"),
    ({"fd": 10**6}, "cannot open"),
])
def test_an_offer_that_is_not_what_it_claims_is_refused(change, reason):
    offer = {**LendableSegment(4096).offer(0), **change}
    with pytest.raises(CannotBorrow, match=reason):
        borrow(offer)


def test_unsealed_memory_is_refused_since_its_owner_could_shrink_it_under_the_borrower():
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        offer = {"segment": 0, "pid": os.getpid(), "fd": fd, "inode": os.fstat(fd).st_ino, "nbytes": 4096, **host_identity()}
        with pytest.raises(CannotBorrow, match="not sealed"):
            borrow(offer)
    finally:
        os.close(fd)


def test_a_regular_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    try:
        offer = {"segment": 0, "pid": os.getpid(), "fd": fd, "inode": os.fstat(fd).st_ino, "nbytes": 4096, **host_identity()}
        with pytest.raises(CannotBorrow, match="not sealed"):
            borrow(offer)
    finally:
        os.close(fd)


@pytest.mark.parametrize("offer", [[], {}, {"segment": 0, "pid": "1", "fd": 3, "inode": 5, "nbytes": 4096},
                                   {"segment": 0, "pid": 1, "fd": -1, "inode": 5, "nbytes": 4096},
                                   {"segment": [0], "pid": 1, "fd": 3, "inode": 5, "nbytes": 4096}])
def test_a_malformed_offer_is_a_protocol_error(offer):
    with pytest.raises(ValueError, match="malformed memory offer"):
        borrow(offer)
