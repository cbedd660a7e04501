"""The one exception for input the course cannot use, raised where the input is checked.

`UserError`'s message names the input, says what is wrong with it and what to do. The command
line prints it as one line, `llmbook <command>: <message>`, and exits with status 2; any other
exception is a bug and keeps its traceback (`LLMBOOK_DEBUG=1` shows one for user errors too).
It is a `ValueError`, so a notebook's `except ValueError` catches it as well.
"""


class UserError(ValueError):
    """A file, setting, prompt or command the user gave that cannot be used."""
