"""How bench/suite.py loads a server: wrk runs (plain, Lua-scripted, paced) and
the gateway's memory while it does.

wrk's own output is parsed by bench/proxy.py's :func:`~proxy.parse_wrk`; this
adds the transfer rate, the Lua scripts the rows need (a 10 MiB POST, paths
spread over 10,000 routes, a paced load) and a sampler of a process's
``VmRSS`` / ``VmHWM``.

Pacing: Debian's wrk has no ``-R`` (that is wrk2), but a wrk script may
define ``delay()``, the milliseconds a connection waits before it sends its
next request.  :func:`paced_script` keeps one schedule for the whole run, a
slot every ``1 / rate`` seconds read from the monotonic clock (LuaJIT's FFI,
``clock_gettime``): each call takes the next slot and waits until it.  So
requests leave at the rate asked for whatever the latency, as long as a
connection is free; wrk waits whole milliseconds, so a request leaves within
about a millisecond of its slot, and the schedule never drifts.  wrk measures
each request from the moment it is sent: when every connection is busy (a
stall longer than connections x interval), the requests behind it leave late
and their waiting is not counted (wrk2's "coordinated omission" correction is
missing).  At half the maximum rate over 32 connections that takes a stall of
many milliseconds, and both sides of the comparison (the gateway, the
upstream directly) are measured the same way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import proxy
from proxy import BenchError, Pinning

_BINARY_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class WrkRun:
    """One wrk invocation: one thread by default, ``--latency``, a generous timeout."""

    url: str
    seconds: int
    connections: int
    threads: int = 1
    script: Path | None = None
    headers: tuple[str, ...] = ()
    #: wrk's request timeout: a 10 MiB upload on a busy machine may take more than wrk's default 2 s.
    timeout: int = 10
    #: Arguments for the script's ``init(args)`` (after the URL).
    script_args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        argv = [
            "wrk", f"-t{self.threads}", f"-c{self.connections}", f"-d{self.seconds}s",
            f"--timeout={self.timeout}s", "--latency",
        ]  # fmt: skip
        for header in self.headers:
            argv += ["-H", header]
        if self.script is not None:
            argv += ["-s", str(self.script)]
        return [*argv, self.url, *self.script_args]


@dataclass
class WrkResult:
    requests_per_sec: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: int
    #: wrk's Transfer/sec: bytes *received* per second (headers included).
    received_bytes_per_sec: float | None
    output: str = field(default="", repr=False)

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def parse(text: str) -> WrkResult:
    stats = proxy.parse_wrk(text)
    transfer = re.search(r"^Transfer/sec:\s+([\d.]+)([KMGT]?)B\s*$", text, re.MULTILINE)
    received = float(transfer.group(1)) * _BINARY_UNITS[transfer.group(2)] if transfer else None
    rps, requests = stats["requests_per_sec"], stats["requests"]
    assert rps is not None and requests is not None
    return WrkResult(
        requests_per_sec=float(rps),
        requests=int(requests),
        p50_ms=stats["p50_ms"],
        p99_ms=stats["p99_ms"],
        non_2xx=int(stats["non_2xx"] or 0),
        socket_errors=int(stats["socket_errors"] or 0),
        received_bytes_per_sec=received,
        output=text,
    )


class Wrk:
    """Runs wrk (pinned to *cpu* under ``--pin``); :meth:`kill` ends a run in progress."""

    def __init__(self, cpu: str) -> None:
        self.cpu = cpu
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self, run: WrkRun) -> WrkResult:
        argv = Pinning.wrap(self.cpu, run.argv())
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._proc = proc
        try:
            out, _ = proc.communicate(timeout=run.seconds + run.timeout + 30)
        except subprocess.TimeoutExpired:
            out = b""
        finally:
            self.kill()
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise BenchError(f"wrk exited with {proc.returncode} against {run.url}:\n{text}")
        try:
            return parse(text)
        except ValueError as e:
            raise BenchError(f"cannot read wrk's output ({e}):\n{text}") from None

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


# --------------------------------------------------------------------------
# Lua scripts


def upload_script(size: int) -> str:
    """Every request a POST of *size* bytes (wrk builds the request once)."""
    return f"""-- generated by bench/load.py: a {size}-byte POST
