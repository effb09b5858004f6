"""measure_call: how many calls a cell costs, which result it keeps, and what it records."""

import time

import numpy as np
import pytest

from eff_attn.bench.measure import measure_call


class Counting:
    """A callable that returns how many times it has been called, optionally sleeping first."""

    def __init__(self, sleep_s=0.0, allocate_bytes=0):
        self.calls, self.sleep_s, self.allocate_bytes = 0, sleep_s, allocate_bytes

    def __call__(self):
        self.calls += 1
        if self.allocate_bytes:
            block = np.ones(self.allocate_bytes // 8)                   # touched, so resident
            del block
        time.sleep(self.sleep_s)
        return self.calls


def test_a_call_slower_than_the_time_budget_is_made_three_times():
    fn = Counting(sleep_s=0.05)
    measured = measure_call(fn, repeats=5, time_budget_s=0.01)
    assert fn.calls == 3                                            # first, memory-tracked, one timed
    assert measured.timing.repeats == 1
    assert measured.result == 2                                     # the tracked warm call's, not the first's
    assert measured.timing.warm_median_s >= 0.05


def test_a_fast_call_gets_its_repeats_and_keeps_the_first_warm_result():
    fn = Counting()
    measured = measure_call(fn, repeats=4, time_budget_s=10.0)
    assert fn.calls == 2 + 4
    assert measured.timing.repeats == 4
    assert measured.result == 2


def test_repeats_stop_at_the_time_budget():
    fn = Counting(sleep_s=0.02)
    measured = measure_call(fn, repeats=50, time_budget_s=0.1)      # 0.1 s at >= 0.02 s a call: at most 5
    assert 1 <= measured.timing.repeats <= 5
    assert fn.calls == 2 + measured.timing.repeats


def test_timed_calls_run_with_the_settled_allocator_and_tracking_restores_it():
    """A 1 MiB temporary made and freed in a loop reuses the heap: no page fault per call while timed."""
    import resource

    from eff_attn.bench import measure

    if not measure._allocator(measure._RUNNING):
        pytest.skip("not glibc")

    def churn():
        for _ in range(200):
            np.ones(2**17)                                          # 1 MiB, touched, then freed

    measure_call(churn, repeats=1)                                  # tracking in the middle must restore
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 200 * 256 / 4                                   # a fresh mapping would fault 256 pages each


def test_the_tracked_call_records_its_peak_memory():
    size = 64 * 2**20
    measured = measure_call(Counting(allocate_bytes=size), repeats=1)
    assert measured.peak_bytes >= 0.9 * size
    assert measured.peak_bytes < 4 * size
    quiet = measure_call(Counting(), repeats=1)
    assert quiet.peak_bytes < 0.25 * size


@pytest.mark.parametrize("repeats", [1, 3])
def test_timing_fields_are_ordered(repeats):
    t = measure_call(Counting(sleep_s=0.001), repeats=repeats).timing
    assert t.warm_q25_s <= t.warm_median_s <= t.warm_q75_s
    assert t.first_s > 0 and t.compile_s >= 0
