import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalable_shampoo.blocks import block_views, make_plan, merge_groups, merge_small_dims


def test_merge_small_dims_examples():
    # fan-in grouping: the leading dim alone, the rest merged from the right (size-1 dims dropped)
    assert merge_small_dims((32, 32, 3, 3), 1024) == (32, 288)
    assert merge_small_dims((256, 256, 3, 3), 1024) == (256, 256, 9)
    assert merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 1024) == (2, 512, 2048, 12)
    assert merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 4096) == (2, 512, 2048, 12)
    assert merge_small_dims((4, 5, 6), 10**6) == (4, 30)  # never a matrix into a vector
    assert merge_small_dims((1, 7, 1), 4) == (7,)
    assert merge_small_dims((1, 1), 4) == ()
    assert merge_small_dims((), 4) == ()
    assert merge_groups((8, 1, 3, 3), 1024) == ((0,), (2, 3))
    assert merge_groups((8, 4, 3, 3), 1024, axes=(0, 1)) == ((0,), (1,), (2, 3))


def test_format_1_rule_merged_from_the_left():
    assert merge_small_dims((3, 3, 128, 128), 1024, rule="left") == (9, 128, 128)
    assert merge_small_dims((32, 32, 3, 3), 1024, rule="left") == (1024, 9)
    assert merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 1024, rule="left") == (1024, 2048, 12)
    assert merge_small_dims((4, 5, 6), 10**6, rule="left") == (4, 5, 6)
    assert merge_groups((8, 8, 8, 8), 512, rule="left") == ((0, 1, 2), (3,))
    assert merge_groups((8, 8, 8, 8), 512) == ((0,), (1, 2, 3))


def test_blocking_a_matrix():
    plan = make_plan((1000, 300), 256, 4096, 256, False)
    assert plan.merged == (1000, 300)
    assert len(plan.blocks) == 4 * 2
    assert plan.blocks[-1].shape == (1000 - 3 * 256, 300 - 256)
    assert all(b.axes == (0, 1) for b in plan.blocks)
    assert plan.blocks[0].exponent(None) == 4 and plan.blocks[0].exponent(2) == 2


def test_embedding_is_one_sided_and_its_long_axis_unsplit():
    plan = make_plan((100_000, 64), 1024, 4096, 1024, False)
    assert [(b.shape, b.axes) for b in plan.blocks] == [((100_000, 64), (1,))]
    assert plan.blocks[0].exponent(None) == 2


def test_vectors_scalars_and_empty():
    assert not make_plan((512,), 128, 4096, 128, False).preconditioned
    vec = make_plan((512,), 128, 4096, 128, True)
    assert vec.preconditioned and [b.shape for b in vec.blocks] == [(128,)] * 4
    scalar = make_plan((), 128, 4096, 128, False)
    assert len(scalar.blocks) == 1 and not scalar.preconditioned
    assert make_plan((0, 5), 128, 4096, 128, False).blocks == ()
    too_big = make_plan((5000,), 128, 4096, 128, True)  # a vector over the bound: grafting alone
    assert not too_big.preconditioned


def test_size_one_axis_inside_a_block_is_not_preconditioned():
    plan = make_plan((9, 4), 8, 4096, 8, False)  # axis 0 → blocks of 8 and 1
    assert [b.axes for b in plan.blocks] == [(0, 1), (1,)]


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, block=st.integers(1, 8), bound=st.integers(1, 64), max_dim=st.integers(1, 40), p1=st.booleans())
def test_blocks_cover_every_element_exactly_once(shape, block, bound, max_dim, p1):
    plan = make_plan(shape, block, max_dim, bound, p1)
    t = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    count = torch.zeros(shape)
    out = torch.full(shape, -1.0)
    for view, b in zip(block_views(count, plan), plan.blocks):
        assert tuple(view.shape) == b.shape
        view += 1
    for view, src in zip(block_views(out, plan), block_views(t, plan)):
        view.copy_(src)  # split, then merge back by writing into views
    assert torch.equal(out, t)
    assert bool((count == 1).all())
    for b in plan.blocks:
        assert all(b.shape[a] <= max(block, 1) and b.shape[a] > 1 for a in b.axes)


@settings(max_examples=200, deadline=None)
@given(
    shape=shapes, bound=st.integers(1, 64), mask=st.lists(st.booleans(), min_size=5, max_size=5), masked=st.booleans()
)
def test_fan_in_groups_cover_the_dims_in_order_within_the_bound(shape, bound, mask, masked):
    axes = tuple(i for i in range(len(shape)) if mask[i]) if masked else None
    groups = merge_groups(shape, bound, axes)
    dims = [i for i, d in enumerate(shape) if d != 1]
    assert [i for g in groups for i in g] == dims  # every dim above 1 once, in order
    for g in groups:
        assert all(shape[i] == 1 for i in range(g[0], g[-1] + 1) if i not in g)  # adjacent dims only
        n = 1
        for i in g:
            n *= shape[i]
        assert len(g) == 1 or n <= bound
        assert axes is None or len({i in axes for i in g}) == 1  # listed dims never merged with unlisted
    if len(dims) >= 2:
        assert groups[0] == (dims[0],)  # the leading dim (out channels) is its own axis
