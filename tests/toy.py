"""A toy 'language model' whose objective is an analytic function of one layer's neurons (for exact IG checks).

input -> h = E[ids]  [B, T, d];  block j: x = tanh(W_j h) (the neurons), h = h + D_j x;
q_t = -||h_t||^2 / d  (<= 0);  logits_t = [q_t, log(1 - exp(q_t))] so that log_softmax(logits_t)[0] = q_t exactly.
Scoring target token 0 at positions P-1..T-1 makes f = sum_t q_t, a quadratic in the last layer's neurons.
"""
from __future__ import annotations

import torch
from torch import nn


class _Cfg:
    model_type = "toy"
    pad_token_id = 0
    max_position_embeddings = 1024


class _Out:
    def __init__(self, logits):
        self.logits = logits


class ToyBlock(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up = nn.Linear(d, k, bias=False)
        self.mlp.down = nn.Linear(k, d, bias=False)

    def forward(self, h):
        return h + self.mlp.down(torch.tanh(self.mlp.up(h)))


class ToyLM(nn.Module):
    def __init__(self, n_layers=2, d=6, k=5, vocab=7, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = _Cfg()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyBlock(d, k) for _ in range(n_layers))
        self.head = nn.Linear(d, 2, bias=False)  # only for get_output_embeddings (vocab size)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.d = d

    def get_output_embeddings(self):
        return self.head

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, cache=None, position_ids=None, use_cache=None, logits_to_keep=None, attention_mask=None):
        h = self.emb(input_ids)
        for blk in self.layers:
            h = blk(h)
        if logits_to_keep is not None and torch.is_tensor(logits_to_keep):
            h = h[:, logits_to_keep]
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0:  # transformers' semantics: the last n positions
            h = h[:, -logits_to_keep:]
        q = -(h**2).sum(-1) / self.d
        other = torch.log(-torch.expm1(q))
        return _Out(torch.stack([q, other], -1))


TOY_LAYOUT = "layers=layers,mlp=mlp,out=down,in=up"
