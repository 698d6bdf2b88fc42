"""The ``digitgen`` command's entry point (also ``python -m digitgen``)."""

import signal

# runtime.signals.INTERRUPTING_SIGNALS, which cannot be imported here without loading the runtime
STOP_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}


def run() -> None:
    """Run the ``digitgen`` command. Loading it (numpy, onnxruntime) takes a moment: a stop signal in that
    moment is held until the command's handlers are in place (``digitgen.cli`` lets it through then), so it
    ends the command as one during its work does, with the same words, not with a traceback."""
    if hasattr(signal, "pthread_sigmask"):  # POSIX; the threads started while loading inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    from digitgen.cli import main

    main()


if __name__ == "__main__":
    run()
