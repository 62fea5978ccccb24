"""The language server's side of encoder disaggregation: one request's items encoded by the encoder servers into one
landing slice, in prompt order, with retries, health, dedup and counters.

`EncoderServers` is the list of encoder servers (gRPC URLs from the model config plus a watched file, re-read when
its mtime changes), each with its outstanding tokens (the rows of its requests in flight), its health (a server
that failed is down and is probed with `server ready` before it is used again) and its asyncio gRPC client. Nothing
is registered with an encoder server: each request names its slice (`mimo.epd.handoff`).

`Orchestrator.encode(plan)` (from any worker thread; the coroutines run on one event-loop thread it owns) reserves
ONE landing slice for the request's whole prompt table; item i's rows are its bytes
[first_row x row_bytes, (first_row + rows) x row_bytes) of that slice, so the table is contiguous in prompt order with
no concatenation copy. Items with the same content hash are encoded once (within a request: the first item's rows
are copied into the others' ranges; across requests: an item already in flight for another request is awaited and
its rows copied here by the request that encodes it, before that request can release its slice). Each item goes to
the server with the fewest outstanding tokens (ties: round robin), all items of a request at once. Every response
is checked (`check_encoded_item`). A failed item (connection refused, deadline exceeded, a Triton error, wrong
metadata or shape) is retried on a server it has not failed on; when a failed request may still be written by its
server (no response came: deadline, cancel), the whole table moves to a fresh slice (the answered items' rows are
copied over) and the old slice is released into quarantine (`mimo.epd.landing`). After `attempts` rounds the request
fails with every cause named. The caller gets the slice only when every item's rows are checked. How the rows reach
the slice (the encoder's own write through its mapping of the region, a NIXL WRITE, or the gRPC response copied in)
is the `handoff` (`mimo.epd.handoff`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from mimo.epd.cache import EmbeddingCache
from mimo.epd.handoff import ShmHandoff
from mimo.epd.handoff import item_inputs as encode_inputs  # noqa: F401 - the name tests and callers use
from mimo.epd.item_encoding import ENCODER_METADATA, check_encoded_item
from mimo.epd.landing import Lease, LandingPool
from mimo.epd.metadata import MetadataError
from mimo.epd.plan import PlannedItem, RequestPlan
from mimo.processing.config import ProcessorConfig

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
PROBE_PERIOD_S = 1.0  # how often servers marked down are probed
# gRPC's reconnect backoff grows to 120 s by default: a server restarted after a minute down would answer no probe
# for as long; capped, a probe reaches it within about a second of its start
RECONNECT_BACKOFF_MS = 1000


class EncodeError(RuntimeError):
    """A request's items could not be encoded: the message names every cause."""


class Metrics(Protocol):
    """Where the orchestrator reports (pb_utils metric families in model.py)."""

    def outstanding_tokens(self, url: str, tokens: int) -> None: ...

    def count(self, name: str, value: int = 1, labels: dict[str, str] | None = None) -> None:
        """name: one of COUNTERS."""

    def slices_in_use(self, slices: int) -> None: ...


COUNTERS = {
    "handoff_bytes": "bytes of prompt-table rows that reached the landing pool from encoder servers (label mode: "
                     "shm, nixl or grpc; label memory: the pool's, cuda = the LM GPU's, written device to device, "
                     "system = host memory)",
    "nixl_transfers": "NIXL WRITEs of rows into the landing pool (handoff nixl)",
    "nixl_transfer_microseconds": "time of those WRITEs from post to completion, on the encoder servers",
    "shm_writes": "rows written into the landing pool by the encoder itself through its mapping of the pool "
                  "(handoff shm, and the local fallback encoder)",
    "shm_write_microseconds": "time of those writes, on the encoders (CUDA events around the copy on a GPU)",
    "retries": "encode_item requests retried on another encoder server",
    "dedup_hits": "media items whose rows were copied from an identical item's encoding instead of encoded",
    "fallbacks": "media items this server's own encoder encoded after the encoder servers failed them",
    "cache_hits": "media items whose rows the embedding cache held (no encoder called)",
    "cache_misses": "media items the embedding cache did not hold (with the cache on)",
}
WRITE_COUNTERS = {"shm": ("shm_writes", "shm_write_microseconds"),
                  "nixl": ("nixl_transfers", "nixl_transfer_microseconds")}  # fmt: skip
