"""The dense path's owner-computes reduce gives the coordinator's whole-matrix merge bit for bit."""
import torch

from lte.merge import HeadContribution, apply_update, merge_contributions
from lte.net.dense import row_bounds
from lte.net.rounds import as_dense, member_delta


def test_row_sliced_reduce_equals_whole_matrix_merge_bitwise():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r, peers = 37, 23, 4, 5  # rows that do not split evenly
    w = torch.randn(out_f, in_f, generator=g)
    contribs = []
    for i in range(peers):
        f = {"l": (torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g))}
        prev = {"l": (torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g))}
        contribs.append(HeadContribution(f"p{i}", 10 + 7 * i, f, {}, prev))
    # Coordinator: whole matrices, dense-path layers taken as the float32 deltas.
    whole = {"l.weight": w.clone()}
    apply_update(whole, merge_contributions([as_dense(c, ["l"]) for c in contribs], scale=3.0))
    # Owners: each reduces its rows from the members' float32 delta slices; everyone concatenates.
    deltas = {c.head_id: member_delta(*c.factors["l"], c.prev_factors["l"]) for c in contribs}
    parts = []
    for lo, hi in row_bounds(out_f, peers):
        sliced = [HeadContribution(c.head_id, c.samples, {}, {}, None, {"l": deltas[c.head_id][lo:hi]}) for c in contribs]
        upd = merge_contributions(sliced, scale=3.0)
        parts.append((w[lo:hi].double() + upd.deltas["l"]).float())
    assert torch.equal(torch.cat(parts), whole["l.weight"])
    # And the float32 rounding of the deltas is the only difference from the factor path (tiny, not zero).
    factor_path = {"l.weight": w.clone()}
    apply_update(factor_path, merge_contributions(contribs, scale=3.0))
    torch.testing.assert_close(factor_path["l.weight"], whole["l.weight"], atol=1e-4, rtol=1e-5)
    assert not torch.equal(w, whole["l.weight"])


def test_row_bounds_cover_every_row_once():
    for rows, owners in [(10, 3), (7, 7), (128, 5), (3, 2)]:
        b = row_bounds(rows, owners)
        assert b[0][0] == 0 and b[-1][1] == rows
        assert all(b[i][1] == b[i + 1][0] for i in range(owners - 1))
