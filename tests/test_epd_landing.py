"""The landing pool over a real system shared-memory region: aligned slices that never overlap under concurrent
threads and asyncio tasks, bounded waits in arrival order, release on every way out, quarantine of slices a remote
writer may still touch, counters, and no /dev/shm leftovers."""

import asyncio
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.utils.shared_memory as system_shm

from mimo.epd.landing import ALIGNMENT, LandingClosed, LandingError, LandingPool, LandingTimeout, SystemShmRegion
from mimo.serving import lifecycle

SHM = Path("/dev/shm")


@pytest.fixture
def pool():
    with LandingPool(SystemShmRegion(16 * ALIGNMENT, key_prefix="mimo_test_")) as pool:
        yield pool
    assert not (SHM / pool.region.name).exists()


class Intervals:
    """The slices held right now, checked for overlap as each is taken."""

    def __init__(self):
        self.lock, self.held = threading.Lock(), set()

    def take(self, lease):
        with self.lock:
            for offset, size in self.held:
                assert lease.offset + lease.reserved <= offset or offset + size <= lease.offset, "overlapping slices"
            self.held.add((lease.offset, lease.reserved))

    def give(self, lease):
        with self.lock:
            self.held.remove((lease.offset, lease.reserved))


def fill_and_check(lease, tag: int) -> None:
    """Writes `tag` over the whole slice and reads it back: a slice another holder shares would not survive."""
    view = lease.view(torch.uint8, (lease.byte_size,))
    view.fill_(tag)
    for _ in range(3):
        threading.Event().wait(0.0005)  # let the others write theirs meanwhile
        assert bool((view == tag).all()), f"slice at {lease.offset} was overwritten"
    del view


def assert_all_free(pool):
    stats = pool.stats()
    assert (stats.slices_in_use, stats.bytes_in_use, stats.waiting, stats.quarantined_slices) == (0, 0, 0, 0)
    with pool.reserve(pool.capacity, timeout_s=0) as whole:  # one range again: nothing left fragmented
        assert whole.offset == 0


