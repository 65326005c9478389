"""Pass infrastructure: the compile context, the compile report and the pass runner.

A lowbit pass is a ``torch.fx.passes.infra.pass_base.PassBase``: calling it on a
GraphModule returns a ``PassResult``, so any FX tool can run it. Passes that need more
than the graph (calibration data, a recipe) take a :class:`CompileContext` at
construction; each pass writes what it did into ``context.report``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils import _pytree as pytree


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    details: dict = field(default_factory=dict)


@dataclass
class CompileReport:
    """What each pass did, and per linear site its format, bits per weight and error."""

    passes: list[PassRecord] = field(default_factory=list)
    sites: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def site(self, name: str) -> dict:
        return self.sites.setdefault(name, {"name": name})

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "passes": [vars(p) for p in self.passes],
            "sites": self.sites,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> "CompileReport":
        return cls([PassRecord(**p) for p in d.get("passes", [])], dict(d.get("sites", {})), dict(d.get("meta", {})))

    def mean_bits_per_weight(self) -> float:
        """Bits per weight over every quantized site, weighted by element count."""
        num = den = 0.0
        for s in self.sites.values():
            if "bits_per_weight" in s and "numel" in s:
                num += s["bits_per_weight"] * s["numel"]
                den += s["numel"]
        return num / den if den else float("nan")

    def summary_table(self, max_rows: int | None = None) -> str:
        rows = [("site", "format", "bits/w", "rel.err")]
        quant = [s for s in self.sites.values() if "format" in s]
        for s in quant[:max_rows] if max_rows else quant:
            err = s.get("rel_error")
            rows.append((s["name"], s["format"], f"{s['bits_per_weight']:.3f}", "-" if err is None else f"{err:.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if max_rows and len(quant) > max_rows:
            lines.append(f"... {len(quant) - max_rows} more sites")
        lines.append("")
        lines.append(f"{len(quant)} quantized sites, {self.mean_bits_per_weight():.3f} bits per weight on average")
        for p in self.passes:
            lines.append(f"pass {p.name}: {p.seconds:.2f} s, " + ", ".join(f"{k}={v}" for k, v in p.details.items()
                                                                             if not isinstance(v, (dict, list))))
        return "\n".join(lines)


@dataclass
class CompileContext:
    """State shared by the passes of one compilation."""

    report: CompileReport = field(default_factory=CompileReport)
    calibration: list[tuple] = field(default_factory=list)   # positional inputs of the captured graph
    recipe: Any = None
    progress: bool = True
    max_calibration_rows: int = 2048
    # the quantize pass measures each site's output error on the calibration data for the report;
    # False skips that where no choice of the pass needs the data (a rebuild whose values are replaced)
    measure_errors: bool = True

    def site_inputs(self, gm: torch.fx.GraphModule, node_names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Inputs (first argument) of the given nodes over the calibration data, as [rows, K] fp32.

        At most ``max_calibration_rows`` rows are kept per node (taken evenly across batches).
        Each calibration batch runs only as far as the last wanted node, so collecting the
        inputs of one block at a time keeps memory bounded by that block.
        """
        wanted = set(node_names)
        found: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
        if not self.calibration or not wanted:
            return {}
        per_batch = max(1, self.max_calibration_rows // len(self.calibration))

        class _Done(Exception):
            pass

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                if n.name in wanted:
                    x = self.env[n.args[0]] if isinstance(n.args[0], torch.fx.Node) else n.args[0]
                    rows = x.detach().reshape(-1, x.shape[-1])
                    if rows.shape[0] > per_batch:
                        idx = torch.linspace(0, rows.shape[0] - 1, per_batch).long()
                        rows = rows[idx]
                    found[n.name].append(rows.float().cpu())
                    self.remaining.discard(n.name)
                    if not self.remaining:
                        raise _Done
                return super().run_node(n)

        with torch.no_grad():
            for args in self.calibration:
                rec = Recorder(gm)
                rec.remaining = set(wanted)
                try:
                    rec.run(*pytree.tree_leaves(args))
                except _Done:
                    pass
        return {k: torch.cat(v) for k, v in found.items() if v}


class SequentialCalibration:
    """Block-by-block calibration over a graph that is being rewritten as it goes.

    For each calibration batch it keeps the interpreter's live values at a point of the
    graph (a checkpoint). ``collect(nodes)`` runs each batch from its checkpoint until
    the inputs of ``nodes`` are recorded (without moving the checkpoint);
    ``advance(node)`` runs each batch from its checkpoint to just before ``node`` on the
    current graph (so after the previous block was rewritten) and checkpoints there.
    Each block is thus computed twice in all, instead of rerunning the whole prefix of
    the graph for every block, and only live values are held.
    """

    def __init__(self, context: "CompileContext", gm: torch.fx.GraphModule):
        self.context, self.gm = context, gm
        self.states: list[tuple[dict, str | None] | None] = [None] * len(context.calibration)

    def _run(self, i: int, stop_at: str | None, wanted: set, found: dict, per_batch: int):
        gm = self.gm
        nodes = list(gm.graph.nodes)
        state = self.states[i]
        env: dict = {}
        start = 0
        if state is not None:
            env, prev_name = dict(state[0]), state[1]
            idx = {n.name: k for k, n in enumerate(nodes)}
            if prev_name in idx:
                start = idx[prev_name] + 1
                # values of nodes a rewrite removed (a replaced site's weight) are dropped
                env = {nodes[idx[n.name]]: v for n, v in env.items() if n.name in idx}
            else:  # the checkpoint's place is gone: start over
                env, start, state = {}, 0, None
        last_use = {}
        for k, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last_use[a] = k
        interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
        interp.env = env
        args_iter = iter(pytree.tree_leaves(self.context.calibration[i]))
        interp.args_iter = args_iter
        remaining = set(wanted)
        kept: dict = {}  # input node -> its kept rows: sites reading one activation share one tensor
        for k in range(start, len(nodes)):
            n = nodes[k]
            if stop_at is not None and n.name == stop_at:
                self.states[i] = ({m: v for m, v in env.items()}, nodes[k - 1].name if k else None)
                return
            if n.op == "output":
                break
            if n.op == "placeholder":
                env[n] = next(args_iter) if state is None else env[n]
            elif n in env:
                pass
            else:
                if n.name in remaining:
                    src = n.args[0]
                    if not isinstance(src, torch.fx.Node) or src not in kept:
                        x = env[src] if isinstance(src, torch.fx.Node) else src
                        rows = x.detach().reshape(-1, x.shape[-1])
                        if rows.shape[0] > per_batch:
                            rows = rows[torch.linspace(0, rows.shape[0] - 1, per_batch).long()]
                        rows = rows.float().cpu()
                        if isinstance(src, torch.fx.Node):
                            kept[src] = rows
                    else:
                        rows = kept[src]
                    found[n.name].append(rows)
                    remaining.discard(n.name)
                    if not remaining and stop_at is None:
                        return
                env[n] = interp.run_node(n)
            for a in n.all_input_nodes:  # free values after their last use
                if last_use.get(a) == k and a in env and a.op != "placeholder":
                    del env[a]
        if stop_at is not None:
            raise RuntimeError(f"calibration never reached node {stop_at}")

    @torch.no_grad()
    def collect(self, node_names) -> dict[str, torch.Tensor]:
        wanted = set(node_names)
        found: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
        if not self.context.calibration or not wanted:
            return {}
        per_batch = max(1, self.context.max_calibration_rows // len(self.context.calibration))
        saved = list(self.states)
        for i in range(len(self.context.calibration)):
            self._run(i, None, wanted, found, per_batch)
        self.states = saved
        # one concatenation per distinct input: sites that read the same activation (q/k/v,
        # gate/up) get the same tensor object, which GPTQ uses to build their Hessian once
        joined: dict[tuple, torch.Tensor] = {}
        out = {}
        for k, v in found.items():
            if v:
                key = tuple(id(t) for t in v)
                if key not in joined:
                    joined[key] = torch.cat(v)
                out[k] = joined[key]
        return out

    @torch.no_grad()
    def advance(self, node_name: str) -> None:
        for i in range(len(self.context.calibration)):
            self._run(i, node_name, set(), {}, 1)


class LowbitPass(PassBase):
    """Base of lowbit's passes: a PassBase with a name, a context and options."""

    name = "pass"

    def __init__(self, context: CompileContext | None = None):
        super().__init__()
        self.context = context or CompileContext()

    @property
    def report(self) -> CompileReport:
        return self.context.report

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


def run_passes(gm: torch.fx.GraphModule, passes: list[PassBase], report: CompileReport | None = None) -> torch.fx.GraphModule:
    """Run passes in order, timing each and recording it in ``report``."""
    for p in passes:
        t0 = time.perf_counter()
        before = len(report.passes) if report is not None else 0
        result = p(gm)
        if result is not None:
            gm = result.graph_module
        if report is not None:
            name = getattr(p, "name", type(p).__name__)
            details = getattr(p, "details", {})
            report.passes.insert(before, PassRecord(name, time.perf_counter() - t0, bool(result and result.modified), details))
    return gm
