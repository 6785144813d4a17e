"""The one exception type users see: the CLI prints it as a single line."""


class WeightportError(Exception):
    """A problem with the input, the output location or the requested conversion.

    The message must stand on its own on one line and name the file and, where there is
    one, the tensor involved.
    """

    def __str__(self) -> str:
        # names come from the files: a tensor called "a\nb" must not break the line
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in super().__str__())


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so it unwinds (and cleans up) as on Ctrl-C."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
