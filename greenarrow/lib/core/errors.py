"""The engine's exceptions that cross stages.

`InjectionError` is raised by injection (greenarrow.lib.inject) and by
SimpleMH processing (greenarrow.lib.simplemh.processing), which injection calls; it
lives here, below both, so neither imports the other for it.
"""

from __future__ import annotations


class InjectionError(Exception):
    """The message cannot be accepted; `permanent` says whether to try again."""

    def __init__(self, permanent: bool, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.text = text
