"""One exception type for everything the user can fix.

The CLI turns a PonderError into a single line on stderr and a non-zero exit; the library raises it with the same
message. Keeping it a ValueError subclass means callers that already catch ValueError keep working.
"""


class PonderError(ValueError):
    """A problem with the user's input (files, arguments, budgets) that they can fix; the message says how."""
