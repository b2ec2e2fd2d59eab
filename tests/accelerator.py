"""What DeepSpeed's accelerator answers about fp16 and bf16 support, forced for the tests.

vitscale's behaviour depends on those answers (DeepSpeed's ``zero.Init`` took its dtype from them,
``check_accelerator`` refuses what they deny), and they differ between machines: DeepSpeed's CPU
accelerator offers fp16 only where oneDNN has fp16 kernels. So the tests choose the answers instead
of inheriting the machine's. ``VITSCALE_TEST_ACCELERATOR`` (e.g. ``fp16=no,bf16=yes``) forces them
for the whole session, in pytest's process and, through tests/accelerator_site/sitecustomize.py on
PYTHONPATH, in every process it starts; .ci/run runs one pass with fp16 denied and one with it
offered. The fixture :func:`force_accelerator` forces them for one test.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SITE = Path(__file__).resolve().parent / "accelerator_site"
_spec = importlib.util.spec_from_file_location("vitscale_test_accelerator_site", SITE / "sitecustomize.py")
site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site)  # forces the session's answers in this process, if any are set
ENV = site.ENV


def with_site_on_path(env: dict) -> dict:
    """``env`` with the forcing ``sitecustomize`` first on PYTHONPATH (once)."""
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SITE)]
    return dict(env, PYTHONPATH=os.pathsep.join([str(SITE), *paths]))


def force_for_session() -> None:
    """Hands the session's forced answers (if any) to every process the tests start."""
    if site.forced_answers():
        os.environ["PYTHONPATH"] = with_site_on_path(dict(os.environ))["PYTHONPATH"]


def answers_of(text: str) -> dict[str, bool]:
    return site.forced_answers(text)


@pytest.fixture
def force_accelerator(monkeypatch):
    """``force_accelerator("fp16=no,bf16=yes")``: those answers in this test's process and in the
    processes it starts from ``os.environ`` (conftest's ``python_env``/``worker_env``)."""

    def force(text: str) -> None:
        answers = answers_of(text)
        import deepspeed.accelerator.cpu_accelerator as cpu

        for name, answer in answers.items():
            monkeypatch.setattr(cpu.CPU_Accelerator, f"is_{name}_supported", lambda self, answer=answer: answer)
        monkeypatch.setenv(ENV, text)
        monkeypatch.setenv("PYTHONPATH", with_site_on_path(dict(os.environ))["PYTHONPATH"])

    return force
