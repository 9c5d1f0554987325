"""loadtests/listener_bench.py: both readers it compares get every message a real sender
process sent (the CPU figures divide by that count)."""

from __future__ import annotations

import pytest

from slimserve.loadtests.listener_bench import measure


@pytest.mark.parametrize("reader", ["event loop", "thread per connection"])
def test_each_reader_gets_every_message(reader):
    row = measure(reader, messages=40, interval_s=0.0)
    assert row.messages == 40 and row.cpu_us_per_message > 0
