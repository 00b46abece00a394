"""The L1 arena asks for transparent huge pages (transfer/hugepages.py)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from trio_kv.core.l1 import L1Store
from trio_kv.transfer import hugepages
from trio_kv.transfer.hugepages import HUGE_PAGE, advise_huge_pages

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_can_be_asked() -> bool:
    return THP.exists() and "[never]" not in THP.read_text()


def test_a_buffer_smaller_than_a_huge_page_is_not_advised():
    assert advise_huge_pages(torch.empty(HUGE_PAGE // 2, dtype=torch.uint8)) is False


@pytest.mark.skipif(not thp_can_be_asked(), reason="transparent huge pages are off on this machine")
def test_only_the_whole_huge_pages_inside_a_buffer_are_advised(monkeypatch):
    calls = []

    class Libc:
        class madvise:
            argtypes: list[object] = []

            def __new__(cls, address, length, advice):
                calls.append((address, length, advice))
                return 0

    monkeypatch.setattr(hugepages.ctypes, "CDLL", lambda *a, **k: Libc)
    buffer = torch.empty(3 * HUGE_PAGE, dtype=torch.uint8)
    assert advise_huge_pages(buffer) is True
    ((address, length, advice),) = calls
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    assert address % HUGE_PAGE == 0 and length % HUGE_PAGE == 0
    assert start <= address and address + length <= end
    assert length >= 2 * HUGE_PAGE  # all the whole pages a 3-page buffer holds at any alignment
    assert advice == hugepages._MADV_HUGEPAGE


@pytest.mark.skipif(not thp_can_be_asked(), reason="transparent huge pages are off on this machine")
def test_the_kernel_takes_the_advice_for_the_arena(monkeypatch):
    import trio_kv.core.l1 as l1_module

    seen = []

    def spy(buffer):
        seen.append(advise_huge_pages(buffer))
        return seen[-1]

    monkeypatch.setattr(l1_module, "advise_huge_pages", spy)
    L1Store(8 * HUGE_PAGE)
    assert seen == [True]
