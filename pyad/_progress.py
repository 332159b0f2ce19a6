"""Progress bars for long steps: tqdm on a terminal, silent otherwise or when
turned off (``pyad --quiet``, or ``pyad._progress.enabled = False``)."""

from tqdm.auto import tqdm

enabled: bool | None = None  # None: show on a terminal only


def bar(iterable=None, disable: bool | None = None, **kwargs):
    """``disable=True`` turns this bar off whatever the setting (e.g. a one-batch job)."""
    off = True if disable else (None if enabled is None else not enabled)
    return tqdm(iterable, disable=off, leave=False, **kwargs)
