"""BlockReader: the kernel's 128 KiB reads become few, large, aligned fetches."""

import trio

from versionfs.cache import BlockReader

KIB, MIB = 1 << 10, 1 << 20


def make(size, layout):
    content = bytes(i % 251 for i in range(size))
    calls = []

    async def fetch(offset, length):
        calls.append((offset, length))
        await trio.sleep(0)
        return content[offset : offset + length]

    return content, calls, BlockReader(fetch, size, layout)


def test_sequential_reads_are_batched_and_aligned():
    size = 64 * MIB + 12345
    content, calls, reader = make(size, (128, 32 * KIB))

    async def main():
        out = []
        for off in range(0, size, 128 * KIB):
            out.append(await reader.read(off, 128 * KIB))
        return b"".join(out)

    assert trio.run(main) == content
    assert len(calls) <= 12  # not one per 128 KiB request (there are 513)
    for offset, length in calls[1:]:
        assert (offset - 128) % (32 * KIB) == 0  # whole chunks, after the header


def test_concurrent_reads_share_fetches_and_ranges_are_exact():
    size = 10 * MIB
    content, calls, reader = make(size, (0, 1 * MIB))

    async def main():
        results = {}

        async def one(off, n):
            results[off, n] = await reader.read(off, n)

        async with trio.open_nursery() as nursery:
            for off in range(0, 4 * MIB, 128 * KIB):
                nursery.start_soon(one, off, 128 * KIB)
            nursery.start_soon(one, MIB - 10, 20)  # across a block boundary
            nursery.start_soon(one, size - 5, 100)  # past the end: short
            nursery.start_soon(one, size + 5, 100)  # beyond the end: empty
            nursery.start_soon(one, 7, 0)
        return results

    results = trio.run(main)
    for (off, n), data in results.items():
        assert data == content[off : off + n]
    # Concurrent readers waited for the block already on its way: no byte is
    # fetched twice, and there are few fetches for 36 requests.
    spans = sorted(calls)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), spans
    assert len(calls) <= 6


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
