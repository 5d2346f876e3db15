"""CPU-seconds of this process and every process under it, by role (benchmarks/curate_throughput.py):
the driver, Ray's daemons, each stage's actors, subprocesses; and the actors' peak memory together."""

from __future__ import annotations

import os
import threading

import psutil


class CpuMeter:
    """CPU-seconds used by this process and every process under it (Ray's daemons and workers, subprocesses the
    stages run) while the meter runs. Processes are sampled every `every` seconds, so one that ends (an actor
    given back) loses at most its last interval: Ray does not hand the CPU time of ended workers to a parent."""

    def __init__(self, every: float = 0.25):
        self.every = every
        self.seen: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU-seconds when last sampled
        self.start: dict[tuple[int, float], float] = {}
        self.role: dict[tuple[int, float], str] = {}  # what the process is: driver, raylet, ray::face_constraints
        self.actors_rss_peak = 0  # bytes: the largest sum of the Ray actors' resident memory in one sample
        self.stop = threading.Event()

    def sample(self) -> None:
        me, actors_rss = psutil.Process(), 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                role = self.role.get(key, "")
                if not role.startswith("ray::") or role == "ray::IDLE":  # a worker takes its actor's title late
                    self.role[key] = "driver" if proc.pid == me.pid else _role(proc.cmdline())
                self.seen[key] = times.user + times.system
                if self.role[key].startswith("ray::") and self.role[key] != "ray::IDLE":
                    actors_rss += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, IndexError):
                pass
        self.actors_rss_peak = max(self.actors_rss_peak, actors_rss)

    def __enter__(self) -> "CpuMeter":
        self.sample()
        self.start = dict(self.seen)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()

    @property
    def seconds(self) -> float:
        return sum(self.by_role().values())

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, cpu in self.seen.items():
            out[self.role[key]] = out.get(self.role[key], 0.0) + cpu - self.start.get(key, 0.0)
        return out


def _role(cmdline: list[str]) -> str:
    """A Ray worker by its title (`ray::face_constraints`, `ray::IDLE`), another process by its program (a
    Python one by its script)."""
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0].split(".")[0]  # ray::face_constraints.run: the actor, busy
    if "python" in os.path.basename(cmdline[0]):
        return next((os.path.basename(a) for a in cmdline[1:] if not a.startswith("-")), "python")
    return os.path.basename(cmdline[0])