def test_slices_are_aligned_disjoint_and_in_the_region(pool):
    leases = [pool.reserve(size, timeout_s=0) for size in (1, ALIGNMENT, ALIGNMENT + 1, 3 * ALIGNMENT - 7)]
    assert [lease.offset for lease in leases] == [0, ALIGNMENT, 2 * ALIGNMENT, 4 * ALIGNMENT]
    assert [lease.reserved for lease in leases] == [ALIGNMENT, ALIGNMENT, 2 * ALIGNMENT, 3 * ALIGNMENT]
    assert leases[2].output_region == (pool.region.name, ALIGNMENT + 1, 2 * ALIGNMENT)
    stats = pool.stats()
    assert (stats.slices_in_use, stats.bytes_in_use, stats.peak_bytes_in_use) == (4, 7 * ALIGNMENT, 7 * ALIGNMENT)
    # the slices are the region's bytes: another mapping of the same /dev/shm key sees what a view wrote
    view = leases[1].view(torch.float32, (ALIGNMENT // 4,))
    view.copy_(torch.arange(ALIGNMENT // 4, dtype=torch.float32))
    other = system_shm.create_shared_memory_region("reader", pool.region.key, pool.region.byte_size)
    seen = system_shm.get_contents_as_numpy(other, np.float32, [ALIGNMENT // 4], ALIGNMENT)
    assert seen.tolist() == list(range(ALIGNMENT // 4))
    del seen, view
    system_shm.destroy_shared_memory_region(other)
    with pytest.raises(ValueError, match=r"a \[2\] torch.float32 view is 8 bytes, the slice 1"):
        leases[0].view(torch.float32, (2,))
    for lease in leases:
        lease.release()
    leases[0].release()  # idempotent
    assert_all_free(pool)


def test_impossible_and_bad_sizes_are_refused_at_once(pool):
    with pytest.raises(LandingError, match=r"a 4097-byte slice can never fit the 4096-byte landing pool"):
        pool.reserve(pool.capacity + 1, timeout_s=60)
    for size in (0, -5, 2.5):
        with pytest.raises(ValueError, match="positive integer byte size"):
            pool.reserve(size, timeout_s=0)


def test_a_full_pool_waits_until_the_deadline_then_says_so(pool):
    held = pool.reserve(pool.capacity, timeout_s=0)
    with pytest.raises(LandingTimeout, match=r"no room for a 10-byte landing slice before the deadline \(in use: 1 "
                                             r"slices, 4096 of 4096 bytes"):
        pool.reserve(10, timeout_s=0.05)
    stats = pool.stats()
    assert (stats.waits, stats.timeouts, stats.waiting) == (1, 1, 0)
    held.release()
    assert_all_free(pool)


def test_threads_never_share_a_slice_and_give_everything_back(pool):
    intervals, errors, start = Intervals(), [], threading.Barrier(8)

    def worker(tag: int) -> None:
        rng = random.Random(tag)
        try:
            start.wait(10)
            for step in range(25):  # all 8 first ask 3/16 of the pool at once: some must wait
                size = 3 * ALIGNMENT if step == 0 else rng.randint(1, 5 * ALIGNMENT)
                with pool.reserve(size, timeout_s=30) as lease:
                    intervals.take(lease)
                    fill_and_check(lease, tag)
                    intervals.give(lease)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert pool.stats().waits > 0
    assert_all_free(pool)


def test_asyncio_tasks_never_share_a_slice_and_cancelled_waiters_take_nothing(pool):
    intervals = Intervals()

    async def request(tag: int) -> None:
        rng = random.Random(tag)
        for _ in range(20):
            with await pool.reserve_async(rng.randint(1, 6 * ALIGNMENT), timeout_s=30) as lease:
                intervals.take(lease)
                lease.view(torch.uint8, (lease.byte_size,)).fill_(tag)
                await asyncio.sleep(0)
                assert bool((lease.view(torch.uint8, (lease.byte_size,)) == tag).all())
                intervals.give(lease)

    async def main():
        workers = [asyncio.create_task(request(tag)) for tag in range(1, 7)]
        blocker = await pool.reserve_async(pool.capacity, timeout_s=30)  # everyone queues behind this
        victims = [asyncio.create_task(pool.reserve_async(ALIGNMENT, timeout_s=30)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert pool.stats().waiting >= 3
        for victim in victims:
            victim.cancel()
        await asyncio.gather(*victims, return_exceptions=True)
        blocker.release()
        await asyncio.wait_for(asyncio.gather(*workers), 60)

    asyncio.run(main())
    assert_all_free(pool)


def test_waiters_are_served_in_arrival_order():
    async def main(pool):
        held = [await pool.reserve_async(ALIGNMENT, timeout_s=0) for _ in range(4)]  # the whole pool
        big = asyncio.create_task(pool.reserve_async(2 * ALIGNMENT, timeout_s=30))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(pool.reserve_async(ALIGNMENT, timeout_s=30))
        await asyncio.sleep(0.01)
        held[0].release()  # room for the small one, but the big one came first
        await asyncio.sleep(0.01)
        assert not big.done() and not small.done() and pool.stats().waiting == 2
        held[1].release()
        big_lease = await asyncio.wait_for(big, 10)
        assert big_lease.reserved == 2 * ALIGNMENT and not small.done()
        held[2].release()
        (await asyncio.wait_for(small, 10)).release()
        big_lease.release()
        held[3].release()

    with LandingPool(SystemShmRegion(4 * ALIGNMENT, key_prefix="mimo_test_")) as pool:
        asyncio.run(main(pool))
        assert_all_free(pool)


def test_a_slice_a_remote_writer_may_still_touch_is_quarantined():
    now = [0.0]
    with LandingPool(SystemShmRegion(2 * ALIGNMENT, key_prefix="mimo_test_"), quarantine_s=30,
                     clock=lambda: now[0]) as pool:  # fmt: skip
        with pytest.raises(TimeoutError), pool.reserve(2 * ALIGNMENT, timeout_s=0) as lease, lease.remote_write():
            raise TimeoutError("the encode request timed out on the client side")
        stats = pool.stats()
        assert (stats.slices_in_use, stats.quarantined_slices, stats.quarantined_bytes) == (0, 1, 2 * ALIGNMENT)
        with pytest.raises(LandingTimeout, match="1 quarantined"):
            pool.reserve(1, timeout_s=0)
        now[0] = 31.0
        with pool.reserve(2 * ALIGNMENT, timeout_s=0) as lease:  # back after the quarantine
            with lease.remote_write():  # the response came: released at once afterwards
                pass
            with pytest.raises(ValueError), lease.remote_write():
                raise ValueError("an error response")  # settled by the caller: the server answered
            lease.settle()
        with pool.reserve(2 * ALIGNMENT, timeout_s=0) as lease:
            with pytest.raises(KeyError), lease.remote_write():
                raise KeyError("cancelled")
            with pytest.raises(LandingError, match="may still be written by an earlier request; a retry needs a slice"):
                with lease.remote_write():
                    pass
        assert pool.stats().quarantined_slices == 1


def test_close_ends_waits_and_removes_the_region_even_with_views_alive():
    pool = LandingPool(SystemShmRegion(2 * ALIGNMENT, key_prefix="mimo_test_"))
    path = SHM / pool.region.name
    assert path.exists()
    lease = pool.reserve(2 * ALIGNMENT, timeout_s=0)
    view = lease.view(torch.uint8, (2 * ALIGNMENT,))  # still referenced when the pool closes
    failures = []

    def waiter():
        try:
            pool.reserve(ALIGNMENT, timeout_s=30)
        except LandingClosed as error:
            failures.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    while pool.stats().waiting == 0:
        threading.Event().wait(0.001)
    pool.close()
    thread.join(10)
    assert len(failures) == 1 and "closed" in str(failures[0])
    assert not path.exists()
    view.fill_(1)  # the mapping lives on until its last view goes
    lease.release()
    with pytest.raises(LandingClosed):
        pool.reserve(1, timeout_s=0)
    pool.close()  # idempotent


def test_regions_take_the_servers_shared_memory_prefix(monkeypatch):
    monkeypatch.setenv(lifecycle.SHM_PREFIX_ENV, "mimo_triton_abc123_")
    region = SystemShmRegion(ALIGNMENT, key_prefix=lifecycle.shm_prefix())
    try:
        assert region.name.startswith("mimo_triton_abc123_landing_") and (SHM / region.name).exists()
    finally:
        region.close()
    monkeypatch.delenv(lifecycle.SHM_PREFIX_ENV)
    assert lifecycle.shm_prefix() == "mimo_"
