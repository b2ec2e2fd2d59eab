"""How every command (pretrain, finetune, launch, the data tools) reports what went wrong: one line,
``error: MESSAGE``, on stderr, no traceback. Exit code 2 for what the user must fix (a UserError:
the message names the config key, file or value), 1 for a run that failed once started (the failures
its command names). Light on purpose: imported before any config is read."""

from __future__ import annotations

import sys
from typing import Callable

USER_ERROR_EXIT_CODE = 2
FAILED_EXIT_CODE = 1


class UserError(Exception):
    """Base of the errors the user fixes (ConfigError, ShardError, RunDirBusy, WeightsError, WriteError)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; the message names the file. Raised
    by the engine's shards and by pretrain.state alike, so it lives below both."""


def reported(run: Callable[..., int], *args, failures: tuple[type[BaseException], ...] = ()) -> int:
    """``run(*args)``'s exit code, with a UserError or one of ``failures`` reported as ``error: ...``."""
    try:
        return run(*args)
    except UserError as e:
        return _report(e, USER_ERROR_EXIT_CODE)
    except failures as e:
        return _report(e, FAILED_EXIT_CODE)


def _report(error: BaseException, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code
