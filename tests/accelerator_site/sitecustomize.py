"""Makes DeepSpeed's accelerator answer ``is_fp16_supported`` / ``is_bf16_supported`` as the
environment says, in every process that has this folder on PYTHONPATH (Python imports
``sitecustomize`` at start-up), so that a test sees what a machine with other answers does.

``VITSCALE_TEST_ACCELERATOR="fp16=no,bf16=yes"`` (either part may be left out: that question keeps
the machine's answer). DeepSpeed is not imported here: its accelerator classes are patched when
DeepSpeed imports them. tests/accelerator.py sets this up for a test and the processes it starts.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

ENV = "VITSCALE_TEST_ACCELERATOR"
MODULES = ("deepspeed.accelerator.cpu_accelerator", "deepspeed.accelerator.cuda_accelerator")


def forced_answers(text: str | None = None) -> dict[str, bool]:
    """``{"fp16": False, ...}`` from ``text`` (default: the environment's); ValueError on a typo,
    so that a misspelt switch never leaves the machine's answer in place unnoticed."""
    text = os.environ.get(ENV, "") if text is None else text
    answers = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in ("fp16", "bf16") or value not in ("yes", "no"):
            raise ValueError(f"{ENV}={text!r}: expected parts like fp16=no or bf16=yes, got {part!r}")
        answers[name] = value == "yes"
    return answers


def patch_class(cls, answers: dict[str, bool]) -> None:
    for name, answer in answers.items():
        setattr(cls, f"is_{name}_supported", lambda self, answer=answer: answer)


def patch_module(module, answers: dict[str, bool]) -> None:
    for cls_name in ("CPU_Accelerator", "CUDA_Accelerator"):
        if hasattr(module, cls_name):
            patch_class(getattr(module, cls_name), answers)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the accelerator modules as usual, and patches their classes once they have run."""

    def __init__(self, answers: dict[str, bool]) -> None:
        self.answers = answers

    def find_spec(self, name, path, target=None):
        if name not in MODULES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run, answers = spec.loader.exec_module, self.answers

        def exec_module(module):
            run(module)
            patch_module(module, answers)

        spec.loader.exec_module = exec_module
        return spec


def install(answers: dict[str, bool]) -> None:
    """Patch the accelerator classes already imported, and those imported later."""
    for name in MODULES:
        if name in sys.modules:
            patch_module(sys.modules[name], answers)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
    if answers:
        sys.meta_path.insert(0, _PatchOnImport(answers))


install(forced_answers())
