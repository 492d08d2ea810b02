"""Sandbox launcher, run as `python -I -S sandbox_launcher.py CONFIG_JSON` (stdlib only).

It enters new mount, network, PID, IPC and UTS namespaces (plus a user namespace when not
root), builds a minimal read-only root (system libraries and the Python install) with the
scratch directory as the only writable place, then forks the program as PID 1 of the new PID
namespace: chrooted, rlimited and, when started as root, running as an unprivileged uid.
Exit status: the program's, 128 + signal if it was killed, 90 if the sandbox could not be built.
"""

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
PR_SET_PDEATHSIG = 1
UNAVAILABLE = 90

libc = ctypes.CDLL(None, use_errno=True)


def fail(message):
    sys.stderr.write("sandbox unavailable: " + message + "\n")
    sys.exit(UNAVAILABLE)


def check(result, what):
    if result != 0:
        fail(what + ": " + os.strerror(ctypes.get_errno()))


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


def build_root(root, binds, scratch):
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in binds:
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
    os.makedirs(root + "/scratch")
    mount(scratch, root + "/scratch", None, MS_BIND | MS_NOSUID | MS_NODEV)


def limit(cfg):
    cpu = cfg["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = cfg["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    file_bytes = cfg["max_file_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_child(cfg, as_root):
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chroot(cfg["root"])
    os.chdir("/scratch")
    limit(cfg)
    if as_root:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", *cfg["argv"]], {})


def main():
    cfg = json.loads(sys.argv[1])
    as_root = os.geteuid() == 0
    enter_namespaces(as_root)
    build_root(cfg["root"], cfg["binds"], cfg["scratch"])
    pid = os.fork()
    if pid == 0:
        try:
            run_child(cfg, as_root)
        finally:
            os._exit(UNAVAILABLE)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sys.exit(128 + os.WTERMSIG(status))
    sys.exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
