"""The ``digitgen`` command's entry point (also ``python -m digitgen``)."""

import signal

# runtime.signals.INTERRUPTING_SIGNALS, which cannot be imported here without loading the runtime
STOP_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}


def hold_stop_signals() -> None:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the command's handlers are in place (``digitgen.cli`` lets them
    through then): loading the command (numpy, onnxruntime) takes a moment, and a stop signal in that moment
    then ends it as one during its work does, with the same words, not with a traceback. Outside the command's
    handlers they are ignored, so that once it has stopped, a second one (a scheduler's SIGTERM after Ctrl-C)
    cannot end the process while it says so and exits 130."""
    if hasattr(signal, "pthread_sigmask"):  # POSIX; the threads started while loading inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        for signum in STOP_SIGNALS:  # held, a signal that comes now stays pending for the command's handler
            signal.signal(signum, signal.SIG_IGN)


def run() -> None:
    """Run the ``digitgen`` command, stop signals held while it loads."""
    hold_stop_signals()
    from digitgen.cli import main

    main()


if __name__ == "__main__":
    run()
