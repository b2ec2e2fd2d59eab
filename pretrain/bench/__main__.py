"""python -m pretrain.bench NAME [options]   (NAME: see BENCHMARKS; NAME --help for its options)"""

from __future__ import annotations

import importlib
import sys

from pretrain.errors import USER_ERROR_EXIT_CODE, reported

BENCHMARKS = {
    "ops": "pretrain.bench.ops",
    "step": "pretrain.bench.step",
    "data": "pretrain.bench.data",
    "views": "pretrain.bench.views",
    "teacher": "pretrain.bench.teacher",
    "gpu": "pretrain.bench.gpu",
    "checksum": "pretrain.bench.checksum",
    "memory": "pretrain.bench.memory",
    "elastic": "pretrain.bench.elastic",
    "remote": "pretrain.bench.remote",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m pretrain.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return USER_ERROR_EXIT_CODE  # as argparse answers a command line it cannot parse
    return reported(importlib.import_module(BENCHMARKS[argv[0]]).main, argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
