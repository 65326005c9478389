"""Time the trainer's Adam update: torch.optim.Adam with one group per site (fused on CUDA)
against lowbit.optim.GroupedAdam (one multi-tensor pass), on the parameters a SmolLM2-135M
W2A2 run trains (210 site weights with their own rates, log scales, clip ratios, norm weights).

Each variant's step is captured in a CUDA graph, as the trainer runs it (``--cuda-graph``), and
replayed; the table gives milliseconds per step and the ratio to torch's Adam. Both start from
the same tensors and take the same gradients; the largest relative difference of the
parameters after the timed steps is printed too.

    python bench/adam_step.py                      # CUDA
    python bench/adam_step.py --device cpu --layers 2 --steps 3   # a smoke run, no graphs
"""
from __future__ import annotations

import argparse
import time

import torch

from lowbit.optim import GroupedAdam

# (out, in) of the seven linears of one SmolLM2-135M decoder layer
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def make_groups(layers: int, device, seed: int = 0) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    groups, scales, clips, norms = [], [], [], []
    for _ in range(layers):
        for n, k in LAYER_SHAPES:
            w = (torch.randn(n, k, generator=g) * 0.02).to(device).requires_grad_(True)
            groups.append({"params": [w], "lr": 4e-3 * 0.02})
            scales.append(torch.zeros(n, k // 16, device=device, requires_grad=True))
            clips.append(torch.full((), 0.55, device=device, requires_grad=True))
        norms += [torch.ones(576, device=device, requires_grad=True) for _ in range(2)]
    groups += [{"params": scales, "lr": 1e-3}, {"params": clips, "lr": 2e-3}, {"params": norms, "lr": 3e-3}]
    return groups


def clone_groups(groups: list[dict]) -> list[dict]:
    return [{**g, "params": [p.detach().clone().requires_grad_(True) for p in g["params"]]} for g in groups]


def set_grads(groups: list[dict], step: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(1000 + step)
    for grp in groups:
        for p in grp["params"]:
            p.grad = torch.randn(p.shape, generator=g).to(p.device) * 1e-3


def build(kind: str, groups: list[dict], graphed: bool):
    if kind == "torch":
        opt = torch.optim.Adam(groups, betas=(0.9, 0.95), capturable=graphed,
                               fused=True if groups[0]["params"][0].is_cuda else None)
        if graphed:
            for g in opt.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), device=groups[0]["params"][0].device)
    else:
        opt = GroupedAdam(groups, betas=(0.9, 0.95), capturable=graphed)
    return opt


def run(kind: str, groups: list[dict], steps: int, graphed: bool) -> float:
    """Seconds per step (median of the replays) after ``steps`` steps with fresh gradients."""
    opt = build(kind, groups, graphed)
    params = [p for g in groups for p in g["params"]]
    times = []
    if not graphed:
        for s in range(steps):
            set_grads(groups, s)
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]
    static = [torch.zeros_like(p) for p in params]
    set_grads(groups, 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # the state is created outside the capture
    torch.cuda.current_stream().wait_stream(side)
    for p, s in zip(params, static):
        p.grad = s
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for s in range(1, steps):
        set_grads(groups, s)
        for p, st in zip(params, static):
            st.copy_(p.grad)
            p.grad = st
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    device = torch.device(args.device)
    graphed = device.type == "cuda"
    base = make_groups(args.layers, device)
    results = {}
    finals = {}
    for kind in ("torch", "grouped"):
        groups = clone_groups(base)
        results[kind] = run(kind, groups, args.steps, graphed)
        finals[kind] = [p.detach() for g in groups for p in g["params"]]
    diff = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
               for a, b in zip(finals["torch"], finals["grouped"]))
    n = sum(p.numel() for g in base for p in g["params"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Adam step, {len(base)} groups, {n / 1e6:.1f}M parameters, {name}, "
          f"{'CUDA graph replays' if graphed else 'eager'}")
    print("| optimizer | ms per step | x torch.optim.Adam |")
    print("|---|---:|---:|")
    for kind, label in (("torch", "torch.optim.Adam, a group per site" + (" (fused)" if graphed else "")),
                        ("grouped", "lowbit.optim.GroupedAdam")):
        print(f"| {label} | {results[kind] * 1e3:.3f} | {results['torch'] / results[kind]:.2f} |")
    print(f"largest relative difference of the parameters after {args.steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
