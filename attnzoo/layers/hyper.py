"""mHC: manifold-constrained hyper-connections (GLM-5.3-Flash; docs/mechanisms/sparse.md §7).

The residual is hc_mult streams per token, [N, n, D]. Around each block (attention, MLP) one HyperConnection
predicts, from the RMS-normalised flattened streams (float32):
    pre  = sigmoid(s_pre  * (W x)_pre  + b_pre) + eps                 [n]     collapses the streams into the
                                                                                block input sum_i pre_i stream_i
    post = 2 sigmoid(s_post * (W x)_post + b_post)                    [n]     spreads the block output
    comb = Sinkhorn(softmax_rows(s_comb * (W x)_comb + b_comb) + eps) [n, n]  doubly stochastic mixing
and the new streams are  stream'_j = post_j * out + sum_i comb[i, j] stream_i.
The model reads the streams out by their plain mean (`hyper_head`). Parameter names as transformers'
Glm5NextTextHyperConnection (fn, base, scale; checkpoints call them hc_{attn,ffn}_{fn,base,scale}).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HyperConnection(nn.Module):
    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int = 20, eps: float = 1e-6,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.hc_mult, self.sinkhorn_iters, self.eps, self.norm_eps = hc_mult, sinkhorn_iters, eps, norm_eps
        width = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.zeros(width, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.zeros(width, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [N, n, D] -> (block input [N, D], post [N, n], comb [N, n, n]); post/comb float32."""
        N, n = streams.shape[:2]
        flat = streams.reshape(N, -1).float()
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)  # unweighted RMSNorm
        pre_w, post_w, comb_w = F.linear(flat, self.fn.float()).split([n, n, n * n], -1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax(comb_w.view(N, n, n) * s_comb + comb_b.view(n, n), -1) + self.eps
        comb = comb / (comb.sum(-2, keepdim=True) + self.eps)  # Sinkhorn-Knopp: columns, then rows/columns
        for _ in range(self.sinkhorn_iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(-2, keepdim=True) + self.eps)
        x = (pre[..., None] * streams).sum(1).to(streams.dtype)
        return x, post, comb

    @staticmethod
    def expand(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Block output out [N, D] and the block's input streams [N, n, D] -> the new streams [N, n, D]."""
        dt = streams.dtype
        return post.to(dt)[..., None] * out[:, None, :] + comb.to(dt).transpose(-1, -2) @ streams


def hyper_head(streams: torch.Tensor) -> torch.Tensor:
    """GLM-5.3-Flash's final read-out: the unweighted mean of the streams [N, n, D] -> [N, D]."""
    return streams.mean(1)
