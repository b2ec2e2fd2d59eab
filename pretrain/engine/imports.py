"""DeepSpeed, imported on first use and told which accelerator to use without a GPU."""

from __future__ import annotations

import logging
import os

import torch


class _WithoutAcceleratorChoice(logging.Filter):
    """Drops DeepSpeed's own lines about which accelerator it picked ("Setting accelerator to CPU
    ... unable to detect it"): ``init_distributed`` says which device and backend the run uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "get_accelerator"


def import_deepspeed():
    """DeepSpeed, imported on first use, so that commands which do not train (``--help``,
    ``--print-config``, config errors) never load it. Without a GPU it is told to use its CPU
    accelerator, as ``init_distributed`` does (gloo), instead of guessing aloud."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The filter sits on DeepSpeed's logger before DeepSpeed configures it (it keeps filters).
    deepspeed_log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _WithoutAcceleratorChoice) for f in deepspeed_log.filters):
        deepspeed_log.addFilter(_WithoutAcceleratorChoice())
    import deepspeed

    return deepspeed

