"""The one error of the interop package: bad input, reported in one line naming the file, key or tensor."""


class ConversionError(ValueError):
    """A checkpoint, config or output directory that cannot be converted; the message names the file, key or
    tensor (the command line prints it in one line and exits with code 2)."""
