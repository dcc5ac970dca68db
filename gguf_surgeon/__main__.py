"""The process entry point (`gguf-surgeon`, `python -m gguf_surgeon`).

SIGTERM and SIGHUP (what `timeout`, `docker stop`, `kill` and a closed terminal send) are turned
into the same interrupt as Ctrl-C before anything else is imported, so every write cleans up
the same way, and a Ctrl-C during start-up is one `Error:` line too, not a traceback.
"""

import signal
import sys


def run() -> None:
    try:
        from .files import interrupt  # before the handlers: a handler must never import

        def on_signal(signum: int, frame: object) -> None:
            interrupt(signum)

        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, on_signal)
        from .cli import main

        main()
    except KeyboardInterrupt as e:  # before the command group took over (start-up)
        sys.stderr.write("Error: interrupted; no partial output was kept\n")
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))


if __name__ == "__main__":
    run()