DEDUP, CACHE = "dedup", "cache"  # where an item's rows came from, when not from an encoder server (`origins`)
LOCAL = "local"  # prefix of the origin of an item the fallback encoder encoded


class NoMetrics:
    def outstanding_tokens(self, url, tokens):
        pass

    def count(self, name, value=1, labels=None):
        pass

    def slices_in_use(self, slices):
        pass


def parse_urls(text: str, where: str) -> list[str]:
    """Comma- or newline-separated host:port gRPC URLs (`#` starts a comment in a file); refuses anything else."""
    urls = []
    for line in text.splitlines():
        for url in line.split("#", 1)[0].split(","):
            url = url.strip()
            if not url:
                continue
            host, sep, port = url.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{where}: {url!r} is not a host:port gRPC address")
            if url not in urls:
                urls.append(url)
    return urls


def encoder_client(url: str) -> grpcaio.InferenceServerClient:
    """tritonclient's asyncio client with its default channel options, the reconnect backoff capped."""
    keepalive = grpcaio.KeepAliveOptions()
    return grpcaio.InferenceServerClient(url, channel_args=[
        ("grpc.max_send_message_length", grpcaio.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcaio.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 4),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 4),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ])  # fmt: skip


@dataclass
class EncoderServer:
    url: str
    client: grpcaio.InferenceServerClient
    outstanding_tokens: int = 0
    down: bool = False  # failed: probed (server ready) before it is used again


class EncoderServers:
    """The configured encoder servers (`urls`, plus those in `urls_file` when it exists, re-read on mtime change)."""

    def __init__(self, urls: Sequence[str], urls_file: str | None, metrics: Metrics):
        self.static = list(urls)
        self.urls_file = Path(urls_file) if urls_file else None
        self.metrics = metrics
        self._mtime: float | None = None
        self._file_urls: list[str] = []
        self.servers: dict[str, EncoderServer] = {}
        self._turn = itertools.count()

    def refresh(self) -> None:
        """Re-reads the file when its mtime changed; keeps the state of servers still listed (event-loop thread)."""
        if self.urls_file is not None:
            try:
                mtime = self.urls_file.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    text = self.urls_file.read_text() if mtime is not None else ""
                    self._file_urls = parse_urls(text, str(self.urls_file))
                except (OSError, ValueError) as error:  # keep the last good list, say why
                    logger.error("encoder URL file not used: %s", error)
        wanted = list(dict.fromkeys([*self.static, *self._file_urls]))
        for url in list(self.servers):
            if url not in wanted:
                server = self.servers.pop(url)
                asyncio.ensure_future(server.client.close())
        for url in wanted:
            if url not in self.servers:
                self.servers[url] = EncoderServer(url, encoder_client(url))

    def candidates(self, exclude: set[str]) -> list[EncoderServer]:
        """Servers not in `exclude`: those up first, each group by fewest outstanding tokens (ties: round robin)."""
        servers = [s for s in self.servers.values() if s.url not in exclude]
        if not servers:
            return []
        start = next(self._turn) % len(servers)
        rotated = servers[start:] + servers[:start]
        return sorted(rotated, key=lambda s: (s.down, s.outstanding_tokens))

    def down(self) -> list[EncoderServer]:
        return [s for s in self.servers.values() if s.down]

    def add_tokens(self, server: EncoderServer, tokens: int) -> None:
        server.outstanding_tokens += tokens
        self.metrics.outstanding_tokens(server.url, server.outstanding_tokens)

    async def close(self) -> None:
        for server in self.servers.values():
            await server.client.close()
        self.servers.clear()


class _ItemFailure(Exception):
    def __init__(self, message: str, answered: bool):
        super().__init__(message)
        self.answered = answered  # False: the server may still write the slice (no response came)


