"""The one exception type users see.

Every problem a user can cause (a bad path, a layer out of range, a vector made for another model) is
raised as :class:`PersonavecError` with a single-line message; the CLI prints that line and exits 2
instead of a stack trace.
"""

from __future__ import annotations


class PersonavecError(Exception):
    """A user-facing error whose message is one line that says what is wrong and what to do."""
