"""Run a function on a plain thread (outside the caller's torch inference mode, which is per thread, as the tier's
writer and fetch threads run) and return what it raised: the tier's inference-tensor tests share this."""

from __future__ import annotations

import threading
from collections.abc import Callable


def raised_on_a_thread(fn: Callable[[], object]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return errors
