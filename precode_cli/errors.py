"""The one exception type that means "the user gave us something we cannot use".

Commands turn a `UserError` into one sentence on stderr and exit code 2; anything else is a
bug in precode and exits 1 (see `precode_cli.cli_support`).
"""


class UserError(Exception):
    """A problem with the user's input: a file, an option, or a mismatch between them."""
