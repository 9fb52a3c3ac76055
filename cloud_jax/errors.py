"""Exception types and exit codes shared across layers (this module imports nothing)."""

# EX_TEMPFAIL: stopped by SIGTERM (preemption); run the same command again to resume.
PREEMPTED_EXIT_CODE = 75
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130


class ConfigError(ValueError):
    """A config file, override or value that does not fit the schema; the message names the key."""


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as what it claims to be; the message
    names the path and what to do."""


class InputTooLongError(ValueError):
    """Input ``index`` (0-based, in the order given) does not fit ``max_length``, or the model's
    positions, even with its prompt cut (``detail`` says which and by how much). A caller that
    knows where input ``index`` came from (a file's line and field) names that instead of the
    index."""

    def __init__(self, index: int, detail: str):
        super().__init__(f"input {index}: {detail}")
        self.index, self.detail = index, detail


class RowTooLongError(ConfigError):
    """An InputTooLongError named by where its input came from (``where``: a file's line and
    field) instead of its index. ``detail`` is the InputTooLongError's, in the Python settings'
    names (``max_length``), which a command tells in its flags (cloud_jax.cli.common)."""

    def __init__(self, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.detail = where, detail


class GGUFConversionError(ValueError):
    """A GGUF file the converter (cloud_jax.checkpoints.gguf) cannot turn into a Hugging Face
    Llama directory."""


class Preempted(BaseException):
    """A run stopped by SIGTERM: after saving its state (the training loop), or at once anywhere
    else in a command (cloud_jax.cli.common.run_command); the command exits with
    PREEMPTED_EXIT_CODE, and running the same command again resumes it.

    A BaseException, as KeyboardInterrupt is: raised wherever the signal lands, it must not be
    taken for a failure by an ``except Exception`` (a checkpoint that does not read back would
    be set aside as unusable)."""


def one_line(err: BaseException) -> str:
    """An error's text on one line, as a user acts on it: an OSError's path and reason (its own
    text starts with "[Errno 2]"), else the message with its whitespace runs folded (the type's
    name where it has none)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__
