"""The runs of test_compile.py in one process: each case trained by the Trainer eager, then with
engine.compile; for each, the per-step losses, what torch._dynamo counted while the compiled run
trained (graph breaks, graphs), and the keys of its checkpoint and export."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from pretrain.config import load_config
from pretrain.dist import init_distributed
from pretrain.trainer import Trainer
from tests.helpers import end_worker


def main() -> None:
    out_dir, result_path, cases = sys.argv[1:]
    dist = init_distributed()
    torch.set_num_threads(1)
    # Inductor's own random kernels draw other numbers than eager's: the comparison needs eager's.
    torch._inductor.config.fallback_random = True
    # One graph at a time on a small CPU: a pool of compiling processes costs more to start than it saves.
    torch._inductor.config.compile_threads = 1
    results = {}
    for name, (backend, overrides) in json.loads(cases).items():
        compiled = ["engine.compile=true", f"engine.compile_backend={backend}"]
        results[name] = {mode: train(dist, Path(out_dir) / f"{name}-{mode}", [*overrides, *extra])
                         for mode, extra in (("eager", []), ("compiled", compiled))}
    Path(result_path).write_text(json.dumps(results))
    end_worker()


def train(dist, run_dir: Path, overrides: list[str]) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # The synthetic batch's views draw from Python's and numpy's generators, which nothing seeds before.
    random.seed(0)
    np.random.seed(0)
    Trainer(load_config(None, [*overrides, f"run.dir={run_dir}"]), dist).fit()
    counters = torch._dynamo.utils.counters
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {"losses": {r["step"]: r["train/loss"] for r in lines if "train/loss" in r},
            "graph_breaks": sum(counters["graph_break"].values()),
            "break_reasons": list(counters["graph_break"]),
            "graphs": counters["stats"]["unique_graphs"],
            "checkpoint_keys": checkpoint_keys(run_dir / "checkpoints"),
            "export_keys": sorted(safe_open(run_dir / "export/backbone.safetensors", "pt").keys())}


def checkpoint_keys(checkpoints: Path) -> list[str]:
    """The module state-dict keys of the latest checkpoint's model file (DeepSpeed's)."""
    tag = (checkpoints / "latest").read_text().strip()
    model_file, = (checkpoints / tag).glob("*model_states.pt")
    return sorted(torch.load(model_file, map_location="cpu", weights_only=True)["module"])


if __name__ == "__main__":
    main()
