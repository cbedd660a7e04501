"""Fixtures shared by the test modules."""

import os
import signal
from collections.abc import Callable
from types import ModuleType

import pytest


@pytest.fixture
def interrupt_at_draw(monkeypatch) -> Callable[..., Callable[[], None]]:
    """patch(module, name, n=3): the task that `module.name` builds presses Ctrl-C (SIGINT to this
    process) as it draws its n-th batch; returns a function that puts the builder back."""

    def patch(module: ModuleType, name: str, n: int = 3) -> Callable[[], None]:
        build = getattr(module, name)

        def interrupted_task(*args):
            task, calls = build(*args), []
            draw = task.draw

            def draw_and_interrupt(*a):
                calls.append(1)
                if len(calls) == n:
                    os.kill(os.getpid(), signal.SIGINT)
                return draw(*a)
            task.draw = draw_and_interrupt
            return task

        monkeypatch.setattr(module, name, interrupted_task)
        return lambda: monkeypatch.setattr(module, name, build)

    return patch