wrk.method = "POST"
wrk.body = string.rep("u", {size})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def paths_script(paths: list[str]) -> str:
    """Requests spread over *paths*: a fixed stride coprime with their number visits each in turn
    in a scattered order, without the cost of a random number per request.

    The script's argument is how many requests earlier runs sent: a run
    continues the cycle where the last one stopped.
    """
    count = len(paths)
    stride = next(s for s in (7919, 7907, 7901, 1) if count % s != 0)
    table = ",\n".join(f'  "{p}"' for p in paths)
    return f"""-- generated by bench/load.py: GETs spread over {count} paths
local paths = {{
{table}
}}
local count = {count}
local i = 0
init = function(args)
  i = (tonumber(args[1] or "0") * {stride}) % count
end
request = function()
  local path = paths[i + 1]
  i = (i + {stride}) % count
  return wrk.format(nil, path)
end
"""


def paced_script(rate: float) -> str:
    """Requests sent at *rate* per second in all, on a fixed schedule (see the module docstring)."""
    return f"""-- generated by bench/load.py: {rate:.1f} requests/s on a fixed schedule
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now = ffi.new("bench_timespec")
local interval = {1000.0 / rate:.6f}
local slot = nil

local function clock_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
  return tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
end

delay = function()
  local t = clock_ms()
  if slot == nil then slot = t end
  local wait = slot - t
  slot = slot + interval
  if wait <= 0 then return 0 end
  return math.floor(wait + 0.5)
end
"""


# --------------------------------------------------------------------------
# Paced load


@dataclass
class PacedResult:
    """One paced measurement: the rate asked for, the rate wrk achieved, its latencies."""

    target: str
    rate_asked: float
    rate_achieved: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    note: str = ""
    error: str = ""
    output: str = field(default="", repr=False)


def paced(
    wrk: Wrk,
    target: str,
    url: str,
    rate: float,
    connections: int,
    seconds: int,
    warmup: int,
    workdir: Path,
    headers: tuple[str, ...] = (),
) -> PacedResult:
    """Load *url* at *rate* requests/s over *connections* (after a warm-up at that rate)."""
    result = PacedResult(target, rate)
    script = workdir / f"paced-{target}.lua"
    script.write_text(paced_script(rate))
    run = WrkRun(url, seconds, connections, script=script, headers=headers)
    if warmup:
        wrk.run(replace(run, seconds=warmup))
    measured = wrk.run(run)
    result.rate_achieved = measured.requests_per_sec
    result.p50_ms, result.p99_ms = measured.p50_ms, measured.p99_ms
    result.errors = measured.errors
    result.output = measured.output
    if measured.requests_per_sec < 0.95 * rate:
        result.note = f"fell behind: {measured.requests_per_sec:,.0f} of {rate:,.0f} req/s"
    if measured.errors:
        result.note = "; ".join(
            filter(None, [result.note, f"{measured.non_2xx} non-2xx, {measured.socket_errors} socket errors"])
        )
    return result


# --------------------------------------------------------------------------
# Memory


def status_kib(pid: int, field_name: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of /proc/PID/status, in KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        raise BenchError(f"cannot read /proc/{pid}/status: {e}") from e
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field_name} in /proc/{pid}/status")


class MemorySampler:
    """Samples a process's ``VmRSS`` every *interval* seconds in a thread, from
    :meth:`start` to :meth:`stop`; ``VmHWM`` (the peak the kernel saw) is read at the stop."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.max_rss_kib = 0
        self.samples = 0
        self.hwm_kib: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                rss = status_kib(self.pid, "VmRSS")
            except BenchError:
                return
            self.max_rss_kib = max(self.max_rss_kib, rss)
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        try:
            self.hwm_kib = status_kib(self.pid, "VmHWM")
        except BenchError:
            self.hwm_kib = None


# CPU time of the server being measured.  Requests per second move by 20% and
# more between identical runs on a shared VM; CPU time per request, read from
# /proc around the run, moves much less and is what before/after comparisons
# should use.


def listener_pids(port: int) -> list[int]:
    """The processes holding a socket listening on loopback *port* (nginx: master and worker;
    txgateway with workers: each worker's own SO_REUSEPORT socket, and the supervisor)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    pids: list[int] = []
    if not inodes:
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in fds):
                pids.append(int(entry))
        except OSError:
            continue  # gone, or not ours to read
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of *pids* so far (processes gone meanwhile count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks
