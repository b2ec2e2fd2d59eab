"""python -m pretrain.bench NAME [args ...]: run one benchmark (its module's ``main(argv)``)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "views": "pretrain.bench.views",
    "teacher": "pretrain.bench.teacher",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m pretrain.bench {{{','.join(BENCHMARKS)}}} [args ...]", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
