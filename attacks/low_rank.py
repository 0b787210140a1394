"""Exact low-rank structure of shared Linear weight gradients, found once per dump.

Without gradient noise, a Linear layer's weight gradient for a batch of B images is a sum of B outer
products, so it has rank at most B. The matching objective needs only <g, S> for the dummy's
gradient g = sum_n d_n a_n^T, and with S = U V^T that is sum_n (U^T d_n).(V^T a_n): the attack
then reads two thin matrices per iteration instead of the whole gradient (3 million floats for the
paper's MLP, per victim and iteration).

`factorize` finds U and V with a seeded randomised range finder (a fixed generator, so the same
dump always gives the same factors) and keeps them only when they rebuild S to within `TOLERANCE`
(relative Frobenius norm); a defense that made S full rank (noise, pruning) fails that check and
the attack reads S whole, as before. The tolerance is float32 rounding with a margin: an exact
rank-B gradient rebuilds to about 1e-7, a noised one to about 1.
"""

from __future__ import annotations

import torch

TOLERANCE = 1e-5  # relative Frobenius error of U V^T against S; tests pin it
OVERSAMPLING = 4  # extra columns of the range finder, so a rank-B matrix is captured whole
SEED = 0


def factorize(matrix: torch.Tensor, rank: int, tolerance: float = TOLERANCE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """U [out, r], V [in, r] with U V^T equal to `matrix` [out, in] to `tolerance`, or None.

    `rank` is the largest rank expected (the number of rows the layer saw); None also when the
    factors would not be smaller than the matrix.
    """
    out_features, in_features = matrix.shape
    columns = rank + OVERSAMPLING
    if columns * (out_features + in_features) >= out_features * in_features:
        return None
    work = matrix.detach().to(torch.float64)
    generator = torch.Generator().manual_seed(SEED)
    probe = torch.randn(in_features, columns, generator=generator, dtype=torch.float64).to(work.device)
    basis, _ = torch.linalg.qr(work @ probe)  # [out, r]: an orthonormal basis of the range
    right = work.t() @ basis  # [in, r]: S^T U, so that U right^T is S projected on the range
    norm = torch.linalg.matrix_norm(work)
    if norm == 0 or not torch.isfinite(norm):
        return None
    error = torch.linalg.matrix_norm(work - basis @ right.t()) / norm
    if not error <= tolerance:
        return None
    return basis.to(matrix.dtype), right.to(matrix.dtype)


def factorize_rows(shared: torch.Tensor, rank: int, distinct: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Factors of every row's matrix, [rows, out, r] and [rows, in, r]; None unless every row is low rank.

    Rows repeat every `distinct` rows (the restarts of the same victims), so only the first
    `distinct` are factorised.
    """
    lefts, rights = [], []
    for row in shared[:distinct]:
        factors = factorize(row, rank)
        if factors is None:
            return None
        lefts.append(factors[0])
        rights.append(factors[1])
    repeats = shared.shape[0] // distinct
    return torch.stack(lefts).repeat(repeats, 1, 1), torch.stack(rights).repeat(repeats, 1, 1)
