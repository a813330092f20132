"""The one exception type for errors a user can cause.

The CLI prints its message without a traceback and exits non-zero, so the message must name the
file or key at fault and say how to fix it.
"""


class BTXError(Exception):
    """A user-facing error: bad input, bad config, mismatched checkpoints, corrupt files."""