@dataclass
class _Shared:
    """An item encoding in flight that other requests with the same content hash wait for."""

    done: asyncio.Future
    destinations: list[torch.Tensor] = field(default_factory=list)  # uint8 views its rows are copied into


class Orchestrator:
    """Encodes requests' items on the encoder servers into `pool` (see the module docstring)."""

    def __init__(self, pool: LandingPool, servers_urls: Sequence[str], urls_file: str | None, config: ProcessorConfig,
                 hidden_size: int, row_dtype: torch.dtype, *, timeout_s: float, attempts: int = 3,
                 reserve_timeout_s: float = 60.0, metrics: Metrics | None = None, handoff=None,
                 fallback_url: str | None = None, cache: EmbeddingCache | None = None):  # fmt: skip
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.pool, self.config, self.hidden_size, self.row_dtype = pool, config, hidden_size, row_dtype
        self.row_bytes = hidden_size * torch.empty(0, dtype=row_dtype).element_size()
        self.timeout_s, self.attempts, self.reserve_timeout_s = timeout_s, attempts, reserve_timeout_s
        self.metrics = metrics or NoMetrics()
        self.cache = cache
        pool.on_release = self.publish_slices
        self.handoff = handoff or ShmHandoff(pool.region)  # mimo.epd.handoff: how the rows reach the slice
        # the fallback encoder is this server's own mimo_encoder: it writes into the region, whatever the mode
        self.local_handoff = ShmHandoff(pool.region)
        self._urls, self._urls_file, self._fallback_url = list(servers_urls), urls_file, fallback_url
        self._shared: dict[str, _Shared] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mimo-epd-loop", daemon=True)
        self._thread.start()
        self.servers: EncoderServers = self._call(self._make_servers())

    async def _make_servers(self) -> EncoderServers:
        servers = EncoderServers(self._urls, self._urls_file, self.metrics)
        servers.refresh()
        # the fallback encoder (this server's own encode_item): never chosen, only asked after the last round
        url = self._fallback_url
        self.fallback = EncoderServer(url, encoder_client(url)) if url else None
        self._prober = asyncio.ensure_future(self._probe_down(servers))
        return servers

    async def _probe_down(self, servers: EncoderServers) -> None:
        """Servers marked down are probed in the background: one found ready is used again."""
        while True:
            await asyncio.sleep(PROBE_PERIOD_S)
            try:
                servers.refresh()
                await asyncio.gather(*(self._probe(server) for server in servers.down()))
            except Exception:  # noqa: BLE001 - the prober must not die
                logger.exception("probing encoder servers failed")

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def encode(self, plan: RequestPlan, origins: list[str] | None = None) -> Lease | None:
        """The request's prompt table in one slice ([total_rows, hidden] of row_dtype; the caller releases it), or
        None for a request without media. Raises EncodeError. `origins`, when given, gets where each item's rows
        came from, in prompt order: an encoder server's URL, `local:<url>` (the fallback), DEDUP or CACHE."""
        if not plan.items:
            return None
        return self._call(self._encode(plan, origins))

    def table_shape(self, plan: RequestPlan) -> tuple[int, int, int]:
        """mimo_llm's prompt_embedding_table for the plan: [1, total_rows, hidden] of row_dtype."""
        return 1, plan.total_rows, self.hidden_size

    def table(self, lease: Lease, plan: RequestPlan) -> torch.Tensor:
        """The table over the slice, no copy."""
        return lease.view(self.row_dtype, self.table_shape(plan))

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._prober.cancel)
            self._call(self.servers.close())
            if self.fallback is not None:
                self._call(self.fallback.client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def publish_slices(self) -> None:
        self.metrics.slices_in_use(self.pool.stats().slices_in_use)

    # -- the event loop's side ---------------------------------------------------------------------------------

    async def _encode(self, plan: RequestPlan, origins: list[str] | None = None) -> Lease:
        self.servers.refresh()
        groups: dict[str, list[PlannedItem]] = {}
        for item in plan.items:
            groups.setdefault(item.metadata.content_hash, []).append(item)
        hits = len(plan.items) - len(groups)
        if hits:
            self.metrics.count("dedup_hits", hits)
        byte_size = plan.total_rows * self.row_bytes
        lease = await self.pool.reserve_async(byte_size, self.reserve_timeout_s)
        self.publish_slices()
        failed_on: dict[str, set[str]] = {key: set() for key in groups}
        causes: dict[str, list[str]] = {key: [] for key in groups}
        rounds = self.attempts + (self.fallback is not None)  # the fallback's round comes last
        try:
            found: dict[str, str] = self._cached(lease, groups)  # content hash -> where its rows came from
            for attempt in range(rounds):
                local = attempt == self.attempts
                pending = [key for key in groups if key not in found]
                if not pending:
                    break
                results = await asyncio.gather(*(self._encode_item(lease, groups[key][0], failed_on[key], local)
                                                  for key in pending), return_exceptions=True)  # fmt: skip
                unanswered = False  # this round left a request unanswered: its server may still write `lease`
                for key, result in zip(pending, results):
                    if isinstance(result, str):
                        found[key] = result
                        if local and result != DEDUP:
                            self.metrics.count("fallbacks")
                    elif isinstance(result, _ItemFailure):
                        causes[key].append(str(result))
                        unanswered |= not result.answered
                        logger.warning("encoding %s item %s failed (round %d of %d): %s",
                                       groups[key][0].metadata.modality.name.lower(), key[:19], attempt + 1, rounds,
                                       result)  # fmt: skip
                    else:
                        raise result
                if len(found) == len(groups):
                    break
                lease.writing = lease.writing or unanswered  # released into quarantine, whatever comes next
                if attempt + 1 == rounds:
                    raise EncodeError("; ".join(f"item {groups[key][0].metadata.modality.name.lower()} {key[:19]}: "
                                                + " then ".join(causes[key]) for key in groups if key not in found))
                if attempt + 1 < self.attempts:
                    self.metrics.count("retries", len(groups) - len(found))
                if unanswered:  # a server may still write this slice: the table moves to a fresh one
                    fresh = await self.pool.reserve_async(byte_size, self.reserve_timeout_s)
                    for key in found:
                        first = groups[key][0]
                        self._rows(fresh, first).copy_(self._rows(lease, first))
                    lease.release()
                    lease = fresh
            self._remember(lease, groups, found)
            for items in groups.values():
                for item in items[1:]:
                    self._rows(lease, item).copy_(self._rows(lease, items[0]))
            if origins is not None:
                origins[:] = [found[item.metadata.content_hash] if item is groups[item.metadata.content_hash][0]
                              else DEDUP for item in plan.items]  # fmt: skip
            return lease
        except BaseException:
            lease.release()
            raise

    def _rows(self, lease: Lease, item: PlannedItem) -> torch.Tensor:
        start, size = item.first_row * self.row_bytes, item.metadata.num_tokens * self.row_bytes
        return self.pool.region.view(lease.offset + start, size)

    def _cached(self, lease: Lease, groups: dict[str, list[PlannedItem]]) -> dict[str, str]:
        """The groups the cache holds, their rows copied into `lease` (CACHE for each); counts hits and misses."""
        if self.cache is None:
            return {}
        found = {}
        for key, items in groups.items():
            rows = self.cache.get(key)
            if rows is not None:
                self._rows(lease, items[0]).copy_(rows)
                found[key] = CACHE
        self.metrics.count("cache_hits", len(found))
        self.metrics.count("cache_misses", len(groups) - len(found))
        return found

    def _remember(self, lease: Lease, groups: dict[str, list[PlannedItem]], found: dict[str, str]) -> None:
        """Every checked item the cache did not give goes into it (a copy of its rows, on the region's device)."""
        if self.cache is not None:
            for key, origin in found.items():
                if origin != CACHE:
                    self.cache.put(key, self._rows(lease, groups[key][0]))

    async def _encode_item(self, lease: Lease, item: PlannedItem, failed_on: set[str], local: bool = False) -> str:
        """Item's rows into its range of `lease` (`local`: by the fallback encoder); returns where they came from
        (DEDUP: another request's encoding of it); raises _ItemFailure (the server is added to `failed_on`)."""
        key = item.metadata.content_hash
        destination = self._rows(lease, item)
        shared = self._shared.get(key)
        if shared is not None and not shared.done.done():  # the same item in flight for another request
            shared.destinations.append(destination)
            try:
                if await asyncio.shield(shared.done):
                    self.metrics.count("dedup_hits")
                    return DEDUP
            finally:
                if destination in shared.destinations:
                    shared.destinations.remove(destination)
        shared = _Shared(asyncio.get_running_loop().create_future())
        self._shared[key] = shared
        ok = False
        try:
            origin = await self._encode_on_a_server(lease, item, failed_on, local)
            for other in shared.destinations:
                other.copy_(destination)
            shared.destinations.clear()
            ok = True
        finally:
            shared.done.set_result(ok)
            if self._shared.get(key) is shared:
                del self._shared[key]
        return origin

    async def _encode_on_a_server(self, lease: Lease, item: PlannedItem, failed_on: set[str], local: bool) -> str:
        server = self.fallback if local else await self._choose(failed_on)
        if server is None:
            tried = ", ".join(sorted(failed_on)) or "none"
            raise _ItemFailure(f"no encoder server left to try (configured: {', '.join(self.servers.servers) or 'none'};"
                               f" failed: {tried})", answered=True)  # fmt: skip
        rows = item.metadata.num_tokens
        offset = lease.offset + item.first_row * self.row_bytes
        byte_size = rows * self.row_bytes
        handoff = self.local_handoff if local else self.handoff
        inputs, outputs = handoff.request(grpcaio, item.data, item.metadata.to_json(), offset, byte_size)
        self.servers.add_tokens(server, rows)
        answered = False
        try:
            result = await server.client.infer(handoff.model, inputs, outputs=outputs,
                                               client_timeout=self.timeout_s)  # fmt: skip
            answered = True
            check_encoded_item(item.metadata, result.as_numpy(ENCODER_METADATA), handoff.rows_shape(result),
                               self.config, self.hidden_size, server.url)  # fmt: skip
            transfer_s = handoff.land(result, self.pool.region.view(offset, byte_size))
        except InferenceServerException as error:
            status = error.status() or ""
            # an answer from Triton (an error response) means nothing writes the slice any more
            answered = answered or status not in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.UNAVAILABLE",
                                                  "StatusCode.CANCELLED", "")  # fmt: skip
            answered = answered and not handoff.may_still_write(error.message())  # a NIXL WRITE timed out
            # an error answer (bad metadata, a refused slice) leaves the server up
            self._failed(server, failed_on, down=not answered)
            raise _ItemFailure(f"{server.url}: {status or 'error'}: {error.message()}", answered) from None
        except MetadataError as error:  # an answer this side refuses: the server is suspect
            self._failed(server, failed_on)
            raise _ItemFailure(str(error), answered=True) from None
        except asyncio.CancelledError:
            self._failed(server, failed_on)
            raise
        finally:
            self.servers.add_tokens(server, -rows)
        self.metrics.count("handoff_bytes", byte_size, {"mode": handoff.mode, "memory": self.pool.region.kind})
        if transfer_s is not None:  # written by the encoder itself (shm) or by its NIXL WRITE
            writes, microseconds = WRITE_COUNTERS[handoff.mode]
            self.metrics.count(writes)
            self.metrics.count(microseconds, round(transfer_s * 1e6))
        return f"{LOCAL}:{server.url}" if local else server.url

    def _failed(self, server: EncoderServer, failed_on: set[str], down: bool = True) -> None:
        """This item tries `server` no more; `down`: nobody uses it until a probe finds it ready."""
        if down:
            server.down = True
        failed_on.add(server.url)

    async def _choose(self, exclude: set[str]) -> EncoderServer | None:
        for server in self.servers.candidates(exclude):
            if not server.down or await self._probe(server):
                return server
        return None

    async def _probe(self, server: EncoderServer) -> bool:
        try:
            ready = await server.client.is_server_ready(client_timeout=PROBE_TIMEOUT_S)
        except InferenceServerException:
            return False
        if ready:
            server.down = False
        return bool(ready)
