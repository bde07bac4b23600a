"""Errors a user can fix: each names what is wrong and how to fix it.

Commands turn any `UserError` into one line on stderr and exit status 2; anything else is a
bug and keeps its traceback. This module imports nothing, so every layer may raise them.
"""


class UserError(ValueError):
    """Bad input: a recipe, a flag, a file. The message says where and how to fix it."""


class RankError(UserError):
    """An error of one rank's own (its data, its peers, its disk): every rank prints its own line,
    where the errors every rank shares (a recipe, a file) are printed by rank 0 only."""


class ConfigError(UserError):
    """A recipe or override the user must fix; the message says where and how."""


class DeepSpeedConfigError(UserError):
    """The DeepSpeed config file is missing, unreadable or contradicts the recipe."""


class CheckpointError(UserError):
    """A checkpoint to resume or export is missing, incomplete or does not fit this run."""


class PretrainedError(UserError):
    """The pretrained source cannot be found, read or trusted, or does not fit the architecture."""


class WiseFtError(PretrainedError):
    """The two weight sources cannot be mixed (different architectures)."""


class UnequalBatchError(RankError):
    """Ranks hold batches of different sizes at one step: the contrastive gather needs them equal."""


class DataStallError(RankError):
    """No batch arrived from the data loader workers within the timeout."""


class CollectiveError(RankError):
    """A collective failed or timed out: another rank died or hangs. The message names the step."""


class CheckpointSaveError(CheckpointError, RankError):
    """This rank could not write its part of a checkpoint (a full disk, a lost mount)."""


class DataSetError(UserError):
    """Data on disk is not what its layout promises (a missing split file, a label outside the
    classes, a sample without its caption) or cannot be written as asked."""


class TransformersExportError(UserError):
    """The architecture has something transformers' CLIPModel cannot hold."""


class LossKernelError(UserError):
    """The Triton loss kernels disagree with their PyTorch twin on this device: use the twin."""


def first_line(error: BaseException) -> str:
    """An error's first non-empty line, at most 200 characters."""
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:200]
