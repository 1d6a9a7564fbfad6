"""A progress wrapper that stops a measurement midway, as Ctrl-C would: for the resume tests."""

from __future__ import annotations


class Interrupt(Exception):
    pass


def interrupt_after(count: int, desc: str | None = None):
    """Raises `Interrupt` instead of yielding the `count`-th item (0-based) of a progress bar; with `desc`, only
    in the bar of that name (the others run through)."""

    def wrap(items, **kwargs):
        for index, item in enumerate(items):
            if index == count and (desc is None or kwargs.get("desc") == desc):
                raise Interrupt
            yield item

    return wrap
