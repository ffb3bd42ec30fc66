"""The one exception the CLI turns into "attnprof: error: <reason>" and exit code 2."""


class AttnprofError(Exception):
    """Bad input or an unusable model/run: the message is one line a user can act on."""
