"""Run one command and sample its whole process tree: wall time, CPU time, peak RSS and peak PSS.

The tree is the child, all its descendants, and every process whose environment or command line names the
run's private RAY_TMPDIR (Ray daemonizes gcs_server, raylet and its agents, so they are not descendants of
the driver). Every 50 ms the sampler sums the members' RSS (/proc/PID/statm, cheap). RSS counts a shared
page once per process that maps it (torch's libraries in the driver and each actor, Ray's shared-memory
object store); PSS divides it among them, so the tree's summed PSS is the memory the run really occupies.
PSS (/proc/PID/smaps_rollup) walks page tables: ~5 ms a process, ~35 ms for a Ray run's tree, which
sampled every 200 ms took 17% of one of this machine's two cores and slowed the run it measured by ~2 s.
So PSS is summed only when it could be a new peak (the RSS sum, its upper bound, is above the PSS peak):
when the RSS sum reaches a new peak (at most every 0.5 s) and otherwise every 1 s. A PSS peak shorter than
that may be missed; the merges' memory is a plateau per block, which this catches. The tree is rescanned
every 0.5 s. CPU time is utime + stime per process, taken at its last sample (a process living less than
50 ms is missed).

The machine is shared: the 1-minute load average is recorded before and after each run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def _stat(pid: int) -> tuple[int, int, str, float] | None:
    """(ppid, start time, name, cpu seconds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    close = raw.rfind(b")")
    fields = raw[close + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    return int(fields[1]), int(fields[19]), raw[raw.find(b"(") + 1:close].decode(errors="replace"), cpu


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except OSError:
        return 0


def _pss(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Anon) in bytes."""
    pss = anon = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss_Anon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, anon


def _tagged(pid: int, tag: bytes) -> bool:
    for part in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as fh:
                if tag in fh.read():
                    return True
        except OSError:
            return False
    return False


class TreeSampler(threading.Thread):
    def __init__(self, root_pid: int, tag: str, interval: float = 0.05):
        super().__init__(daemon=True)
        self.root_pid, self.tag, self.interval = root_pid, tag.encode(), interval
        self.stop_event = threading.Event()
        self.peak_rss = self.peak_pss = self.peak_pss_anon = 0
        self.peak_breakdown: list[dict] = []  # the largest members at the PSS peak
        self.cpu: dict[tuple[int, int], float] = {}  # (pid, start) -> cpu seconds at the last sample
        self.names: set[str] = set()
        self._members: dict[int, tuple[int, str]] = {}
        self._tag_cache: dict[tuple[int, int], bool] = {}
        self._last_scan = self._last_pss = 0.0

    def scan(self) -> dict[int, tuple[int, str]]:
        """pid -> (start time, name) of the tree's members now."""
        procs = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := _stat(int(entry))) is not None:
                procs[int(entry)] = stat
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_) in procs.items():
            children.setdefault(ppid, []).append(pid)
        stack = [self.root_pid] if self.root_pid in procs else []
        for pid, (_, start, _, _) in procs.items():
            if pid != os.getpid():
                key = (pid, start)
                if key not in self._tag_cache:
                    self._tag_cache[key] = _tagged(pid, self.tag)
                if self._tag_cache[key]:
                    stack.append(pid)
        chosen: dict[int, tuple[int, str]] = {}
        while stack:  # a tagged process brings its descendants along
            pid = stack.pop()
            if pid not in chosen and pid != os.getpid():
                chosen[pid] = (procs[pid][1], procs[pid][2])
                stack.extend(children.get(pid, ()))
        return chosen

    def sample(self) -> None:
        now = time.monotonic()
        if now - self._last_scan > 0.5:
            self._members, self._last_scan = self.scan(), now
        for pid, (start, _) in list(self._members.items()):
            stat = _stat(pid)
            if stat is None or stat[1] != start:
                del self._members[pid]
                continue
            self.cpu[(pid, start)] = stat[3]
            self.names.add(stat[2])
        rss = sum(_rss(pid) for pid in self._members)
        new_peak = rss > self.peak_rss
        self.peak_rss = max(self.peak_rss, rss)
        if rss > self.peak_pss and now - self._last_pss > (0.5 if new_peak else 1.0):
            self._last_pss = now
            per = {pid: _pss(pid) for pid in self._members}
            pss, anon = sum(p for p, _ in per.values()), sum(a for _, a in per.values())
            if pss > self.peak_pss:
                self.peak_pss, self.peak_pss_anon = pss, anon
                top = sorted(per.items(), key=lambda kv: -kv[1][0])[:8]
                self.peak_breakdown = [{"pid": pid, "name": self._members[pid][1], "pss_mb": round(p / 1e6)}
                                       for pid, (p, _) in top]

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


@dataclass
class Measurement:
    runner: str  # distmerge(1w), distmerge(2w), mergekit, floor, ray-baseline(1w), ...
    method: str
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    peak_pss_anon_bytes: int
    returncode: int
    input_bytes: int
    load_before: float
    load_after: float
    peak_breakdown: list[dict] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    lingering: list[str] = field(default_factory=list)  # tree members still alive after the child exited
    output_tail: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def gbps(self) -> float:
        return self.input_bytes / self.wall_s / 1e9 if self.wall_s > 0 else float("nan")


def _end_stragglers(sampler: TreeSampler, child_pid: int) -> list[str]:
    """Ray processes that outlive the driver belong to the run: give them 15 s, then end them by pid."""
    deadline = time.time() + 15
    while (left := {p: m for p, m in sampler.scan().items() if p != child_pid}) and time.time() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return [f"{name}({pid})" for pid, (_, name) in left.items()]


def measure(runner: str, method: str, cmd: list[str], env: dict, input_bytes: int, timeout: float, cwd: Path,
            log_path: Path) -> Measurement:
    """Run `cmd` in a new session with a private RAY_TMPDIR, sampling its tree until it exits."""
    ray_tmp = tempfile.mkdtemp(prefix="dmb-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    with open(log_path, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**env, "RAY_TMPDIR": ray_tmp}, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid, ray_tmp)
        sampler.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            returncode = proc.wait() or -9
        except BaseException:  # interrupted: end this run's processes (by pid) before leaving
            os.killpg(proc.pid, 9)
            proc.wait()
            sampler.stop()
            _end_stragglers(sampler, proc.pid)
            raise
        wall = time.perf_counter() - start
        sampler.stop()
    lingering = _end_stragglers(sampler, proc.pid)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return Measurement(runner, method, round(wall, 3), round(sum(sampler.cpu.values()), 2), sampler.peak_rss,
                       sampler.peak_pss, sampler.peak_pss_anon, returncode, input_bytes, load_before,
                       load_average(), sampler.peak_breakdown, sorted(sampler.names), lingering,
                       log_path.read_text(errors="replace")[-3000:])
