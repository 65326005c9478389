"""A static HTML page for a compile report, with matplotlib plots embedded as PNG.

    lowbit report DIR        # DIR: an artifact folder (report.json or manifest.json inside)

The page shows, per linear site, the relative output error on the calibration data and
the bits per weight; the error per block; and, when the report holds them, the
activation outlier magnitudes per channel (max |x| over calibration tokens) of the float
model and of what the quantizer sees after rotations and channel splits.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

from .pass_manager import CompileReport


def load_report(path: str | Path) -> CompileReport:
    path = Path(path)
    if path.is_dir():
        if (path / "report.json").is_file():
            path = path / "report.json"
        elif (path / "manifest.json").is_file():
            man = json.loads((path / "manifest.json").read_text())
            if not man.get("report"):
                raise ValueError(f"{path} holds no compile report")
            return CompileReport.from_dict(man["report"])
        else:
            raise FileNotFoundError(f"{path} has neither report.json nor manifest.json")
    return CompileReport.from_dict(json.loads(path.read_text()))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _short(name: str) -> str:
    return re.sub(r"^model\.", "", name).replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def _error_plot(sites: list[dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(sites) * 0.08), 4))
    errs = [s.get("rel_error", float("nan")) for s in sites]
    ax.bar(range(len(sites)), errs, color="#3a6ea5", width=0.9)
    ax.set_ylabel("relative output error")
    ax.set_xlabel("linear site (graph order)")
    ax2 = ax.twinx()
    ax2.plot(range(len(sites)), [s.get("bits_per_weight", float("nan")) for s in sites], color="#d1495b", lw=1.5)
    ax2.set_ylabel("bits per weight", color="#d1495b")
    ax2.set_ylim(bottom=0)
    step = max(1, len(sites) // 30)
    ax.set_xticks(range(0, len(sites), step))
    ax.set_xticklabels([_short(sites[i]["name"]) for i in range(0, len(sites), step)], rotation=90, fontsize=7)
    ax.set_title("per-site relative output error (bars) and bits per weight (line)")
    return fig


def _block_plot(sites: list[dict]):
    import matplotlib.pyplot as plt

    kinds: dict[str, dict[int, float]] = {}
    for s in sites:
        m = re.search(r"\.(\d+)\.(.*)$", s["name"])
        if m and "rel_error" in s:
            kinds.setdefault(m.group(2), {})[int(m.group(1))] = s["rel_error"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, pts in sorted(kinds.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", ms=3, label=kind)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("relative output error")
    ax.set_title("error by block and projection")
    if kinds:
        ax.legend(fontsize=7, ncol=2)
    return fig


def _plain_log_ticks(ax) -> None:
    """Log-scaled y ticks written as plain numbers (3, 4, 6) rather than 3 x 10^0."""
    import math

    from matplotlib.ticker import FuncFormatter

    def minor(v, _):  # label 2, 3 and 5 times a power of ten only, so ticks never crowd
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 3, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _outlier_plots(sites: list[dict]) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    with_both = [s for s in sites if s.get("act_absmax_float") and s.get("act_absmax")]
    if not with_both:
        return []
    out = []
    # summary: max / median channel magnitude per site, before and after
    fig, ax = plt.subplots(figsize=(max(8, len(with_both) * 0.08), 3.5))

    def ratio(v):
        vs = sorted(v)
        med = vs[len(vs) // 2] or 1e-30
        return vs[-1] / med

    ax.semilogy([ratio(s["act_absmax_float"]) for s in with_both], label="float model", color="#888")
    ax.semilogy([ratio(s["act_absmax"]) for s in with_both], label="after rotation / splitting", color="#2a9d8f")
    ax.set_xlabel("linear site (graph order)")
    ax.set_ylabel("max / median channel |x|")
    _plain_log_ticks(ax)
    ax.set_title("activation outlier ratio per site")
    ax.legend()
    out.append(("Outlier ratio per site", _png(fig)))
    # a few sites in detail
    picks = [with_both[0], with_both[len(with_both) // 2], with_both[-1]]
    downs = [s for s in with_both if "down" in s["name"]]
    if downs:
        picks[1] = downs[len(downs) // 2]
    for s in picks:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.plot(s["act_absmax_float"], lw=0.8, color="#888", label=f"float ({len(s['act_absmax_float'])} channels)")
        ax.plot(s["act_absmax"], lw=0.8, color="#2a9d8f", label=f"quantizer input ({len(s['act_absmax'])} channels)")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_xlabel("channel")
        ax.set_ylabel("max |x|")
        ax.set_title(s["name"])
        ax.legend(fontsize=8)
        out.append((f"Channel magnitudes: {s['name']}", _png(fig)))
    return out


def _value(v) -> str:
    """A table cell: floats to 4 significant digits, everything else as str()."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_html(report: CompileReport, title: str = "lowbit compile report") -> str:
    import matplotlib

    matplotlib.use("Agg")
    sites = [s for s in report.sites.values() if "format" in s]
    figures = []
    if sites:
        figures.append(("Error and bits per weight per site", _png(_error_plot(sites))))
        figures.append(("Error by block", _png(_block_plot(sites))))
    figures += _outlier_plots(sites)
    meta = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_value(v))}</td></tr>"
                   for k, v in report.meta.items())
    passes = "".join(
        f"<tr><td>{html.escape(p.name)}</td><td>{p.seconds:.2f}</td><td>"
        + html.escape(", ".join(f"{k}={_value(v)}" for k, v in p.details.items() if not isinstance(v, (list, dict))))
        + "</td></tr>" for p in report.passes)
    rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{html.escape(s['format'])}</td><td>{s.get('method', '')}</td>"
        f"<td>{s['bits_per_weight']:.3f}</td><td>{s.get('rel_error', float('nan')):.4f}</td>"
        f"<td>{s.get('split_channels', '')}</td></tr>" for s in sites)
    figs = "".join(f"<h2>{html.escape(t)}</h2><img src='{src}' alt='{html.escape(t)}'>" for t, src in figures)
    mean_bits = report.mean_bits_per_weight()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.summary {{ font-size: 1.1em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="summary">{len(sites)} quantized sites, {mean_bits:.3f} bits per weight on average.</p>
<table>{meta}</table>
<h2>Passes</h2><table><tr><th>pass</th><th>seconds</th><th>what it did</th></tr>{passes}</table>
{figs}
<h2>Sites</h2>
<table><tr><th>site</th><th>format</th><th>method</th><th>bits/weight</th><th>rel. error</th><th>split channels</th></tr>{rows}</table>
</body></html>
"""


def write_report(source: str | Path | CompileReport, out: str | Path | None = None) -> Path:
    """Write the HTML page for a report (a CompileReport, a report.json or an artifact folder)."""
    report = source if isinstance(source, CompileReport) else load_report(source)
    if out is None:
        if isinstance(source, CompileReport):
            raise ValueError("pass out= when writing a report object")
        src = Path(source)
        out = (src if src.is_dir() else src.parent) / "report.html"
    out = Path(out)
    out.write_text(render_html(report))
    return out
