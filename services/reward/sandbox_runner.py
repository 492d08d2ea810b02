"""Runs inside the sandbox (stdlib only): executes solution.py, then tests.py statement by
statement, and prints one result line tagged with a per-run nonce. Hitting a resource limit is
reported as such, so the service can tell "the tests failed" from "the sandbox stopped it"."""

import ast
import errno
import json
import os
import sys
import traceback

LIMITS = {errno.EFBIG: "file_size", errno.EAGAIN: "processes"}


def classify(exc):
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError):
        return LIMITS.get(exc.errno or 0)
    return None


def main():
    nonce, partial = sys.argv[1], sys.argv[2] == "1"
    with open("solution.py") as f:
        solution = f.read()
    with open("tests.py") as f:
        tests = f.read()
    namespace = {"__name__": "__main__"}
    hit, passed = None, 0
    statements = ast.parse(tests).body
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
        ran = True
    except BaseException as exc:
        hit, ran = classify(exc), False
        traceback.print_exc()
    if ran:
        groups = [[s] for s in statements] if partial else [statements]
        for group in groups:
            try:
                exec(compile(ast.Module(group, []), "tests.py", "exec"), namespace)
                passed += len(group)
            except BaseException as exc:
                hit = hit or classify(exc)
                traceback.print_exc()
    result = {"passed": passed, "total": len(statements), "limit": hit, "ran": ran}
    sys.stdout.flush()
    os.write(1, ("\n" + nonce + json.dumps(result) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
