"""Each benchmark runs end to end on tiny settings and ends with its table and ratio line."""

import re

import pytest

from tests.conftest import run_module

RATIO = re.compile(r"^ratio (\d+\.\d+) \(", re.M)


@pytest.mark.parametrize("name, args", [
    ("step", ["--model", "vit_tiny_patch16_224", "--image-size", "32", "--steps", "3", "--warmup", "2",
              "--repeats", "1", "--threads", "1"]),
    ("views", ["--images", "4", "--rounds", "1", "--local-crops", "2"]),
])
def test_benchmark_prints_a_table_and_a_positive_ratio(name, args):
    out = run_module("pretrain.bench", name, *args, timeout=300).stdout
    ratio = RATIO.search(out)
    assert ratio and float(ratio.group(1)) > 0, out
    assert out.rstrip().splitlines()[-1].startswith("ratio "), out
