"""User-facing errors: one line each, printed by the CLI as ``error: ...`` (exit 2) without a traceback."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" for none): what a one-line error quotes."""
    return (str(e).strip().splitlines() or [""])[0]


def one_line(text: str) -> str:
    """``text`` with each unprintable character (a newline or escape in a path, a byte a path does not decode) as its
    Python escape: an error quoting a name stays one line, and shows the name as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class VaeDistError(Exception):
    """A problem with the user's input or environment that the user can fix; anything else is a bug."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(VaeDistError): ...  # a config value is missing, unknown, of the wrong type or out of range
class DataError(VaeDistError): ...  # the dataset's files are missing, truncated or not what they should be
class ArtifactError(VaeDistError): ...  # the artifact directory cannot be used as asked
class CheckpointError(VaeDistError): ...  # no usable checkpoint, or one that does not match the run
class TrainingError(VaeDistError): ...  # training cannot go on (for example a non-finite loss)
class MainProcessError(VaeDistError): ...  # on the other ranks: the main process failed in work it does for all
class OutputError(VaeDistError): ...  # standard output cannot take a command's result (closed, full, reader gone)
