"""The encoder-server list of the language entry: addresses parsed with clear refusals, the watched file re-read when
it changes (state of servers still listed kept), the choice by outstanding tokens with round robin on ties."""

from __future__ import annotations

import asyncio
import os

import pytest

from mimo.epd.orchestrate import EncoderServers, NoMetrics, parse_urls


def test_addresses_are_parsed_and_bad_ones_named():
    assert parse_urls("a:1, b:2\n# comment\nc:3 # more\n\na:1", "x") == ["a:1", "b:2", "c:3"]
    for bad in ("localhost", ":8001", "h:port", "h:0", "h:70000"):
        with pytest.raises(ValueError, match=f"x: {bad!r} is not a host:port gRPC address"):
            parse_urls(f"a:1,{bad}", "x")


def test_the_file_is_re_read_when_it_changes(tmp_path):
    path = tmp_path / "encoders.txt"

    async def main():
        servers = EncoderServers(["a:1"], str(path), NoMetrics())
        servers.refresh()  # the file does not exist yet
        assert list(servers.servers) == ["a:1"]
        path.write_text("b:2\nc:3\n")
        servers.refresh()
        assert list(servers.servers) == ["a:1", "b:2", "c:3"]
        servers.servers["b:2"].outstanding_tokens = 5
        path.write_text("b:2\nnot an address\n")
        os.utime(path, ns=(1, 1))  # a different mtime, whatever the clock's resolution
        servers.refresh()  # refused: the last good list stays
        assert list(servers.servers) == ["a:1", "b:2", "c:3"]
        path.write_text("b:2\n")
        os.utime(path, ns=(2, 2))
        servers.refresh()
        assert list(servers.servers) == ["a:1", "b:2"] and servers.servers["b:2"].outstanding_tokens == 5
        await servers.close()

    asyncio.run(main())


def test_the_choice_is_by_outstanding_tokens_then_round_robin():
    async def main():
        servers = EncoderServers(["a:1", "b:2", "c:3"], None, NoMetrics())
        servers.refresh()
        a, b, c = servers.servers.values()
        firsts = {servers.candidates(set())[0].url for _ in range(6)}
        assert firsts == {"a:1", "b:2", "c:3"}  # all idle: each takes its turn
        servers.add_tokens(a, 100)
        servers.add_tokens(b, 10)
        assert [s.url for s in servers.candidates(set())] == ["c:3", "b:2", "a:1"]
        c.down = True  # a server that failed comes last, whatever its load
        assert [s.url for s in servers.candidates(set())] == ["b:2", "a:1", "c:3"]
        assert [s.url for s in servers.candidates({"b:2"})] == ["a:1", "c:3"]
        await servers.close()

    asyncio.run(main())
