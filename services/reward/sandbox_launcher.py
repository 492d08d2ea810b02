"""Sandbox launcher, run as `python -I -S sandbox_launcher.py CONFIG_JSON` (stdlib only).

It enters new mount, network, PID, IPC and UTS namespaces (plus a user namespace when not
root), builds a minimal read-only root (system libraries and the Python install) with a
size-limited tmpfs as the only writable place (`/scratch`), and pivots into it, detaching the
host's root. It then forks an init (PID 1 of the new PID namespace, never runs user code) that
forks the program: rlimited, stripped of every capability (bounding set, ambient, capset, no
new privileges) and, when started as root, running as an unprivileged uid.

The init observes the program with wait4 and writes what it saw (exit status or signal, CPU
time, peak RSS, processes left behind, largest file) as one JSON line to the status file, which
was opened before any fork with O_CLOEXEC and lies outside the sandbox's root: the program can
neither reach nor forge it. When init exits, the kernel kills everything left in the namespace;
init dies with the launcher (PR_SET_PDEATHSIG), so killing the launcher's process group ends it.

Memory: given a cgroup (the sample's own), the launcher moves itself into it first, so init and
every process of the program are charged to it; the address-space rlimit is what the service
computed (memory_mb, or memory_mb / max_processes when there is no cgroup).
"""

import contextlib
import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SOURCES = ("solution.py", "tests.py", "runner.py")
NONCE_FD = 3

libc = ctypes.CDLL(None, use_errno=True)


class Unavailable(Exception):
    """The sandbox could not be built: an infrastructure failure, never the program's."""


def check(result, what):
    if result != 0:
        raise Unavailable(what + ": " + os.strerror(ctypes.get_errno()))


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), "mount " + target)


def enter_namespaces(as_root):
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(flags | (0 if as_root else CLONE_NEWUSER)), "unshare")
    if not as_root:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def build_root(cfg, sources, as_root):
    root = cfg["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in cfg["binds"]:
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
            continue
        if not os.path.isdir(path):
            continue
        os.makedirs(target, exist_ok=True)
        mount(path, target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_REC)
    scratch = root + "/scratch"
    os.makedirs(scratch)
    owner = f",uid={cfg['uid']},gid={cfg['uid']}" if as_root else ""
    options = f"size={cfg['scratch_mb']}m,nr_inodes={cfg['scratch_inodes']},mode=0700" + owner
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for name, data in sources.items():
        with open(os.path.join(scratch, name), "wb") as f:
            f.write(data)
        if as_root:
            os.chown(os.path.join(scratch, name), cfg["uid"], cfg["uid"])
    pivot(root)


def pivot(root):
    """pivot_root into `root` and detach the old root: unlike chroot, nothing of the host's
    tree is left to climb back to."""
    os.chdir(root)
    os.mkdir(".old")
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise Unavailable("pivot_root: unsupported machine " + os.uname().machine)
    check(libc.syscall(number, b".", b".old"), "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old", MNT_DETACH), "umount old root")
    os.rmdir("/.old")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def limit(cfg):
    cpu = cfg["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = cfg["address_space_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    file_bytes = cfg["max_file_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]


def drop_bounding_set():
    """Empty the bounding and ambient sets (needs CAP_SETPCAP, so before setuid): an execve,
    even as uid 0 of a user namespace, cannot grant anything back."""
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if cap == 0:
        raise Unavailable("cannot drop the capability bounding set")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def clear_capabilities():
    header, data = CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (CapData * 2)()
    check(libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def run_program(cfg, as_root, nonce):
    # The nonce reaches the runner through a pipe it reads and closes before user code runs.
    read_end, write_end = os.pipe()
    os.write(write_end, nonce.encode())
    os.close(write_end)
    os.dup2(read_end, NONCE_FD)  # inheritable; every other fd of ours is O_CLOEXEC
    os.chdir("/scratch")
    limit(cfg)
    drop_bounding_set()
    if as_root:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    clear_capabilities()
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # After setuid, which clears the parent-death signal.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", "runner.py"], {})


def largest_file():
    sizes = [0]
    for base, _, files in os.walk("/scratch"):
        for name in files:
            with contextlib.suppress(OSError):
                sizes.append(os.lstat(os.path.join(base, name)).st_size)
    return max(sizes)


def init(cfg, as_root, status_fd):
    """PID 1 of the namespace: runs the program, reports on it, then takes everything left
    with it (the kernel kills a PID namespace whose init exits)."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Closed by a successful execve (O_CLOEXEC); carries the reason when setup fails.
    error_read, error_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(error_read)
            run_program(cfg, as_root, cfg["nonce"])
        except BaseException as exc:
            os.write(error_write, ("program setup: " + repr(exc)).encode())
        finally:
            os._exit(127)
    os.close(error_write)
    setup_error = os.read(error_read, 4096).decode(errors="replace")
    _, status, usage = os.wait4(pid, 0)
    if setup_error:
        raise Unavailable(setup_error)
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)  # everything else in the namespace
    lingering = 0
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
        lingering += 1
    vfs = os.statvfs("/scratch")
    report = {
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        # Every process init reaped, orphans included, not only the program's own tree.
        "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "lingering": lingering,
        "largest_file": largest_file(),
        "scratch_full": vfs.f_bavail == 0 or vfs.f_favail == 0,
    }
    os.write(status_fd, (json.dumps(report) + "\n").encode())


def join_cgroup(path):
    """Move this process into the sample's cgroup: init and the program inherit it."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        raise Unavailable("join cgroup " + path + ": " + (exc.strerror or str(exc))) from exc


def main():
    cfg = json.loads(sys.argv[1])
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    status_fd = os.open(cfg["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    as_root = os.geteuid() == 0
    try:
        if cfg.get("cgroup"):
            join_cgroup(cfg["cgroup"])
        sources = {}
        for name in SOURCES:
            with open(os.path.join(cfg["src"], name), "rb") as f:
                sources[name] = f.read()
        enter_namespaces(as_root)
        build_root(cfg, sources, as_root)
    except (Unavailable, OSError) as exc:
        os.write(status_fd, (json.dumps({"unavailable": str(exc)}) + "\n").encode())
        sys.exit(1)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            init(cfg, as_root, status_fd)
            code = 0
        except BaseException as exc:
            os.write(status_fd, (json.dumps({"unavailable": "init: " + repr(exc)}) + "\n").encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    sys.exit(0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 1)


if __name__ == "__main__":
    main()
