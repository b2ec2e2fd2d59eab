"""Worker of test_sum_over_ranks: vitscale's differentiable all-reduce against torch.distributed.nn's,
in values and gradients, and traced by torch.compile in one graph."""

import torch
import torch.distributed.nn.functional as dist_nn

from pretrain.dist import all_reduce_differentiable, init_distributed, leave_process_group

dist = init_distributed()
torch.manual_seed(dist.rank)
x = torch.randn(4, 3, requires_grad=True)
weights = torch.randn(4, 3)
(all_reduce_differentiable(x) * weights).sum().backward()
ours, x.grad = x.grad, None
(dist_nn.all_reduce(x) * weights).sum().backward()
assert torch.equal(ours, x.grad), (ours, x.grad)
assert torch.equal(all_reduce_differentiable(x), dist_nn.all_reduce(x))
compiled = torch.compile(lambda t: all_reduce_differentiable(t) * 2, backend="aot_eager", fullgraph=True)
assert torch.equal(compiled(x.detach()), dist_nn.all_reduce(x).detach() * 2)
leave_process_group()
