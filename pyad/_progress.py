"""Progress bars for long steps: tqdm on a terminal, silent otherwise or when
turned off (``pyad --quiet``, or ``pyad._progress.enabled = False``)."""

from tqdm.auto import tqdm

enabled: bool | None = None  # None: show on a terminal only


def bar(iterable=None, **kwargs):
    return tqdm(iterable, disable=None if enabled is None else not enabled, leave=False, **kwargs)
