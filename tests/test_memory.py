"""PeakRSS: the peak counts memory that is gone by the end of the block."""

import mmap

from merge_graphs.memory import PeakRSS, rss_bytes


def test_a_spike_freed_inside_the_block_still_counts():
    with PeakRSS(interval=10.0) as meter:  # no background sample lands in the block: only the explicit one
        block = mmap.mmap(-1, 50_000_000)
        for i in range(0, len(block), 4096):
            block[i] = 1
        meter.sample()
        block.close()  # unmapped: its pages leave the resident set at once
        after = rss_bytes()
    assert meter.peak - after >= 45_000_000
