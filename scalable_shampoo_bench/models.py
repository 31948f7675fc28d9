"""The benchmark models: small versions of the paper's workloads."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --------------------------------------------------------------------------- char-level GPT
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A GPT-2-style decoder over characters (pre-LayerNorm, learned positions)."""

    def __init__(self, vocab: int, ctx: int, d: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[GPTBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet(nn.Module):
    """A stem and one BasicBlock per width (stride 2 after the first), for 28×28 greyscale images."""

    def __init__(
        self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10, in_channels: int = 1, depth: int = 1
    ) -> None:
        """``depth`` BasicBlocks per width; ``in_channels`` 3 for RGB images."""
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(depth):
                blocks.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- DLRM
def mlp(sizes: list[int], last_relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Embedding tables plus a bottom MLP, pairwise dot interactions, and a top MLP (one logit)."""

    def __init__(self, cardinalities: list[int], dense_dim: int, d: int = 32, top: tuple[int, ...] = (256, 128)):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, d) for n in cardinalities)
        self.bottom = mlp([dense_dim, 64, d])
        n = len(cardinalities) + 1
        self.pairs = torch.triu_indices(n, n, offset=1)
        self.top = mlp([d + n * (n - 1) // 2, *top, 1], last_relu=False)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        bottom = self.bottom(dense)
        vectors = torch.stack([bottom] + [t(sparse[:, i]) for i, t in enumerate(self.tables)], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([bottom, dots], dim=1)).squeeze(1)


# --------------------------------------------------------------------------- autoencoder
class Autoencoder(nn.Module):
    """Hinton and Salakhutdinov's deep MNIST autoencoder (tanh units, linear code, logits out)."""

    def __init__(self, sizes: tuple[int, ...] = (784, 1000, 500, 250, 30)) -> None:
        super().__init__()
        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(sizes)):
            enc += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
        rev = sizes[::-1]
        for i, (a, b) in enumerate(pairwise(rev)):
            dec += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(rev) - 2 else [])
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


# --------------------------------------------------------------------------- translation
class Translator(nn.Module):
    """``nn.Transformer`` encoder-decoder with learned positions and an untied output layer."""

    def __init__(self, src_vocab: int, tgt_vocab: int, max_len: int, d: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        self.src_tok, self.tgt_tok = nn.Embedding(src_vocab, d), nn.Embedding(tgt_vocab, d)
        self.pos = nn.Embedding(max_len, d)
        enc = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        dec = nn.TransformerDecoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.core = nn.Transformer(
            d,
            heads,
            batch_first=True,
            custom_encoder=nn.TransformerEncoder(enc, layers, nn.LayerNorm(d), enable_nested_tensor=False),
            custom_decoder=nn.TransformerDecoder(dec, layers, nn.LayerNorm(d)),
        )
        self.out = nn.Linear(d, tgt_vocab)

    def forward(self, src: Tensor, tgt_in: Tensor, pad: int = 0) -> Tensor:
        ps = torch.arange(src.shape[1], device=src.device)
        pt = torch.arange(tgt_in.shape[1], device=src.device)
        t = tgt_in.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=src.device).triu(1)  # True: may not attend
        h = self.core(
            self.src_tok(src) + self.pos(ps),
            self.tgt_tok(tgt_in) + self.pos(pt),
            tgt_mask=mask,
            src_key_padding_mask=src == pad,
            tgt_key_padding_mask=tgt_in == pad,
            memory_key_padding_mask=src == pad,
        )
        return self.out(h)
