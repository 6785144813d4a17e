"""The one exception type users see: the CLI prints it as a single line."""


class WeightportError(Exception):
    """A problem with the input, the output location or the requested conversion.

    The message must stand on its own on one line and name the file and, where there is
    one, the tensor involved.
    """
