"""`spatial_entropy` traced whole: `torch.export` and `torch.compile(fullgraph=True)` against eager, on the CPU.

The entropy has no data-dependent Python control flow or shape (region slots fixed by the grid,
bad maps masked with `torch.where`), and the labelling is one registered operator,
`sar_hf::connected_components`, that graphs keep as a single opaque node. With the propagation
labelling (the GPU path) nothing reads a tensor's values on the host.
"""

import pytest
import torch
from test_components import count_host_reads

import sar_hf
from sar_hf import entropy

GRID = (7, 5)


class ScoreHead(torch.nn.Module):
    """A tiny linear layer that scores a grid for each head, then its spatial entropy."""

    def __init__(self, features=6, heads=3, return_skipped=False, algorithm="auto"):
        super().__init__()
        self.heads, self.return_skipped, self.algorithm = heads, return_skipped, algorithm
        self.linear = torch.nn.Linear(features, heads * GRID[0] * GRID[1])

    def forward(self, x):
        scores = self.linear(x).reshape(x.shape[0], self.heads, -1)
        return sar_hf.spatial_entropy(scores, GRID, algorithm=self.algorithm, return_skipped=self.return_skipped)


def loss_and_grads(module, x):
    """(output, {parameter name: gradient of the loss}) of one forward and backward."""
    out = module(x)
    loss = out[0] if isinstance(out, tuple) else out
    # A compiled module names its parameters after the module it wraps.
    params = {name.removeprefix("_orig_mod."): param for name, param in module.named_parameters()}
    return out, dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def assert_same_loss_and_grads(got_module, module, x):
    """Loss and parameter gradients (matched by name) within 1e-5 relative of the eager module's."""
    expected, expected_grads = loss_and_grads(module, x)
    got, got_grads = loss_and_grads(got_module, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name  # the comparison is not vacuous
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-8)


def model_and_input(batch=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ScoreHead(**kwargs), torch.randn(batch, 6)


def test_export_matches_eager_with_the_labelling_as_one_node():
    module, x = model_and_input()
    program = torch.export.export(module, (x,))
    ops = [
        node.target
        for graph in program.graph_module.modules()
        if isinstance(graph, torch.fx.GraphModule)
        for node in graph.graph.nodes
        if node.op == "call_function"
    ]
    assert ops.count(torch.ops.sar_hf.connected_components.default) == 1
    # The exported module holds its own copies of the parameters, under the same names.
    assert_same_loss_and_grads(program.module(), module, x)


def test_exported_program_skips_non_finite_maps_without_a_branch():
    # The NaN check is a tensor mask, not Python control flow: one exported graph serves
    # clean and bad inputs alike.
    module, x = model_and_input(return_skipped=True)
    exported = torch.export.export(module, (x,)).module()
    bad = x.clone()
    bad[1, 0] = float("nan")  # every map of image 1 turns NaN
    for sample in (x, bad):
        (got, skipped), (expected, expected_skipped) = exported(sample), module(sample)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
        assert skipped.item() == expected_skipped.item()
    assert exported(bad)[1].item() == module.heads


@pytest.mark.parametrize("return_skipped", [False, True])
def test_compile_fullgraph_matches_eager(return_skipped):
    torch._dynamo.reset()
    module, x = model_and_input(seed=1, return_skipped=return_skipped)
    assert_same_loss_and_grads(torch.compile(module, fullgraph=True), module, x)


def test_propagation_path_reads_nothing_on_the_host(monkeypatch):
    # The GPU path (propagation labelling) on CPU tensors: forward and backward never read a
    # tensor's values on the host, so on a GPU they never synchronise.
    def propagation(maps, connectivity, algorithm="auto"):
        return sar_hf.components.label_maps(maps, connectivity, "propagation")

    monkeypatch.setattr(entropy, "label_maps", propagation)
    module, x = model_and_input(batch=8, seed=2)
    scores = module.linear(x).reshape(8, 3, -1).detach().requires_grad_()
    host_reads = count_host_reads(monkeypatch)
    per_map = sar_hf.spatial_entropy(scores, GRID, reduction="none")
    per_map.mean().backward()
    assert sum(host_reads.values()) == 0, host_reads
    monkeypatch.undo()  # the scipy labelling again, for the comparison
    torch.testing.assert_close(per_map.detach(), sar_hf.spatial_entropy(scores.detach(), GRID, reduction="none"))
