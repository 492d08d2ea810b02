"""How the code sandbox bounds the memory of a sample's whole process tree.

CGROUP: each sample runs in its own child of a cgroup v2 directory delegated to the service
(`TLM_REWARD_SANDBOX_CGROUP`) with memory.max = memory_mb, memory.swap.max = 0 and pids.max =
max_processes + 2 (the launcher and its init join it before the program exists). The kernel
charges every process of the sample, tmpfs pages included; memory.events says whether its OOM
killer ran.

RLIMIT: without a usable cgroup, each process gets an address space of memory_mb /
max_processes and RLIMIT_NPROC caps the processes, so the sum stays within memory_mb. A share
too small to start Python is refused per sample, never run.

REFUSED: the operator required a cgroup (`TLM_REWARD_SANDBOX_MEMORY_MODE=cgroup`) that is not
usable: code samples are ERROR "sandbox unavailable", never run unbounded.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("tlm.reward.sandbox")

MIB = 1024 * 1024
CONTROLLERS = ("memory", "pids")
# The launcher and its init join the sample's cgroup, so they count towards pids.max.
OWN_PROCESSES = 2
# The runner starts in about 14 MiB of address space (CPython 3.11); 24 leaves room for tests.
MIN_PROCESS_MB = 24
REMOVE_TRIES, REMOVE_PAUSE_S = 300, 0.01


class MemoryMode(enum.Enum):
    CGROUP = "cgroup"
    RLIMIT = "rlimit"
    REFUSED = "refused"


@dataclass(frozen=True)
class MemoryPolicy:
    """The mode in force, why (the reason a cgroup is not used), and the delegated cgroup."""

    mode: MemoryMode
    why: str = ""
    cgroup: Path | None = None

    def address_space_mb(self, memory_mb: int, max_processes: int) -> int:
        """RLIMIT_AS of each process.

        >>> MemoryPolicy(MemoryMode.RLIMIT).address_space_mb(512, 16)
        32
        >>> MemoryPolicy(MemoryMode.CGROUP).address_space_mb(512, 16)  # the cgroup bounds the sum
        512
        """
        if self.mode is MemoryMode.CGROUP:
            return memory_mb
        return memory_mb // max(max_processes, 1)

    def problem(self, memory_mb: int, max_processes: int) -> str | None:
        """Why a sample with these limits cannot run bounded, or None.

        >>> MemoryPolicy(MemoryMode.RLIMIT).problem(128, 16).split(" (")[0]
        'memory_mb / max_processes is 8 MiB per process'
        >>> MemoryPolicy(MemoryMode.REFUSED, "no cgroup").problem(512, 16)
        'sandbox unavailable: no cgroup'
        """
        if self.mode is MemoryMode.REFUSED:
            return f"sandbox unavailable: {self.why}"
        share = self.address_space_mb(memory_mb, max_processes)
        if share < MIN_PROCESS_MB:
            return (
                f"memory_mb / max_processes is {share} MiB per process (rlimit mode: no cgroup), "
                f"below the {MIN_PROCESS_MB} MiB a Python process needs; lower max_processes "
                "or raise memory_mb"
            )
        return None


def choose_policy(mode: str, cgroup: Path | None) -> MemoryPolicy:
    """`mode` is auto (cgroup when usable, else rlimit), cgroup (or refuse) or rlimit."""
    if mode == "rlimit":
        return MemoryPolicy(MemoryMode.RLIMIT, "rlimit mode was asked for")
    why = cgroup_problem(cgroup) if cgroup else "no cgroup configured (TLM_REWARD_SANDBOX_CGROUP)"
    if why is None:
        return MemoryPolicy(MemoryMode.CGROUP, cgroup=cgroup)
    return MemoryPolicy(MemoryMode.REFUSED if mode == "cgroup" else MemoryMode.RLIMIT, why)


def cgroup_problem(root: Path) -> str | None:
    """Why `root` cannot hold per-sample cgroups, or None; a usable one is left with the
    controllers enabled for its children."""
    try:
        controllers = (root / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return f"{root} is not a cgroup v2 directory: {exc.strerror}"
    missing = [c for c in CONTROLLERS if c not in controllers]
    if missing:
        have = " ".join(controllers) or "none"
        return f"{root} lacks the {' and '.join(missing)} controllers (has: {have})"
    if not (root / "memory.swap.max").exists() and _swap_in_use():
        return f"{root}: swap is in use but not accounted (no memory.swap.max)"
    try:
        _enable_controllers(root)
        SampleCgroup.create(root, "probe-" + secrets.token_hex(4), 64, 1).remove()
    except OSError as exc:
        return f"{exc.filename or root}: {exc.strerror}"
    return None


def _enable_controllers(root: Path) -> None:
    enabled = (root / "cgroup.subtree_control").read_text().split()
    wanted = [c for c in CONTROLLERS if c not in enabled]
    if wanted:
        # EBUSY when `root` has processes of its own (cgroup v2's no-internal-process rule).
        (root / "cgroup.subtree_control").write_text(" ".join("+" + c for c in wanted))


def _swap_in_use() -> bool:
    with contextlib.suppress(OSError):
        return len(Path("/proc/swaps").read_text().splitlines()) > 1
    return False


def cgroup_files(memory_mb: int, max_processes: int) -> dict[str, str]:
    """What a sample's cgroup is given.

    >>> cgroup_files(128, 4)
    {'memory.max': '134217728', 'memory.swap.max': '0', 'pids.max': '6'}
    """
    return {
        "memory.max": str(memory_mb * MIB),
        "memory.swap.max": "0",
        "pids.max": str(max_processes + OWN_PROCESSES),
    }


def oom_kills(events: str) -> int:
    """The `oom_kill` count of a memory.events file.

    >>> oom_kills("low 0\\nhigh 0\\nmax 31\\noom 2\\noom_kill 2\\noom_group_kill 0\\n")
    2
    """
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


@dataclass(frozen=True)
class CgroupUsage:
    """What the kernel saw of a sample: processes its OOM killer ended, peak memory."""

    oom_kills: int = 0
    peak_mb: float | None = None


class SampleCgroup:
    """One sample's cgroup: made before the launcher starts, removed after it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, root: Path, name: str, memory_mb: int, max_processes: int) -> SampleCgroup:
        path = root / name
        path.mkdir()
        cgroup = cls(path)
        try:
            for file, value in cgroup_files(memory_mb, max_processes).items():
                # No memory.swap.max: swap is not accounted, and cgroup_problem() checked
                # that none is in use.
                if file != "memory.swap.max" or (path / file).exists():
                    (path / file).write_text(value)
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def usage(self) -> CgroupUsage:
        kills, peak = 0, None
        with contextlib.suppress(OSError, ValueError):
            kills = oom_kills((self.path / "memory.events").read_text())
        with contextlib.suppress(OSError, ValueError):  # memory.peak: Linux 5.19+
            peak = int((self.path / "memory.peak").read_text()) / MIB
        return CgroupUsage(kills, peak)

    def remove(self) -> None:
        """Kill what is left (cgroup.kill, Linux 5.14+), then rmdir once it is empty."""
        with contextlib.suppress(OSError):
            (self.path / "cgroup.kill").write_text("1")
        for _ in range(REMOVE_TRIES):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    break
            time.sleep(REMOVE_PAUSE_S)  # dying processes still charged to it
        log.warning("sandbox_cgroup_left", path=str(self.path))
