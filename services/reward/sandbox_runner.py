"""Runs inside the sandbox (stdlib only): compiles tests.py (a syntax error there is reported
as `tests_error` before any user code runs), executes solution.py, then tests.py, and writes
one verdict line tagged with a per-run nonce.

The nonce comes from fd 3, read and closed before any user code runs, and lives only in a
closure cell; exec, compile and os.write are bound before user code can patch them. This stops
the cheap forgeries (reading the nonce from argv, replacing builtins.exec). It cannot stop a
determined program: solution and tests share one interpreter, so code that walks frames or the
heap, or returns objects whose __eq__ always holds, can still pass (see the README).
"""

import builtins
import json
import os
import sys
import traceback


def make_reporter():
    nonce = os.read(3, 64).decode()
    os.close(3)
    write, dumps = os.write, json.dumps

    def report(verdict):
        write(1, ("\n" + nonce + dumps(verdict) + "\n").encode())

    return report


def main():
    report = make_reporter()
    run, build, print_exc, flush = (
        builtins.exec,
        builtins.compile,
        traceback.print_exc,
        sys.stdout.flush,
    )
    with open("tests.py") as f:
        tests_source = f.read()
    try:
        tests = build(tests_source, "tests.py", "exec")
    except (SyntaxError, ValueError, RecursionError) as exc:
        # Before any user code ran: the row's tests are broken (UNSCORABLE), not the program.
        report({"ran": False, "passed": False, "tests_error": getattr(exc, "msg", str(exc))})
        os._exit(1)
    with open("solution.py") as f:
        solution = build(f.read(), "solution.py", "exec")
    namespace = {"__name__": "__main__"}
    verdict = {"ran": False, "passed": False}
    try:
        run(solution, namespace)
        verdict["ran"] = True
        run(tests, namespace)
        verdict["passed"] = True
    except BaseException:
        print_exc()
    flush()
    report(verdict)
    os._exit(0 if verdict["passed"] else 1)


if __name__ == "__main__":
    main()
