"""Exact nearest-neighbour search in a feature space, in blocks, fast enough for 50k x 50k.

Distances are Euclidean. The search is exact (brute force): in the 64-128 dimensions the
audit's feature spaces have, one BLAS matrix product per block beats an approximate
index and gives the same answer every time, which an ethics report needs. scikit-learn's
``NearestNeighbors(algorithm="brute")`` does the same product but materialises float64
blocks and sorts whole rows; this keeps float32 and takes the k smallest with ``topk``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from fedsynth.core.progress import Progress

__all__ = ["nearest", "pairwise_within"]

log = logging.getLogger(__name__)

_BLOCK = 2048


def nearest(
    queries: np.ndarray,
    reference: np.ndarray,
    *,
    k: int = 1,
    exclude_self: bool = False,
    exclude: np.ndarray | None = None,
    block: int = _BLOCK,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``reference`` for every row of ``queries``.

    Parameters
    ----------
    queries, reference : (N, D) and (M, D) feature arrays.
    k : neighbours per query.
    exclude_self : ``queries`` is ``reference`` (same rows, same order); a row is not
        its own neighbour. An exact duplicate elsewhere in the set still is.
    exclude : per query, a reference row that is not its neighbour (the query's own row
        when the queries are some of the reference's rows); ``exclude_self`` is
        ``exclude=arange(N)``.
    block : queries per matrix product.
    progress : called with (queries done, total).

    Returns
    -------
    distances : (N, k) float32, ascending.
    indices : (N, k) int64 into ``reference``.

    Raises
    ------
    ValueError
        Empty inputs, dimensions that differ, or k larger than the reference allows.
    """
    if queries.ndim != 2 or reference.ndim != 2 or queries.shape[1] != reference.shape[1]:
        raise ValueError(f"nearest: feature shapes {queries.shape} and {reference.shape} do not match")
    if exclude_self:
        if queries.shape[0] != reference.shape[0]:
            raise ValueError("nearest: exclude_self needs the queries to be the reference set")
        if exclude is not None:
            raise ValueError("nearest: give exclude_self or exclude, not both")
        exclude = np.arange(len(queries))
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
    if exclude is not None and len(exclude) != len(queries):
        raise ValueError(f"nearest: {len(exclude)} rows to exclude for {len(queries)} queries")
    available = reference.shape[0] - (1 if exclude is not None else 0)
    if len(queries) == 0 or available < k or k < 1:
        raise ValueError(f"nearest: {len(queries)} queries, {reference.shape[0]} reference rows, k={k}")
    out_d = np.empty((len(queries), k), dtype=np.float32)
    out_i = np.empty((len(queries), k), dtype=np.int64)
    for start, q_sq, partial in _distance_blocks(queries, reference, block):
        if exclude is not None:
            rows = torch.arange(len(partial))
            partial[rows, torch.from_numpy(exclude[start : start + len(partial)])] = float("inf")
        if k == 1:
            values, index = partial.min(dim=1, keepdim=True)
        else:
            values, index = partial.topk(k, dim=1, largest=False, sorted=True)
        values += q_sq
        out_d[start : start + len(partial)] = values.clamp_min_(0).sqrt_().numpy()
        out_i[start : start + len(partial)] = index.numpy()
        if progress:
            progress(min(start + block, len(queries)), len(queries))
    _fix_exact_copies(queries, reference, out_d, out_i)
    return out_d, out_i


def _fix_exact_copies(
    queries: np.ndarray, reference: np.ndarray, dist: np.ndarray, index: np.ndarray
) -> None:
    """The expansion |q|^2 + |r|^2 - 2 q.r loses precision near zero, so an exact copy can
    come out at a small positive distance; recompute the first neighbour's distance
    directly (N dot products) so a copy reads 0."""
    nearest_rows = reference[index[:, 0]].astype(np.float32)
    direct = np.linalg.norm(queries.astype(np.float32) - nearest_rows, axis=1)
    dist[:, 0] = direct


def pairwise_within(
    queries: np.ndarray,
    reference: np.ndarray,
    radius: float,
    *,
    block: int = _BLOCK,
) -> np.ndarray:
    """How many rows of ``reference`` lie within ``radius`` of each query (an ε-ball count).

    Returns
    -------
    (N,) int64 counts.
    """
    counts = np.empty(len(queries), dtype=np.int64)
    limit = float(radius) ** 2
    for start, q_sq, partial in _distance_blocks(queries, reference, block):
        counts[start : start + len(partial)] = (partial + q_sq <= limit).sum(1).numpy()
    return counts


def _distance_blocks(
    queries: np.ndarray,
    reference: np.ndarray,
    block: int,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first query row, |q|^2 as a column, |r|^2 - 2 q.r) for blocks of queries.

    |q - r|^2 = |q|^2 + (|r|^2 - 2 q.r): one fused matrix product per block; |q|^2 does not
    change which r is nearest, so callers add it after selecting.
    """
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    ref_sq = (ref * ref).sum(1)
    with torch.no_grad():
        for start in range(0, len(queries), block):
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + block], dtype=np.float32))
            yield start, (q * q).sum(1, keepdim=True), torch.addmm(ref_sq[None, :], q, ref.T, alpha=-2.0)
