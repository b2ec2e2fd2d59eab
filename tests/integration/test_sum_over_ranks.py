"""Synchronized batch norm (MoBY's heads) sums over the ranks with a differentiable all-reduce built on
functional collectives: the values and gradients of torch.distributed.nn's, and torch.compile traces
it without a graph break (torch.distributed.nn's breaks MoBY's compiled step on 2 processes)."""

from tests.conftest import run_worker


def test_the_differentiable_sum_over_ranks_matches_torch_and_compiles_in_one_graph():
    run_worker("sum_over_ranks_worker", timeout=300)
