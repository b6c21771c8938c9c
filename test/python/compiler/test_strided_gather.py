"""Gathers (indexing, embedding) from strided views, compiled vs eager.

The vectorizer's `vector.gather` linearizes indices over the view's shape; on a view whose
rows are further apart in memory (a column slice, a step) that read the wrong elements
(`z[:, :40][idx]` took row 1 from offset 40 instead of 48). lowbit-vectorize now copies such
views to a contiguous tensor first (test/passes/lowbit-vectorize-gather.mlir)."""
import warnings

import pytest
import torch

from lowbit.compiler.partition import forget_warnings


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    forget_warnings()
    yield
    torch._dynamo.reset()


def _check(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eager fallback would compare eager with eager
        got = torch.compile(fn, backend="lowbit", dynamic=False)(*args)
    torch.testing.assert_close(got, fn(*args), rtol=0, atol=0)


@pytest.mark.parametrize("rows,cols,keep", [(2, 48, 40), (5, 33, 7), (17, 100, 65), (3, 64, 64)])
def test_index_rows_of_a_column_slice(rows, cols, keep):
    z = torch.randn(rows, cols)
    idx = torch.randint(0, rows, (rows * 2 + 1,))
    _check(lambda z, idx: z[:, :keep][idx] + 0, z, idx)


@pytest.mark.parametrize("step", [2, 3])
def test_index_rows_of_a_stepped_view(step):
    z = torch.randn(6, 50)
    idx = torch.tensor([5, 0, 3, 3, 1])
    _check(lambda z, idx: z[:, ::step][idx] * 2, z, idx)


def test_index_rows_of_a_row_slice():
    z = torch.randn(9, 40)
    idx = torch.tensor([0, 4, 2])
    _check(lambda z, idx: z[2:7][idx] - 1, z, idx)


def test_embedding_from_a_sliced_table():
    table = torch.randn(11, 37)
    ids = torch.randint(0, 11, (2, 5))
    _check(lambda t, i: torch.nn.functional.embedding(i, t[:, 3:30]) + 0, table, ids)
