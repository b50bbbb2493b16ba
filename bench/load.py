"""Async HTTP load client for the storage element and the ceiling server.

* Bounded: every run stops after ``requests`` requests or ``max_seconds`` (whichever comes
  first; requests in flight then finish, each limited by ``request_timeout``).
* Constant memory: request bodies are ``memoryview`` slices of one preallocated random
  buffer, yielded by an async generator, so a 2 GiB upload never materialises. Every body
  of a given size has the same bytes, so its sha256 is computed once and checked against
  the ``checksum`` the server returns.
* Downloads discard the body while counting (and optionally hashing) the bytes.
* Records latency percentiles (p50/p90/p99), MiB/s, req/s and error counts.

A :class:`Target` adapts the paths of one deployment (``ours`` = the storage element's
``/api/v1/files`` API with a bearer token, ``ceiling`` = ``bench.ceiling``).

Standalone::

    python -m bench.load --url http://127.0.0.1:8000 --token T --scenario put-1m \\
        --concurrency 8 --requests 200
    python -m bench.load --url http://127.0.0.1:8100 --target ceiling --scenario get-64m \\
        --concurrency 2 --requests 16
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.payload import AsyncIterablePayload

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

OPS = ("put", "post", "get", "meta", "list")
UPLOAD_OPS = ("put", "post")
DEFAULT_BUFFER = 4 * MIB  # the one preallocated body buffer
DEFAULT_CHUNK = 256 * KIB  # slice size yielded to aiohttp
READ_BUFSIZE = 256 * KIB  # client StreamReader limit for downloads
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"4k"`` -> 4096, ``"1m"``/``"1MiB"`` -> 1048576, ``"2g"`` -> 2 GiB, ``"512"`` -> 512."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def size_label(n: int) -> str:
    """Compact label used in scenario names: 4096 -> ``4k``, 2 GiB -> ``2g``."""
    for unit, mult in (("g", GIB), ("m", MIB), ("k", KIB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit, mult in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{n:.0f} B"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def normalize_checksum(value: object) -> str | None:
    """``"sha256:ABC"`` / ``"abc"`` -> ``"abc"``; anything else -> None."""
    if not isinstance(value, str) or not value:
        return None
    v = value.strip().lower()
    if ":" in v:
        v = v.split(":", 1)[1]
    return v


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Where and how to reach one deployment. ``kind`` selects the URL layout."""

    name: str
    base_url: str
    kind: str = "ours"  # "ours" | "ceiling"
    token: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("ours", "ceiling"):
            raise ValueError(f"unknown target kind {self.kind!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def supports(self, op: str) -> bool:
        return self.kind == "ours" or op in ("put", "post", "get")

    def put_url(self, file_id: str) -> str:
        if self.kind == "ceiling":
            return f"{self.base_url}/files/{file_id}"
        return f"{self.base_url}/api/v1/files/{file_id}"

    def put_params(self) -> dict[str, str]:
        return {} if self.kind == "ceiling" else {"filename": "bench.bin"}

    def upload_url(self) -> str:
        if self.kind == "ceiling":
            return f"{self.base_url}/upload"
        return f"{self.base_url}/api/v1/files/upload"

    def download_url(self, file_id: str) -> str:
        if self.kind == "ceiling":
            return f"{self.base_url}/files/{file_id}"
        return f"{self.base_url}/api/v1/files/{file_id}/download"

    def metadata_url(self, file_id: str) -> str:
        if self.kind == "ceiling":
            raise ValueError("the ceiling server has no metadata endpoint")
        return f"{self.base_url}/api/v1/files/{file_id}"

    def list_url(self) -> str:
        if self.kind == "ceiling":
            raise ValueError("the ceiling server has no list endpoint")
        return f"{self.base_url}/api/v1/files?limit=100"

    def delete_url(self, file_id: str) -> str:
        if self.kind == "ceiling":
            return f"{self.base_url}/files/{file_id}"
        return f"{self.base_url}/api/v1/files/{file_id}"

    def ready_url(self) -> str:
        return f"{self.base_url}/health/ready"


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """One measured workload: ``op`` of ``size``-byte bodies at ``concurrency``."""

    op: str
    size: int = 0
    concurrency: int = 1
    requests: int = 1
    max_seconds: float = 60.0
    chunked: bool = False  # raw PUT without Content-Length
    role: str = ""  # groups scenarios for targets: small / medium / large / big / api
    name: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        if self.op in ("put", "post", "get") and self.size <= 0:
            raise ValueError(f"{self.op} needs a size > 0")
        if self.concurrency < 1 or self.requests < 1:
            raise ValueError("concurrency and requests must be >= 1")
        if not self.name:
            self.name = (
                self.op if self.op in ("meta", "list") else f"{self.op}-{size_label(self.size)}"
            )

    @property
    def is_upload(self) -> bool:
        return self.op in UPLOAD_OPS

    @property
    def moves_bytes(self) -> bool:
        return self.op in ("put", "post", "get")

    @classmethod
    def parse(cls, spec: str, **kw: Any) -> Scenario:
        """``put-1m``, ``post-4k``, ``get-64m``, ``put-2g``, ``meta``, ``list``."""
        op, _, size = spec.strip().partition("-")
        return cls(op=op, size=parse_size(size) if size else 0, **kw)


# --------------------------------------------------------------------------- bodies


class SizedStreamPayload(AsyncIterablePayload):
    """An async-iterable payload whose size is known, so aiohttp sends Content-Length
    (also for a multipart body that contains it)."""

    def __init__(self, value: AsyncIterator[Any], size: int, **kwargs: Any) -> None:
        super().__init__(value, **kwargs)
        self._size = size


class BodySource:
    """One preallocated random buffer; every body is made of slices of it, repeated."""

    def __init__(
        self,
        buffer_size: int = DEFAULT_BUFFER,
        chunk_size: int = DEFAULT_CHUNK,
        seed: bytes | None = None,
    ) -> None:
        if chunk_size <= 0 or buffer_size < chunk_size:
            raise ValueError("need 0 < chunk_size <= buffer_size")
        # Incompressible bytes; deterministic for a given seed.
        self._buffer = random.Random(seed if seed is not None else os.urandom(16)).randbytes(
            buffer_size
        )
        self._view = memoryview(self._buffer)
        self.chunk_size = chunk_size
        self._checksums: dict[int, str] = {}

    @property
    def buffer_size(self) -> int:
        return len(self._buffer)

    async def chunks(
        self, size: int, counter: Callable[[int], None] | None = None
    ) -> AsyncIterator[memoryview]:
        """Yield the body of ``size`` bytes as memoryview slices of the shared buffer."""
        view = self._view
        chunk = self.chunk_size
        buf = self.buffer_size
        pos = 0
        remaining = size
        while remaining > 0:
            n = min(chunk, remaining, buf - pos)
            if counter is not None:
                counter(n)
            yield view[pos : pos + n]
            remaining -= n
            pos += n
            if pos == buf:
                pos = 0

    def checksum(self, size: int) -> str:
        """sha256 hex of the body of ``size`` bytes (computed once per size)."""
        if size not in self._checksums:
            digest = hashlib.sha256()
            view = self._view
            whole, rest = divmod(size, self.buffer_size)
            if whole:
                # Hashing the same buffer `whole` times; bounded by size / buffer_size.
                for _ in range(whole):
                    digest.update(view)
            if rest:
                digest.update(view[:rest])
            self._checksums[size] = digest.hexdigest()
        return self._checksums[size]

    def payload(
        self, size: int, counter: Callable[[int], None] | None = None, sized: bool = True
    ) -> AsyncIterablePayload:
        gen = self.chunks(size, counter)
        if sized:
            return SizedStreamPayload(gen, size, content_type="application/octet-stream")
        return AsyncIterablePayload(gen, content_type="application/octet-stream")


# --------------------------------------------------------------------------- results


@dataclass
class LiveCounters:
    """Updated while a run is going; read by a progress printer."""

    bytes: int = 0
    done: int = 0
    errors: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add_bytes(self, n: int) -> None:
        self.bytes += n


@dataclass
class LoadResult:
    scenario: str
    target: str
    op: str
    size: int
    concurrency: int
    requests_planned: int
    requests_ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    bytes: int = 0  # body bytes of the successful requests (sent for uploads, read for gets)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list, repr=False)
    checksums_verified: int = 0
    checksums_missing: int = 0
    file_ids: list[str] = field(default_factory=list, repr=False)
    timed_out: bool = False  # stopped by max_seconds before all requests were sent

    @property
    def req_s(self) -> float:
        return self.requests_ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / MIB / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies_s), q) * 1000.0

    @property
    def p50_ms(self) -> float:
        return self.latency_ms(50)

    @property
    def p90_ms(self) -> float:
        return self.latency_ms(90)

    @property
    def p99_ms(self) -> float:
        return self.latency_ms(99)

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "scenario": self.scenario,
            "target": self.target,
            "op": self.op,
            "size": self.size,
            "concurrency": self.concurrency,
            "requests_planned": self.requests_planned,
            "requests_ok": self.requests_ok,
            "errors": self.errors,
            "error_kinds": dict(self.error_kinds),
            "bytes": self.bytes,
            "elapsed_s": round(self.elapsed_s, 6),
            "req_s": round(self.req_s, 3),
            "mib_s": round(self.mib_s, 3),
            "p50_ms": _round(percentile(lat, 50) * 1000),
            "p90_ms": _round(percentile(lat, 90) * 1000),
            "p99_ms": _round(percentile(lat, 99) * 1000),
            "min_ms": _round(lat[0] * 1000) if lat else None,
            "max_ms": _round(lat[-1] * 1000) if lat else None,
            "checksums_verified": self.checksums_verified,
            "checksums_missing": self.checksums_missing,
            "timed_out": self.timed_out,
        }

    def line(self) -> str:
        return (
            f"{self.scenario:<9} {self.target:<8} c={self.concurrency:<3} "
            f"ok={self.requests_ok}/{self.requests_planned} err={self.errors} "
            f"{self.elapsed_s:7.2f}s {self.req_s:9.1f} req/s {self.mib_s:9.1f} MiB/s "
            f"p50={self.p50_ms:.2f} p90={self.p90_ms:.2f} p99={self.p99_ms:.2f} ms"
            + (f" errors={dict(self.error_kinds)}" if self.error_kinds else "")
        )


