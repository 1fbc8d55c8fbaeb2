"""The compiled engine's graph pass: batched matmuls with a broadcast operand become one GEMM, and
the graph computes what it computed before (float64 against the unfolded graph), on graphs traced
with FakeTensor values as inductor's are."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from twicediff.torch.engines.gemm_fold import FoldBroadcastBmm, fold_broadcast_bmm

aten = torch.ops.aten


def _bmm_count(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.bmm.default)


def products(a2, B3, A3, b2, C3, E3):
    D = B3.shape[0]
    return (torch.bmm(a2.expand(D, -1, -1), B3) * 2,            # broadcast left operand (2-d source)
            torch.bmm(A3, b2.unsqueeze(0).expand(D, -1, -1)),    # broadcast right operand (3-d, one batch)
            torch.bmm(A3.transpose(1, 2).transpose(1, 2), C3),   # nothing broadcast: left alone
            torch.bmm(a2.t().expand(D, -1, -1), E3).sum(0))            # a transposed source


@pytest.mark.parametrize("D", [2, 5])
def test_folded_graph_computes_the_same_products(D):
    gen = torch.Generator().manual_seed(D)
    args = [torch.randn(*s, generator=gen, dtype=torch.float64)
            for s in ((5, 3), (D, 3, 6), (D, 7, 3), (3, 2), (D, 3, 4), (D, 5, 2))]
    gm = make_fx(products, tracing_mode="fake")(*args)
    assert _bmm_count(gm) == 4
    assert fold_broadcast_bmm(gm.graph) == 3
    gm.graph.lint()
    gm.recompile()
    assert _bmm_count(gm) == 1
    got, want = gm(*args), products(*args)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_pass_object_folds_and_names_itself():
    args = [torch.randn(*s) for s in ((5, 3), (2, 3, 6), (2, 7, 3), (3, 2), (2, 3, 4), (2, 5, 2))]
    gm = make_fx(products, tracing_mode="fake")(*args)
    FoldBroadcastBmm()(gm.graph)
    assert _bmm_count(gm) == 1
    assert FoldBroadcastBmm().uuid() == FoldBroadcastBmm().uuid()
