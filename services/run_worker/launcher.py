"""Launcher of a tool's command: its process group dies with the worker that started it.

Run as `python -I -S launcher.py WORKER_PID -- PROGRAM [ARG...]` in a new session (the worker uses
`start_new_session=True`), so the launcher leads the process group its command runs in. It:

1. kills its whole group with SIGKILL on SIGTERM, SIGINT or SIGHUP;
2. asks Linux for SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`), then checks its parent
   is still WORKER_PID, in case the worker died before that request;
3. starts the command as a child in its own group (stdin from /dev/null, stdout and stderr
   inherited), waits for it and exits the same way: with its exit code, or killed by its signal.

When the command cannot be started it exits with EXEC_FAILED_CODE after writing one line,
EXEC_FAILED_MARKER followed by the reason, to stderr (the command never ran, so nothing else is
there). A SIGKILLed worker thus leaves no tool process behind, except those that left the group
on purpose (setsid, setpgid).

The death signal follows the thread that forked the launcher: start it from a thread that lives as
long as the worker (the event loop's). Standard library only, no project imports: it must start
fast and must not depend on the worker's import path.
"""

from __future__ import annotations

import os
import signal
import sys

EXEC_FAILED_CODE = 127
EXEC_FAILED_MARKER = "runs-launcher: cannot start: "
PR_SET_PDEATHSIG = 1
USAGE = "usage: launcher.py WORKER_PID -- PROGRAM [ARG...]"


def _kill_group(signum: int, frame: object) -> None:
    os.killpg(0, signal.SIGKILL)  # the launcher is in the group: this does not return


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the group dies only on a signal to the launcher
        pass


def _exit_like(status: int) -> None:
    """Exit with the child's wait status: its code, or killed by the signal that killed it."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP keep their default anyway
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # only if that signal did not end us
    os._exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str]) -> None:
    """Launch `argv[3:]` for worker `argv[1]` and exit like it."""
    if len(argv) < 4 or argv[2] != "--" or not argv[1].isdigit():
        print(USAGE, file=sys.stderr)
        os._exit(2)
    worker_pid, command = int(argv[1]), argv[3:]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _kill_group)
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # started without a new session: lead a group of our own all the same
    _die_with_parent()
    if os.getppid() != worker_pid:  # the worker died before prctl: run nothing
        os._exit(1)
    try:
        child = os.posix_spawnp(
            command[0],
            command,
            os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
            # Python ignores SIGPIPE and SIGXFSZ; the command gets them back, as subprocess does.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    except OSError as err:
        os.write(2, f"{EXEC_FAILED_MARKER}{err.strerror or err}\n".encode(errors="replace"))
        os._exit(EXEC_FAILED_CODE)
    _, status = os.waitpid(child, 0)
    _exit_like(status)


if __name__ == "__main__":
    main(sys.argv)
