"""The reference's on-the-fly GS attention processor, transcribed in torch (docs/math.md §1.3, 2).

Independent of orthofuse_jax: the butterfly multiply is the numpy transcription of docs/math.md §1.3 in
torch, blocks come from the torch Cayley transform (docs/math.md §1.2) of the raw parameters.
"""

from __future__ import annotations

import numpy as np
import torch


def cayley(A: torch.Tensor) -> torch.Tensor:
    S = (A - A.transpose(-1, -2)) / 2
    eye = torch.eye(A.shape[-1], dtype=A.dtype).expand_as(S)
    return torch.linalg.solve(eye - S, eye + S, left=False)


def butterfly(x: torch.Tensor, R: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``y = x @ Q^T`` with ``Q = P^T BD(L) P BD(R)`` (docs/math.md §1.3 numpy transcription)."""
    nb, b = R.shape[0], R.shape[-1]
    B = x.shape[:-1]
    n = nb * b
    xb = x.reshape(*B, nb, b)
    z = torch.einsum("...ji,jai->...ja", xb, R)
    w = z.reshape(*B, n).reshape(*B, b, nb).transpose(-1, -2)
    y = torch.einsum("...vu,vcu->...vc", w, L)
    return y.transpose(-1, -2).reshape(*B, n)


class MOFTProcessor:
    """q = q_scale * to_q(Q_q x), ..., out = out_scale * (W_out (Q_out o)) + b_out (docs/math.md §2)."""

    def __init__(self, blocks: dict, scales: dict):
        # blocks: {"to_q_moft": (L, R) orthogonal}, scales: {"to_q_moft": s or None}
        self.blocks, self.scales = blocks, scales

    def _gs(self, key, x):
        L, R = self.blocks[key]
        return butterfly(x, R, L)

    def _scale(self, key, y):
        s = self.scales.get(key)
        return y if s is None else y * s

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *a,
        **k,
    ):
        x = hidden_states
        e = x if encoder_hidden_states is None else encoder_hidden_states
        q = self._scale("to_q_moft", attn.to_q(self._gs("to_q_moft", x)))
        kk = self._scale("to_k_moft", attn.to_k(self._gs("to_k_moft", e)))
        v = self._scale("to_v_moft", attn.to_v(self._gs("to_v_moft", e)))
        q, kk, v = (attn.head_to_batch_dim(t) for t in (q, kk, v))
        p = attn.get_attention_scores(q, kk, None)
        o = attn.batch_to_head_dim(torch.bmm(p, v))
        lin = attn.to_out[0]
        out = torch.nn.functional.linear(self._gs("to_out_moft", o), lin.weight)
        out = self._scale("to_out_moft", out)
        if lin.bias is not None:
            out = out + lin.bias
        return attn.to_out[1](out)


def install(unet, layers: dict, scales: dict, *, orthogonal: bool = False):
    """Set a MOFTProcessor on every attention; ``layers`` ``{name: (L, R)}`` numpy raw/orthogonal."""
    procs = {}
    for proc_name in unet.attn_processors:
        blocks, sc = {}, {}
        for key in ("to_q_moft", "to_k_moft", "to_v_moft", "to_out_moft"):
            L, R = layers[f"{proc_name}.{key}"]
            L, R = torch.tensor(np.array(L)), torch.tensor(np.array(R))
            blocks[key] = (L, R) if orthogonal else (cayley(L), cayley(R))
            s = scales.get(f"{proc_name}.{key}")
            sc[key] = None if s is None else torch.tensor(np.array(s))
        procs[proc_name] = MOFTProcessor(blocks, sc)
    unet.set_attn_processor(procs)
    return unet
