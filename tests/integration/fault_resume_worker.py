"""Resume attempts that must be refused (run by test_faults.py, one process): per case, a Trainer
built from a config tries to resume a run dir; writes, per case, the error (or None) and whether
the Trainer's weights were left exactly as initialized."""

from __future__ import annotations

import json
import sys

import torch

from pretrain.config import load_config
from pretrain.dist import init_distributed
from pretrain.trainer import Trainer
from tests.helpers import end_worker


def main() -> None:
    result_path, cases = sys.argv[1:]
    dist = init_distributed()
    torch.set_num_threads(1)
    results = {}
    for name, (recipe, overrides) in json.loads(cases).items():
        trainer = Trainer(load_config(recipe, overrides), dist)
        before = {k: v.detach().clone() for k, v in trainer.objective.state_dict().items()}
        try:
            trainer.resume()
            error = None
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        after = trainer.objective.state_dict()
        untouched = all(torch.equal(before[k], after[k]) for k in before)
        results[name] = {"error": error, "untouched": untouched, "step": trainer.step}
    with open(result_path, "w") as f:
        json.dump(results, f)
    end_worker()


if __name__ == "__main__":
    main()
