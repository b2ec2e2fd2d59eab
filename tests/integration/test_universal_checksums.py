"""A universal conversion (a checkpoint re-sharded for another number of processes) is checked
against the checksums recorded when it was written: one flipped exponent bit in a converted weight
is found, the conversion is redone from the verified checkpoint, and the run ends as the one that
converted it cleanly."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import python_env, run_module
from tests.helpers import RUN_MOBY
from tests.unit.data_samples import write_counted_shards

pytestmark = pytest.mark.slow

RUN = [*RUN_MOBY, "engine.zero_stage=2", "run.threads=1", "train.progress=false", "data.workers=0",
       "data.image_size=32", "data.global_batch=8", "data.batch_size=4", "data.num_classes=3",
       "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "optim.lr=0.003", "engine.precision=fp32",
       "train.epochs=null", "train.steps=5", "train.ckpt_every=0", "train.log_every=1"]


def flip_exponent_bit(path) -> None:
    """Flip the top exponent bit of the first fp32 weight of DeepSpeed's universal file ``path``
    (a torch file holding ``{"param": tensor, ...}``): -0.05 becomes about -1.7e37. The file keeps its
    size and stays loadable."""
    data = bytearray(path.read_bytes())
    value = torch.load(path, weights_only=True)["param"].detach().flatten()[0].float()
    raw = value.numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0, f"{path}: its first weight's bytes not found"
    data[at + 3] ^= 0x40  # little-endian fp32: the sign and top exponent bits are in the last byte
    path.write_bytes(bytes(data))
    assert abs(float(torch.load(path, weights_only=True)["param"].flatten()[0])) > 1e30


def test_a_flipped_bit_in_the_universal_conversion_is_found_and_the_conversion_redone(tmp_path):
    shards = tmp_path / "shards"
    write_counted_shards(shards, [9, 5, 7, 4, 8, 7])
    recipe = tmp_path / "run.yaml"
    recipe.write_text("{}\n")
    clean, flipped = tmp_path / "clean", tmp_path / "flipped"
    run_module("pretrain", str(recipe), f"data.train={shards}", *RUN, f"run.dir={clean}", "train.stop_at=3")
    shutil.copytree(clean, flipped)

    def on_two(run_dir):
        return run_module("launch", "local", "--nproc", "2", str(recipe), f"data.train={shards}", *RUN,
                          f"run.dir={run_dir}", env=python_env())

    on_two(clean)  # converts step 3 for 2 processes, then trains to the end
    universal = clean / "checkpoints" / "step_00000003" / "universal"
    shutil.copytree(universal, flipped / "checkpoints" / "step_00000003" / "universal")
    weight = sorted((flipped / "checkpoints" / "step_00000003" / "universal" / "zero").glob("*/fp32.pt"))[0]
    flip_exponent_bit(weight)

    done = on_two(flipped)
    assert f"{weight}: corrupt: its sha256 differs" in done.stderr and "converting" in done.stderr
    exported = [load_file(str(d / "export" / "backbone.safetensors")) for d in (clean, flipped)]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0]), "not the clean conversion's run"
