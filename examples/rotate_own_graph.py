"""Apply lowbit's rotation pass to your own FX graph, without compile_quantized.

A small pre-norm transformer written by hand (not a Hugging Face model) is exported with
torch.export; lowbit's RotatePass finds the residual stream, the RMSNorms, the readers
and writers and the attention value/output pairs from the graph alone, and rotates them.
The rotated graph computes the same function.

    python examples/rotate_own_graph.py
"""
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.passes.rotate import RotatePass


class Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(d, eps=1e-6)
        self.qkv_q, self.qkv_k, self.qkv_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d, eps=1e-6)
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).view(b, t, self.heads, -1).transpose(1, 2) for lin in (self.qkv_q, self.qkv_k, self.qkv_v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=100, d=64, heads=4, ffn=128, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def main():
    torch.manual_seed(0)
    model = TinyLM().eval()
    with torch.no_grad():  # non-trivial norm scales, so folding them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 100, (2, 16))
    graph = torch.export.export(model, (ids,)).module()     # your own FX graph

    rotate = RotatePass(online=["*down"])                     # R1 + R2 + online Hadamard on "down"
    rotated = rotate(graph).graph_module

    fresh = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        ref, out = model(fresh), rotated(fresh)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"relative difference of the rotated graph: {rel:.2e}")
    print("what the pass did:", rotate.details)
    assert rel < 1e-4


if __name__ == "__main__":
    main()
