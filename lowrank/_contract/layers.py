"""``LowRankLinear``: y = A (B x) + b, the module that replaces a targeted linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankLinear", "factored_like"]


class LowRankLinear(nn.Module):
    """A linear layer stored as two thin factors: ``A`` (out x rank) and ``B`` (rank x in).

    The forward pass applies B first, then A and the bias, so it costs rank * (in + out)
    multiply-adds per token instead of in * out. ``in_features``/``out_features`` match the layer it
    replaces, so code that reads them keeps working.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if self.A.device.type != "meta":
            nn.init.normal_(self.A, std=rank ** -0.5 if rank else 1.0)
            nn.init.normal_(self.B, std=in_features ** -0.5)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        out_features, rank = a.shape
        rank_b, in_features = b.shape
        if rank != rank_b:
            raise ValueError(f"factor shapes do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
        layer = cls(in_features, out_features, rank, bias=bias is not None, device="meta", dtype=a.dtype)
        layer.A = nn.Parameter(a.detach().clone().contiguous())
        layer.B = nn.Parameter(b.detach().clone().to(a.dtype).contiguous())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone().to(device=a.device, dtype=a.dtype))
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense product A B (computed on access; for inspection and merging, not inference)."""
        return self.A @ self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.A.dtype:
            # Factors stored in a narrower dtype than the activations (recipe dtype policy): compute
            # in the factors' dtype and hand back the caller's.
            return F.linear(F.linear(x.to(self.A.dtype), self.B), self.A, self.bias).to(x.dtype)
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def factored_like(module: nn.Module, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> LowRankLinear:
    """A ``LowRankLinear`` with factors ``a`` @ ``b`` and ``module``'s bias, on its device in ``dtype``."""
    bias = getattr(module, "bias", None)
    device = module.weight.device
    return LowRankLinear.from_factors(
        a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype),
        None if bias is None else bias.detach().to(device=device, dtype=dtype),
    )
