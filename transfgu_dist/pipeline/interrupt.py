"""Ctrl-C in a job: one line (what was kept, the command that resumes) and exit status 130 within seconds."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from transfgu_dist.pipeline import lease

INTERRUPT_GRACE = 5.0  # seconds from Ctrl-C to the exit, whatever Ray and MLflow are still doing


@contextlib.contextmanager
def ctrl_c(
    kept: Callable[[], str], argv: Sequence[str] | None, cut_short_cleanup: Callable[[], Any] | None = None
) -> Iterator[None]:
    """Ctrl-C in the block: one line on stderr (`kept()`: what was kept; the command that resumes) and exit status
    130 (os._exit, the lease released). The runs in progress are marked KILLED as the block unwinds (tracking.run);
    a shutdown that takes longer than INTERRUPT_GRACE seconds from the signal is cut short after
    `cut_short_cleanup()` (run_all: its MLflow runs marked KILLED)."""
    import signal

    said = threading.Lock()
    command = " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    console = os.dup(2)  # the terminal, also while native_ray_lines_hidden filters fd 2

    def say() -> None:
        if said.acquire(blocking=False):
            os.write(console, f"interrupted: kept {kept()}; resume with: {command}\n".encode())

    def leave() -> None:
        """Exit 130 here, not through interpreter shutdown, which can crash (SIGSEGV) while a helper thread is still
        inside Ray's core worker (ray_setup.fit); the output's lease is released as atexit would."""
        say()
        lease.release_held()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)

    def cut_short() -> None:
        say()
        with contextlib.suppress(Exception):
            if cut_short_cleanup is not None:
                cut_short_cleanup()
        leave()

    def on_sigint(signum: int, frame: Any) -> None:
        timer = threading.Timer(INTERRUPT_GRACE, cut_short)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except KeyboardInterrupt:
        leave()  # the runs are marked KILLED by now
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(console)