def _round(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 4)


class RequestError(Exception):
    """A request that completed with an unexpected status or body."""


# --------------------------------------------------------------------------- client


def make_session(concurrency: int, request_timeout: float = 600.0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=max(1, concurrency), limit_per_host=0, enable_cleanup_closed=False
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=request_timeout, sock_connect=10),
        auto_decompress=False,
        read_bufsize=READ_BUFSIZE,
    )


async def _check_status(resp: aiohttp.ClientResponse, expected: tuple[int, ...]) -> None:
    if resp.status not in expected:
        text = (await resp.content.read(300)).decode("utf-8", "replace").strip()
        raise RequestError(f"HTTP {resp.status}: {text[:120]}")


async def upload_one(
    session: aiohttp.ClientSession,
    target: Target,
    body: BodySource,
    size: int,
    *,
    multipart: bool = False,
    chunked: bool = False,
    counter: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Upload one body; return the server's JSON (``file_id``, ``checksum``, ...)."""
    if multipart:
        part = body.payload(size, counter, sized=True)
        part.set_content_disposition("form-data", name="file", filename="bench.bin")
        writer = aiohttp.MultipartWriter("form-data")
        writer.append_payload(part)
        async with session.post(target.upload_url(), data=writer, headers=target.headers) as resp:
            await _check_status(resp, (200, 201))
            data = await resp.json(content_type=None)
    else:
        file_id = str(uuid.uuid4())
        async with session.put(
            target.put_url(file_id),
            data=body.payload(size, counter, sized=not chunked),
            params=target.put_params(),
            headers=target.headers,
        ) as resp:
            await _check_status(resp, (200, 201))
            data = await resp.json(content_type=None)
        if isinstance(data, dict):
            data.setdefault("file_id", file_id)
    if not isinstance(data, dict):
        raise RequestError("upload answer is not a JSON object")
    return data


async def download_one(
    session: aiohttp.ClientSession,
    target: Target,
    file_id: str,
    *,
    verify: bool = False,
    counter: Callable[[int], None] | None = None,
) -> tuple[int, str | None]:
    """Download and discard; return (bytes read, sha256 hex if ``verify``)."""
    digest = hashlib.sha256() if verify else None
    n = 0
    async with session.get(target.download_url(file_id), headers=target.headers) as resp:
        await _check_status(resp, (200,))
        async for chunk in resp.content.iter_any():
            n += len(chunk)
            if counter is not None:
                counter(len(chunk))
            if digest is not None:
                digest.update(chunk)
    return n, (digest.hexdigest() if digest is not None else None)


async def prepare_files(
    target: Target,
    size: int,
    count: int,
    *,
    body: BodySource | None = None,
    concurrency: int = 2,
    session: aiohttp.ClientSession | None = None,
    max_seconds: float = 600.0,
) -> list[str]:
    """Upload ``count`` files of ``size`` bytes (untimed) and return their ids."""
    res = await run_load(
        target,
        Scenario(
            "put",
            size=size,
            concurrency=min(concurrency, count),
            requests=count,
            max_seconds=max_seconds,
        ),
        body=body,
        session=session,
    )
    if res.errors or len(res.file_ids) < count:
        raise RequestError(
            f"could not prepare {count} x {human_bytes(size)} on {target.name}: "
            f"{dict(res.error_kinds) or 'too slow'}"
        )
    return res.file_ids


async def delete_files(
    target: Target,
    file_ids: Sequence[str],
    *,
    session: aiohttp.ClientSession | None = None,
    concurrency: int = 4,
) -> int:
    """Best-effort delete; returns how many deletes the server acknowledged."""
    own = session is None
    s = session or make_session(concurrency, request_timeout=60)
    sem = asyncio.Semaphore(concurrency)
    ok = 0

    async def one(fid: str) -> None:
        nonlocal ok
        async with sem:
            try:
                async with s.delete(target.delete_url(fid), headers=target.headers) as resp:
                    await resp.read()
                    if resp.status < 300:
                        ok += 1
            except (TimeoutError, aiohttp.ClientError):
                pass

    try:
        await asyncio.gather(*(one(f) for f in file_ids))
    finally:
        if own:
            await s.close()
    return ok


async def run_load(
    target: Target,
    scenario: Scenario,
    *,
    body: BodySource | None = None,
    session: aiohttp.ClientSession | None = None,
    file_ids: Sequence[str] | None = None,
    live: LiveCounters | None = None,
    verify: bool = True,
    verify_download: bool = False,
    request_timeout: float = 600.0,
) -> LoadResult:
    """Run one bounded load: up to ``scenario.requests`` requests at ``concurrency``,
    no new request after ``scenario.max_seconds``."""
    if not target.supports(scenario.op):
        raise ValueError(f"target {target.name} does not support {scenario.op}")
    body = body or BodySource()
    expected = (
        body.checksum(scenario.size)
        if (scenario.moves_bytes and (verify or verify_download))
        else None
    )
    if scenario.op in ("get", "meta") and not file_ids:
        raise ValueError(f"{scenario.op} needs file_ids (see prepare_files)")
    ids = list(file_ids or [])
    live = live or LiveCounters()
    result = LoadResult(
        scenario=scenario.name,
        target=target.name,
        op=scenario.op,
        size=scenario.size,
        concurrency=scenario.concurrency,
        requests_planned=scenario.requests,
    )
    errors: Counter[str] = Counter()
    own = session is None
    s = session or make_session(scenario.concurrency, request_timeout)
    next_index = 0
    start = time.perf_counter()
    deadline = start + scenario.max_seconds
    live.started = start

    async def one(i: int) -> None:
        op = scenario.op
        if op in UPLOAD_OPS:
            data = await upload_one(
                s,
                target,
                body,
                scenario.size,
                multipart=(op == "post"),
                chunked=scenario.chunked,
                counter=live.add_bytes,
            )
            fid = data.get("file_id") or data.get("id")
            if fid:
                result.file_ids.append(str(fid))
            if size := data.get("size"):
                if isinstance(size, int) and size != scenario.size:
                    raise RequestError(f"size mismatch: server says {size}")
            got = normalize_checksum(data.get("checksum"))
            if expected is not None and verify:
                if got is None:
                    result.checksums_missing += 1
                elif got != expected:
                    raise RequestError("checksum mismatch")
                else:
                    result.checksums_verified += 1
            result.bytes += scenario.size
        elif op == "get":
            n, digest = await download_one(
                s, target, ids[i % len(ids)], verify=verify_download, counter=live.add_bytes
            )
            if n != scenario.size:
                raise RequestError(f"short body: {n} != {scenario.size}")
            if digest is not None:
                if digest != expected:
                    raise RequestError("download checksum mismatch")
                result.checksums_verified += 1
            result.bytes += n
        else:
            url = target.metadata_url(ids[i % len(ids)]) if op == "meta" else target.list_url()
            async with s.get(url, headers=target.headers) as resp:
                await _check_status(resp, (200,))
                raw = await resp.read()
            live.add_bytes(len(raw))

    async def worker() -> None:
        nonlocal next_index
        while next_index < scenario.requests:  # bounded by the request count
            if time.perf_counter() >= deadline:
                result.timed_out = True
                return
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                await one(i)
            except (TimeoutError, aiohttp.ClientError, RequestError, OSError, ValueError) as exc:
                key = str(exc) if isinstance(exc, RequestError) else type(exc).__name__
                errors[key[:100]] += 1
                result.errors += 1
                live.errors += 1
            else:
                result.latencies_s.append(time.perf_counter() - t0)
                result.requests_ok += 1
            live.done += 1

    try:
        await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    finally:
        result.elapsed_s = time.perf_counter() - start
        if own:
            await s.close()
    result.error_kinds = dict(errors.most_common(10))
    return result


# --------------------------------------------------------------------------- CLI


async def _cli(args: argparse.Namespace) -> int:
    target = Target(args.target, args.url, kind=args.target, token=args.token)
    scenario = Scenario.parse(
        args.scenario,
        concurrency=args.concurrency,
        requests=args.requests,
        max_seconds=args.max_seconds,
        chunked=args.chunked,
    )
    body = BodySource()
    ids: list[str] = []
    async with make_session(scenario.concurrency, args.request_timeout) as session:
        if scenario.op in ("get", "meta"):
            size = scenario.size or 4 * KIB
            ids = await prepare_files(
                target, size, min(scenario.concurrency, 8), body=body, session=session
            )
        res = await run_load(
            target,
            scenario,
            body=body,
            session=session,
            file_ids=ids,
            verify_download=args.verify_download,
            request_timeout=args.request_timeout,
        )
    print(json.dumps(res.as_dict()) if args.json else res.line())
    return 0 if res.errors == 0 and res.requests_ok > 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--token",
        default=os.environ.get("BENCH_TOKEN"),
        help="bearer token (ours); default $BENCH_TOKEN",
    )
    p.add_argument(
        "--target",
        choices=("ours", "ceiling"),
        default="ours",
        help="URL layout of the deployment (default: ours)",
    )
    p.add_argument(
        "--scenario",
        default="put-1m",
        help="put-SIZE | post-SIZE (multipart) | get-SIZE | meta | list",
    )
    p.add_argument("--concurrency", "-c", type=int, default=8)
    p.add_argument("--requests", "-n", type=int, default=200)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--chunked", action="store_true", help="raw PUT without Content-Length")
    p.add_argument("--verify-download", action="store_true", help="sha256 every download")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    return asyncio.run(_cli(args))


if __name__ == "__main__":
    sys.exit(main())
