"""All-or-nothing sections: swaps that a Ctrl-C cannot cut in half.

An eager swap assigns variables one by one from Python, and a
`KeyboardInterrupt` (or any exception raised by a signal handler, such as one
installed for `SIGALRM`) can land between any two bytecodes: half the model
would hold averages, and on a swap some raw weights would exist nowhere.
`deferred_signals()` runs its block with every Python-level signal handler
replaced by one that only records the signal; when the block ends, the
recorded signals are handed to their own handlers, in order, so the user's
Ctrl-C still raises, just after the swap is complete.

Python runs signal handlers in the main thread only, so elsewhere there is
nothing to defer. Within a traced `tf.function` a swap is one graph run and
needs no deferral; eager code is what this protects.
"""

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_signals():
    """Runs the block with the process' signal handlers deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def record(signum, frame):
        received.append((signum, frame))

    previous = {}
    try:
        for signum in _handled_signals():
            previous[signum] = signal.signal(signum, record)
        yield
    finally:
        # A signal that arrives while the handlers are put back is recorded
        # or handled by its own handler: either way it is not lost.
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum, frame in received:
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, frame)


def _handled_signals():
    """The signals whose Python handler may raise in the main thread."""
    signums = []
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if callable(handler):
            signums.append(signum)
    return signums


class SwappedIn:
    """`optimizer.averaged_weights()`: the averages in, for the block.

    A class, not a generator: `contextlib`'s `__enter__` runs code after the
    generator's swap, where an interrupt would leave the averages in with no
    `__exit__` to come. Here an interrupt anywhere in `__enter__` swaps back
    before it propagates.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.was_in = None
        self.open = False

    def __enter__(self):
        self.was_in = self.optimizer.averages_swapped_in
        self.open = True
        try:
            if not self.was_in:
                self.optimizer.swap_weights()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc_info):
        self._restore()
        return False

    def __del__(self):
        # An interrupt that lands as `__exit__` starts, before its first
        # line, skips the swap back; the with statement then drops this
        # object, right there.
        if self.open:
            self._restore()

    def _restore(self):
        # Whatever happened in the block (it may have swapped back itself),
        # it leaves the state it found.
        if not self.was_in and self.optimizer.averages_swapped_in:
            self.optimizer.swap_weights()
        self.open = False
