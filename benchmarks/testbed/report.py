"""Table 3 from a results file: a markdown table and a bar chart."""
from __future__ import annotations

import json

MODE_LABELS = {"kernel": "kernel forwarding (nft DNAT)", "haproxy": "HAProxy 2.6",
               "mbx-l2fwd": "mbx L2 fwd", "mbx-l4lb": "mbx L4 LB",
               "mbx-l4lb-dpdk": "mbx L4 LB, DPDK net_af_packet",
               "pybridge": "naive Python AF_PACKET bridge"}
WORKLOAD_LABELS = {"close-64": "new conn./req, 64 B", "close-8k": "new conn./req, 8 KiB",
                   "ka-64": "keep-alive, 64 B", "ka-8k": "keep-alive, 8 KiB"}


def _mmm(m, fmt="{:,.0f}"):
    if not m:
        return "-"
    return f"{fmt.format(m['median'])} ({fmt.format(m['min'])}-{fmt.format(m['max'])})"


def _base(summary, row):
    for r in summary:
        if (r["mode"], r["tool"], r["workload"]) == ("kernel", row["tool"], row["workload"]):
            return r
    return None


class ReportError(Exception):
    """A results file that cannot be read or reported (one line, for the user)."""


def load(path):
    """A results file of ``python -m benchmarks.testbed run``, checked."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("summary"), list):
        raise ReportError(f"{path}: no 'summary' list: not a results file of "
                          "python -m benchmarks.testbed run")
    return doc


def merge(docs):
    """Several results files (e.g. a wrk and an ab run) as one: their summaries, and
    their configuration where they agree (``offloads`` is "mixed" where not)."""
    if len(docs) == 1:
        return {"summary": list(docs[0]["summary"]), "config": docs[0].get("config", {})}
    offloads = {bool(d.get("config", {}).get("offloads")) for d in docs}
    return {"summary": [r for d in docs for r in d["summary"]],
            "config": {"offloads": offloads.pop() if len(offloads) == 1 else "mixed"}}


def _ratio(row, base):
    """req/s against the kernel row's: '-' without one, 'n/a' if either median is
    missing or the kernel's is 0."""
    if not base:
        return "-"
    num, den = (row.get("rps") or {}).get("median"), (base.get("rps") or {}).get("median")
    if num is None or not den:
        return "n/a"
    return f"{num / den:.2f}"


def markdown(doc, pending=()):
    """One line per (workload, tool, mode): median (min-max) of the runs."""
    summary = doc["summary"]
    lines = ["| workload | tool | middlebox | req/s | × kernel | p50 µs | p99 µs | "
             "middlebox CPU µs/req | bed CPU µs/req | others' load (CPUs) | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(MODE_LABELS)}
    wl_order = {w: i for i, w in enumerate(WORKLOAD_LABELS)}
    rows = sorted(summary, key=lambda r: (wl_order.get(r["workload"], 99), r["tool"],
                                          order.get(r["mode"], 99)))
    for r in rows:
        ratio = _ratio(r, _base(summary, r))
        if r["mb_cpu_us"]:
            mb = _mmm(r["mb_cpu_us"], "{:.1f}")
        else:
            mb = "n/a (softirq)" if r.get("runs") else "-"
        errors = str(r["errors_total"])
        if r.get("failed_runs"):
            errors += f" ({r['failed_runs']} runs failed)"
        lines.append(
            f"| {WORKLOAD_LABELS.get(r['workload'], r['workload'])} | {r['tool']} | "
            f"{MODE_LABELS.get(r['mode'], r['mode'])} | {_mmm(r['rps'])} | {ratio} | "
            f"{_mmm(r['p50_us'])} | {_mmm(r['p99_us'])} | {mb} | "
            f"{_mmm(r.get('bed_cpu_us'), '{:.0f}')} | "
            f"{_mmm(r.get('others_cpus'), '{:.2f}')} | {errors} |")
    for mode in pending:
        lines.append(f"| all | - | {MODE_LABELS.get(mode, mode)} | pending | | | | | | | |")
    return "\n".join(lines)


def _runs_label(rows):
    """"median of N" for the rows of one panel (N-M where their counts differ)."""
    runs = sorted({r["runs"] for r in rows if r.get("runs")})
    if not runs:
        return "no runs"
    return f"median of {runs[0]}" if len(runs) == 1 else f"median of {runs[0]}-{runs[-1]}"


def plot(doc, path):
    summary = [r for r in doc["summary"] if r.get("rps")]
    if not summary:
        raise ReportError(f"nothing to plot in {path}: no run has figures")
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offloads = doc.get("config", {}).get("offloads")
    links = {True: "offloads on", "mixed": "offloads mixed"}.get(offloads, "offloads off")
    tools = sorted({r["tool"] for r in summary})
    wls = [w for w in WORKLOAD_LABELS if any(r["workload"] == w for r in summary)]
    modes = [m for m in MODE_LABELS if any(r["mode"] == m for r in summary)]
    fig, axes = plt.subplots(len(tools), 2, figsize=(12, 4.2 * len(tools)), squeeze=False)
    width = 0.8 / max(len(modes), 1)
    for ti, tool in enumerate(tools):
        for ci, (metric, ylabel) in enumerate((("rps", "requests/s"),
                                               ("mb_cpu_us", "middlebox CPU µs per request"))):
            ax = axes[ti][ci]
            for mi, mode in enumerate(modes):
                xs, ys, lo, hi = [], [], [], []
                for wi, wl in enumerate(wls):
                    r = next((r for r in summary if (r["mode"], r["tool"], r["workload"])
                              == (mode, tool, wl)), None)
                    if not r:
                        continue
                    m = r[metric]
                    if not m and metric == "mb_cpu_us":
                        m = r["unattributed_cpu_us"]  # kernel: softirq, in no process
                    if not m:
                        continue
                    xs.append(wi + (mi - (len(modes) - 1) / 2) * width)
                    ys.append(m["median"])
                    lo.append(m["median"] - m["min"])
                    hi.append(m["max"] - m["median"])
                label = MODE_LABELS.get(mode, mode)
                hatch = None
                if metric == "mb_cpu_us" and mode == "kernel":
                    label += ": unattributed (softirq) time, whole bed"
                    hatch = "//"
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label, hatch=hatch)
            ax.set_xticks(range(len(wls)))
            ax.set_xticklabels([WORKLOAD_LABELS[w] for w in wls], fontsize=8)
            ax.set_ylabel(ylabel)
            title = "throughput" if metric == "rps" else "middlebox CPU per request"
            runs = _runs_label([r for r in summary if r["tool"] == tool])
            ax.set_title(f"{title} ({tool}, {links}, {runs}, min-max bars)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # room for the legend
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
