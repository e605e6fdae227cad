"""CFLOW-AD's decoder: FrEIA 0.2 conditional coupling blocks on fibers (docs/methods.md).

Kept apart from ``bench.methods.cflow`` so that importing the method (to list it, to read
its settings) does not import FrEIA, whose scipy.stats import takes about a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import Tensor, nn

from bench.kernels import ReluMlp, constant_linear, permute_columns


def random_rotation(channels: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed matrix of SO(C), as FrEIA's soft permutation draws, but via one QR.

    scipy's ``special_ortho_group`` builds it from C Householder steps in Python, which takes
    minutes for C = 2048; QR of a Gaussian matrix with the sign fix gives the same law.
    """
    gaussian = torch.randn(
        channels, channels, generator=generator, dtype=torch.float64, device="cpu"
    )
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class CouplingBlock(AllInOneBlock):
    """FrEIA 0.2's AllInOneBlock; a one-hot permutation is applied as an index gather.

    Multiplying by a one-hot matrix and gathering give bit-identical outputs, but the
    gather skips a dense C x C product in the forward and backward pass. The subnet's
    products run on oneDNN (bench.kernels).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("perm_index", None, persistent=False)
        self.register_buffer("perm_index_inv", None, persistent=False)
        self.refresh_permutation()

    def refresh_permutation(self) -> None:
        """Derive the gather indices from ``w_perm`` (None when it is a dense rotation)."""
        channels = self.in_channels
        if self.w_perm.is_meta:
            return
        matrix = self.w_perm.detach().reshape(channels, channels)
        peak, index = matrix.max(1)
        one_hot = (
            bool((peak == 1).all())
            and bool((matrix.min() >= 0).all())
            and bool((matrix.sum() == channels).all())
            and bool((torch.bincount(index, minlength=channels) == 1).all())
        )
        self.perm_index = index if one_hot else None
        self.perm_index_inv = index.argsort() if one_hot else None

    def set_permutation(self, matrix: Tensor) -> None:
        """Replace the fixed mixing matrix (a permutation or a rotation)."""
        with torch.no_grad():
            self.w_perm.copy_(matrix.reshape(self.w_perm.shape))
            self.w_perm_inv.copy_(matrix.T.reshape(self.w_perm_inv.shape))
        self.refresh_permutation()

    def _permute(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        if x.dim() != 2 or (rev and self.perm_index is None):
            return super()._permute(x, rev)
        scale = self.global_scale_activation(self.global_scale)
        log_jac = torch.sum(torch.log(scale))
        if rev:
            return (x[:, self.perm_index_inv] - self.global_offset) / scale, log_jac
        shifted = x * scale + self.global_offset
        if self.perm_index is None:
            return constant_linear(shifted, self.w_perm.reshape(x.shape[1], -1)), log_jac
        return permute_columns(shifted, self.perm_index, self.perm_index_inv), log_jac

    def forward(
        self,
        x: tuple[Tensor],
        c: list[Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[Tensor], Tensor]:
        """FrEIA's forward pass on fibers, written out without its in-place ``a *= 0.1``.

        The same operations in the same order; only 2D (fiber) input in the forward
        direction takes this path.
        """
        conditions = c or []
        if rev or x[0].dim() != 2 or self.householder or self.GIN or self.reverse_pre_permute:
            return super().forward(x, conditions, rev, jac)
        x1, x2 = torch.split(x[0], self.splits, dim=1)
        a = self.subnet(torch.cat([x1, *conditions], 1)) * 0.1
        half = x2.shape[1]
        sub_jac = self.clamp * torch.tanh(a[:, :half])
        x2 = x2 * torch.exp(sub_jac) + a[:, half:]
        out, global_jac = self._permute(torch.cat((x1, x2), 1))
        return (out,), torch.sum(sub_jac, dim=1) + global_jac

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_permutation()


def _subnet(dims_in: int, dims_out: int) -> nn.Module:
    """CF-REF's subnet: Linear(in, 2 in) -> ReLU -> Linear(2 in, out)."""
    return ReluMlp(dims_in, 2 * dims_in, dims_out)


def build_decoder(
    channels: int,
    coupling_blocks: int,
    condition_vector: int,
    clamp_alpha: float,
    permute_soft: bool,
    generator: torch.Generator,
) -> SequenceINN:
    """``coupling_blocks`` conditional AllInOneBlocks (clamp alpha, SOFTPLUS global affine).

    Call under a seeded torch RNG: the subnets use PyTorch's default initialisation. The
    fixed permutations come from ``generator``.
    """
    decoder = SequenceINN(channels)
    numpy_state = np.random.get_state()  # FrEIA draws a permutation we replace at once
    for _ in range(coupling_blocks):
        decoder.append(
            CouplingBlock,
            cond=0,
            cond_shape=(condition_vector,),
            subnet_constructor=_subnet,
            affine_clamping=clamp_alpha,
            global_affine_type="SOFTPLUS",
            permute_soft=False,
        )
        block = decoder.module_list[-1]
        if permute_soft:
            matrix = random_rotation(channels, generator).float()
        else:
            matrix = torch.zeros(channels, channels, device="cpu")
            order = torch.randperm(channels, generator=generator, device="cpu")
            matrix[torch.arange(channels, device="cpu"), order] = 1.0
        block.set_permutation(matrix.to(block.w_perm.device))
    np.random.set_state(numpy_state)
    return decoder
