"""Each benchmark runs end to end on tiny settings and ends with its table and ratio line."""

import re

import pytest

from tests.conftest import run_module

RATIO = re.compile(r"^ratio (\d+\.\d+) \(", re.M)


@pytest.mark.parametrize("name, args", [
    ("step", ["--model", "vit_tiny_patch16_224", "--image-size", "32", "--steps", "3", "--warmup", "2",
              "--repeats", "1", "--threads", "1"]),
    ("views", ["--images", "4", "--rounds", "1", "--local-crops", "2"]),
    ("elastic", ["--samples", "20000", "--shards", "200", "--ranks", "16", "--new-ranks", "12", "--workers", "2",
                 "--shuffle-buffer", "50"]),
])
def test_benchmark_prints_a_table_and_a_positive_ratio(name, args):
    out = run_module("pretrain.bench", name, *args, timeout=300).stdout
    ratio = RATIO.search(out)
    assert ratio and float(ratio.group(1)) > 0, out
    assert out.rstrip().splitlines()[-1].startswith("ratio "), out


def test_gpu_benchmark_smoke_on_cpu():
    """The GPU suite's smallest row on the CPU, through the shards with JPEGs decoded by the device path."""
    out = run_module("pretrain.bench", "gpu", "--smoke", "--threads", "1", "--decode", "device", timeout=300).stdout
    lines = out.rstrip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("row "))
    assert "images/s" in lines[header] and "MFU" in lines[header], out
    rows = {}
    for line in lines[header + 1:-1]:
        loop = re.search(r"(vitscale synthetic|vitscale shards \(device\)|bare timm)\s+(\d+\.\d)\s+(\S+)\s+(\d+\.\d+)$",
                         line)
        assert loop, line
        rows[loop.group(1)] = (float(loop.group(2)), loop.group(3), float(loop.group(4)))
    assert set(rows) == {"vitscale synthetic", "vitscale shards (device)", "bare timm"}, out
    assert all(rate > 0 and mfu == "n/a" and memory > 0 for rate, mfu, memory in rows.values()), rows
    ratio = RATIO.search(lines[-1])
    assert ratio and lines[-1].endswith("(vitscale / bare timm images per second)"), lines[-1]
    assert float(ratio.group(1)) == pytest.approx(rows["vitscale synthetic"][0] / rows["bare timm"][0], rel=0.01)


@pytest.mark.parametrize("objective", ["simmim", "dinov2"])
def test_gpu_benchmark_rows_of_the_masked_objectives(objective):
    """The masked objectives' rows: the Trainer and the bare loop both run, on the objective's crops."""
    out = run_module("pretrain.bench", "gpu", "--smoke", "--threads", "1", "--source", "synthetic",
                     "--objective", objective, "--local-crops", "2", "--local-size", "32", timeout=300).stdout
    crops = " 2x64+2x32" if objective == "dinov2" else ""
    rows = [line for line in out.splitlines() if line.startswith(f"vit_tiny_patch16_224 {objective}{crops} ")]
    assert [("vitscale synthetic" in r, "bare timm" in r) for r in rows] == [(True, False), (False, True)], out
    assert RATIO.search(out.rstrip().splitlines()[-1]), out


def test_memory_benchmark_measures_zero3_near_its_theory():
    """ZeRO-3 on 2 processes: what the ranks hold is 16/N bytes per parameter, within the project's 10%
    (DeepSpeed's buckets sized to the model; the small parameters it keeps whole on every rank and
    the buckets are the rest)."""
    out = run_module("pretrain.bench", "memory", "--model", "vit_small_patch16_224", "--kwargs", "{depth: 4}",
                     "--zero", "3", timeout=300).stdout
    row = re.search(r"^\s+3\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)", out, re.M)
    assert row, out
    theory, _, tensors, optimizer = map(float, row.groups())
    assert theory == 8.0, out
    assert optimizer == pytest.approx(6.0, abs=0.05), out  # fp32 masters and two moments, halved
    ratio = RATIO.search(out.rstrip().splitlines()[-1])
    assert ratio and 0.95 < float(ratio.group(1)) < 1.1 and float(ratio.group(1)) == pytest.approx(tensors / theory,
                                                                                                    abs=0.002), out
