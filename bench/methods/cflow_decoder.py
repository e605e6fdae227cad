"""CFLOW-AD's decoder: FrEIA 0.2's conditional coupling blocks on fibers (docs/methods.md).

A ``CouplingBlock`` is FrEIA 0.2's ``AllInOneBlock`` as CFLOW-AD configures it (SOFTPLUS
global affine, a fixed hard or soft permutation, no Householder or GIN options) and a
``Decoder`` its ``SequenceINN``, written out here with FrEIA's parameters, initial values,
order of operations and state-dict layout, so that FrEIA's and anomalib's decoders load
into them unchanged. Written out rather than inherited: FrEIA's constructor builds a dense
C x C permutation in NumPy that the decoder replaces at once (0.8 s for wide_resnet50_2's
decoders), and importing FrEIA imports scipy.stats (0.45 s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from bench.kernels import ReluMlp, constant_linear, permute_columns
from bench.methods.fastflow import SOFTPLUS_INIT, softplus_scale


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


class CouplingBlock(nn.Module):
    """FrEIA 0.2's ``AllInOneBlock`` on fibers (B, C) with a condition (B, K).

    Forward: x1 | x2 = split(x); a = 0.1 subnet([x1, c]); s = clamp tanh(a[:c2]);
    y = (x1, x2 exp(s) + a[c2:]); z = (y g + o) W with g = 0.1 softplus_0.5(global_scale)
    and W the fixed permutation (``w_perm``). Log-det = sum(s) + sum(log g). A one-hot W is
    applied as an index gather (bit-identical to the product, without its C x C cost); the
    subnet's products run on oneDNN (bench.kernels).
    """

    def __init__(
        self,
        channels: int,
        condition: int,
        clamp: float,
        subnet_constructor: Callable[[int, int], nn.Module],
    ) -> None:
        super().__init__()
        self.in_channels = channels
        self.splits = (channels - channels // 2, channels // 2)
        self.clamp = clamp
        self.global_scale = nn.Parameter(torch.full((1, channels), SOFTPLUS_INIT))
        self.global_offset = nn.Parameter(torch.zeros(1, channels))
        self.w_perm = nn.Parameter(torch.eye(channels), requires_grad=False)
        # FrEIA builds it from a transposed NumPy array and keeps those strides, which the
        # inverse pass's product then rounds by; so does this one
        self.w_perm_inv = nn.Parameter(torch.eye(channels).t(), requires_grad=False)
        self.subnet = subnet_constructor(self.splits[0] + condition, 2 * self.splits[1])
        self.register_buffer("perm_index", None, persistent=False)
        self.register_buffer("perm_index_inv", None, persistent=False)
        self.refresh_permutation()

    def global_scale_activation(self, raw: Tensor) -> Tensor:
        """g = 0.1 softplus(raw) with beta 0.5 (FrEIA's SOFTPLUS global affine)."""
        return softplus_scale(raw)

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
        scale = self.global_scale_activation(self.global_scale)
        log_jac = torch.sum(torch.log(scale))
        if rev:
            if self.perm_index is None:
                return (F.linear(x, self.w_perm_inv) - self.global_offset) / scale, log_jac
            return (x[:, self.perm_index_inv] - self.global_offset) / scale, log_jac
        shifted = x * scale + self.global_offset
        if self.perm_index is None:
            return constant_linear(shifted, self.w_perm.reshape(x.shape[1], -1)), log_jac
        return permute_columns(shifted, self.perm_index, self.perm_index_inv), log_jac

    def forward(
        self, x: tuple[Tensor], c: list[Tensor] | None = None, rev: bool = False
    ) -> tuple[tuple[Tensor], Tensor]:
        """FrEIA's forward (or inverse, ``rev``) pass, without its in-place ``a *= 0.1``."""
        conditions = c or []
        if rev:
            y, global_jac = self._permute(x[0], rev=True)
            x1, y2 = torch.split(y, self.splits, dim=1)
            a = self.subnet(torch.cat([x1, *conditions], 1)) * 0.1
            half = y2.shape[1]
            sub_jac = self.clamp * torch.tanh(a[:, :half])
            x2 = (y2 - a[:, half:]) * torch.exp(-sub_jac)
            return (torch.cat((x1, x2), 1),), -torch.sum(sub_jac, dim=1) - global_jac
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


class Decoder(nn.Module):
    """FrEIA's ``SequenceINN`` of coupling blocks, every block reading the same condition."""

    def __init__(self, blocks: list[CouplingBlock]) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(blocks)

    def forward(self, x: Tensor, c: list[Tensor], rev: bool = False) -> tuple[Tensor, Tensor]:
        """z (or x, ``rev``) and the log-determinant per fiber, summed as FrEIA sums it."""
        order = range(len(self.module_list))
        log_det: Tensor | int = 0
        out = (x,)
        for index in reversed(order) if rev else order:
            out, jac = self.module_list[index](out, c=[c[0]], rev=rev)
            log_det = jac + log_det
        return out[0], log_det


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
) -> Decoder:
    """``coupling_blocks`` conditional coupling blocks (clamp alpha, SOFTPLUS global affine).

    Call under a seeded torch RNG: the subnets use PyTorch's default initialisation, drawn
    block after block as FrEIA draws them. The fixed permutations come from ``generator``.
    """
    blocks = []
    for _ in range(coupling_blocks):
        block = CouplingBlock(channels, condition_vector, clamp_alpha, _subnet)
        if permute_soft:
            matrix = random_rotation(channels, generator).float()
        else:
            matrix = torch.zeros(channels, channels, device="cpu")
            order = torch.randperm(channels, generator=generator, device="cpu")
            matrix[torch.arange(channels, device="cpu"), order] = 1.0
        block.set_permutation(matrix.to(block.w_perm.device))
        blocks.append(block)
    return Decoder(blocks)
