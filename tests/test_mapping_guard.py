"""The test session's guard against running out of memory mappings sees new mappings."""

from __future__ import annotations

import mmap

from tests.helpers import mapping_count


def test_mapping_count_sees_new_mappings():
    before = mapping_count()
    # Alternate protections so the kernel cannot merge neighbouring regions into one mapping.
    regions = [mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | (mmap.PROT_WRITE if i % 2 else 0))
               for i in range(200)]
    assert mapping_count() >= before + 100
    for r in regions:
        r.close()
    assert mapping_count() < before + 100
