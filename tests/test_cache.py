"""BlockReader: the kernel's 128 KiB reads become few, large, aligned fetches,
read ahead under one memory budget for every open file."""

import random

import trio

from versionfs.cache import BlockReader, ReadAheadBudget

KIB, MIB = 1 << 10, 1 << 20


def make(size, layout, delay=0.0, flight=None):
    content = (bytes(range(251)) * (size // 251 + 1))[:size]
    calls = []
    flight = flight if flight is not None else {"now": 0, "most": 0}

    async def fetch(offset, length):
        calls.append((offset, length))
        flight["now"] += 1
        flight["most"] = max(flight["most"], flight["now"])
        await trio.sleep(delay)
        flight["now"] -= 1
        return content[offset : offset + length]

    return content, calls, fetch


def test_sequential_reads_are_batched_aligned_and_read_ahead():
    size = 64 * MIB + 12345
    flight = {"now": 0, "most": 0}
    content, calls, fetch = make(size, (128, 32 * KIB), delay=0.001, flight=flight)
    budget = ReadAheadBudget(64 * MIB)

    async def main():
        out = []
        async with trio.open_nursery() as nursery:
            reader = BlockReader(fetch, size, (128, 32 * KIB), nursery.start_soon, max_window=8 * MIB, budget=budget)
            for off in range(0, size, 128 * KIB):
                out.append(bytes(await reader.read(off, 128 * KIB)))
            reader.close()
        return b"".join(out)

    assert trio.run(main) == content
    assert flight["most"] >= 7  # the window grew to 8 blocks, fetched ahead in parallel
    assert len(calls) <= 66  # one per 1 MiB block, not one per 128 KiB request (there are 513)
    for offset, length in calls[1:]:
        assert (offset - 128) % (32 * KIB) == 0  # whole chunks, after the header
    assert budget.used == 0 and budget.peak <= 8 * MIB + 2 * MIB  # the window ahead (8 MiB) and the block read


def test_one_budget_bounds_the_read_ahead_of_every_open_file():
    size = 32 * MIB
    content, calls, fetch = make(size, (0, MIB), delay=0.002)
    budget = ReadAheadBudget(6 * MIB)
    readers = 5

    async def main():
        results = {}
        async with trio.open_nursery() as nursery:
            async def one(n):
                reader = BlockReader(fetch, size, (0, MIB), nursery.start_soon, budget=budget)
                got = []
                for off in range(0, size, 128 * KIB):
                    got.append(bytes(await reader.read(off, 128 * KIB)))
                reader.close()
                results[n] = b"".join(got)

            async with trio.open_nursery() as inner:
                for n in range(readers):
                    inner.start_soon(one, n)
        return results

    results = trio.run(main)
    assert all(data == content for data in results.values())
    # Over the budget only by what each reader may always have: the block it reads and one ahead.
    assert budget.peak <= 6 * MIB + readers * 2 * MIB, budget.peak
    assert budget.used == 0  # closing gives everything back


def test_reads_out_of_order_fetch_nothing_twice():
    """The kernel's read-ahead requests queue behind the reads it must answer
    first, so a sequential reader's requests arrive out of order by several
    MiB: every byte is still fetched once."""
    size = 48 * MIB
    content, calls, fetch = make(size, (0, MIB), delay=0.001)
    requests = [(off, MIB) for off in range(0, size, MIB)]
    rng = random.Random(5)
    shuffled = []
    for i in range(0, len(requests), 8):  # each run of 8 requests in any order
        batch = requests[i : i + 8]
        rng.shuffle(batch)
        shuffled += batch

    async def main():
        async with trio.open_nursery() as nursery:
            reader = BlockReader(fetch, size, (0, MIB), nursery.start_soon)
            for off, n in shuffled:
                assert bytes(await reader.read(off, n)) == content[off : off + n]
            reader.close()

    trio.run(main)
    # (but for a few of the first, read before the stream is recognised)
    assert sum(n for _, n in calls) <= size + 4 * MIB, sum(n for _, n in calls) / MIB


def test_random_reads_fetch_only_what_they_need():
    size = 256 * MIB
    content, calls, fetch = make(size, (128, 32 * KIB))

    async def main():
        async with trio.open_nursery() as nursery:
            reader = BlockReader(fetch, size, (128, 32 * KIB), nursery.start_soon)
            rng = random.Random(3)
            for _ in range(200):
                off = rng.randrange(size - 4096)
                assert bytes(await reader.read(off, 4096)) == content[off : off + 4096]
            reader.close()

    trio.run(main)
    # Exactly the bytes asked for (no block, no read-ahead), but for the few reads
    # that land within 8 MiB of the one before and so look sequential.
    assert sum(n == 4096 for _, n in calls) >= 180 and sum(n for _, n in calls) <= 200 * 4096 + 32 * MIB


def test_a_failed_fetch_is_not_kept():
    size = 4 * MIB
    content = (bytes(range(251)) * (size // 251 + 1))[:size]
    failures = {"left": 1}

    async def fetch(offset, length):
        if failures["left"] and offset <= 2 * MIB < offset + length:
            failures["left"] -= 1
            raise OSError("the store hiccupped")
        return content[offset : offset + length]

    async def main():
        reader = BlockReader(fetch, size, (0, MIB))
        out = [bytes(await reader.read(off, 128 * KIB)) for off in range(0, size, 128 * KIB)]
        again = bytes(await reader.read(2 * MIB, 100))
        return b"".join(out), again

    data, again = trio.run(main)
    assert data == content and again == content[2 * MIB : 2 * MIB + 100]


def test_concurrent_reads_share_fetches_and_ranges_are_exact():
    size = 10 * MIB
    content, calls, fetch = make(size, (0, 1 * MIB))
    reader = BlockReader(fetch, size, (0, 1 * MIB))

    async def main():
        results = {}

        async def one(off, n):
            results[off, n] = bytes(await reader.read(off, n))

        await one(0, 128 * KIB)  # a stream starts; what follows arrives at once (kernel read-ahead)
        # The rest of 2 MiB, each byte asked for once (as the kernel does), one piece across a block boundary.
        pieces = [(off, 128 * KIB) for off in range(128 * KIB, MIB - 128 * KIB, 128 * KIB)]
        pieces += [(MIB - 128 * KIB, 128 * KIB - 10), (MIB - 10, 20), (MIB + 10, 128 * KIB - 10)]
        pieces += [(off, 128 * KIB) for off in range(MIB + 128 * KIB, 2 * MIB, 128 * KIB)]
        async with trio.open_nursery() as nursery:
            for off, n in pieces:
                nursery.start_soon(one, off, n)
            nursery.start_soon(one, size - 5, 100)  # past the end: short
            nursery.start_soon(one, size + 5, 100)  # beyond the end: empty
            nursery.start_soon(one, 7, 0)
        return results

    results = trio.run(main)
    for (off, n), data in results.items():
        assert data == content[off : off + n]
    # Concurrent readers waited for the block already on its way: no byte is
    # fetched twice, and there are few fetches for 20 requests.
    spans = sorted(calls)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), spans
    assert len(calls) <= 4


def test_lru_keeps_the_most_recently_used():
    from versionfs.cache import Lru

    by_count = Lru(2)
    by_count.put("a", 1), by_count.put("b", 2)
    assert by_count.get("a") == 1  # now b is the oldest
    by_count.put("c", 3)
    assert by_count.get("b") is None and by_count.get("a") == 1 and by_count.get("c") == 3
    by_size = Lru(10, weight=len)
    by_size.put("x", b"12345678"), by_size.put("y", b"1234")
    assert by_size.get("x") is None and by_size.get("y") == b"1234"
    by_size.put("huge", b"z" * 50)  # larger than the limit: still kept, alone
    assert by_size.get("huge") and by_size.get("y") is None
    by_size.put("huge", b"")  # replacing an entry recounts its weight
    by_size.put("w", b"123456789")
    assert by_size.get("huge") == b"" and by_size.get("w")
