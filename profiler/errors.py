"""The one exception the CLI turns into "attnprof: error: <reason>" and exit code 2."""


class AttnprofError(Exception):
    """Bad input or an unusable model/run: the message is one line a user can act on."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
