"""The tables (markdown) and the curve figure of the pretraining study, from its results.jsonl.

    python bench/pretrain_study.py --budget cpu --summarize        # or: python bench/pretrain_summary.py FILE

Means ± sample standard deviations over seeds; paired differences are taken seed by seed (the runs of one
seed share their data order and masks) and then summarised the same way.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

VARIANTS = ("baseline", "bp-low", "bp-high")
CURVE_COLUMNS = (("direct_entropy_norm", "direct entropy (norm.)"),
                 ("indirect_entropy_norm", "indirect entropy (norm.)"), ("gtd", "GTD"))


def _ms(values: list[float], fmt: str = ".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}} (n=1)"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _key(r: dict) -> str:
    return f"{r['size']} {r['variant']}"


def _groups(rows: list[dict], stage: str) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["stage"] == stage:
            out.setdefault(_key(r), {})[r["seed"]] = r
    return out


def _order(groups) -> list[str]:
    wanted = [f"mini {v}" for v in VARIANTS] + [f"up {v}" for v in VARIANTS]
    return [k for k in wanted if k in groups]


def _deep_layers(r: dict) -> list[int]:
    layers = sorted({row["layer"] for row in r["layers"]})
    return layers[len(layers) // 2:]


def _curve(r: dict, column: str) -> dict[int, float]:
    """step -> mean over the deeper half of the layers of ``column`` (layer means over heads)."""
    deep = set(_deep_layers(r))
    by_step: dict[int, list[float]] = {}
    for row in r["layers"]:
        if row["layer"] in deep and row[column] is not None:
            by_step.setdefault(int(row["step"]), []).append(float(row[column]))
    return {s: statistics.mean(v) for s, v in sorted(by_step.items())}


def pretraining_tables(rows: list[dict]) -> list[str]:
    pre = _groups(rows, "pretrain")
    lines = ["### Pretraining: perplexity on valid.txt and step time", "",
             "| model | shape | parameters | seeds | perplexity | step time (s, median per run) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for key in _order(pre):
        runs = list(pre[key].values())
        lines.append(f"| {key} | {runs[0]['shape']} | {runs[0]['init']['parameters']:,} | {len(runs)} | "
                     f"{_ms([r['perplexity'] for r in runs], '.1f')} | "
                     f"{_ms([r['step_time_s']['median'] for r in runs], '.3f')} |")
    base = pre.get("mini baseline", {})
    lines += ["", "Paired against mini baseline (same seed): perplexity difference and step-time ratio", "",
              "| model | perplexity − baseline | step time / baseline |", "| --- | ---: | ---: |"]
    for key in _order(pre):
        if key == "mini baseline":
            continue
        seeds = sorted(set(pre[key]) & set(base))
        lines.append(f"| {key} | {_ms([pre[key][s]['perplexity'] - base[s]['perplexity'] for s in seeds], '.1f')} | "
                     f"{_ms([pre[key][s]['step_time_s']['median'] / base[s]['step_time_s']['median'] for s in seeds], '.2f')} |")
    lines += ["", "### Pretraining: deeper layers (upper half) over steps, mean over heads and layers", ""]
    for column, title in CURVE_COLUMNS:
        steps = sorted({s for g in pre.values() for r in g.values() for s in _curve(r, column)})
        shown = [steps[0], steps[len(steps) // 2], steps[-1]] if len(steps) >= 3 else steps
        lines += [f"{title}:", "", "| model | " + " | ".join(f"step {s}" for s in shown) + " | last − first (paired) |",
                  "| --- |" + " ---: |" * (len(shown) + 1)]
        for key in _order(pre):
            curves = [_curve(r, column) for r in pre[key].values()]
            cells = [_ms([c.get(s) for c in curves]) for s in shown]
            drop = _ms([c[max(c)] - c[min(c)] for c in curves])
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {drop} |")
        lines.append("")
    return lines


def finetune_tables(rows: list[dict]) -> list[str]:
    lines = []
    for stage, name in (("sst2", "SST-2"), ("rte", "RTE")):
        ft = _groups(rows, stage)
        if not ft:
            continue
        lines += [f"### Fine-tuning on {name} (dev accuracy)", "",
                  "| model | seeds | accuracy | F1 | MCC |", "| --- | ---: | ---: | ---: | ---: |"]
        for key in _order(ft):
            runs = list(ft[key].values())
            lines.append(f"| {key} | {len(runs)} | {_ms([r['accuracy'] for r in runs])} | "
                         f"{_ms([r['f1'] for r in runs])} | {_ms([r['mcc'] for r in runs])} |")
        base, high, up = ft.get("mini baseline", {}), ft.get("mini bp-high", {}), ft.get("up baseline", {})
        seeds = sorted(set(base) & set(high) & set(up))
        if seeds:
            acc = {s: (base[s]["accuracy"], high[s]["accuracy"], up[s]["accuracy"]) for s in seeds}
            lines += ["", "Paired by seed: accuracy differences (question 2)", "",
                      "| difference | mean ± std |", "| --- | ---: |",
                      f"| mini bp-high − mini baseline | {_ms([h - b for b, h, u in acc.values()])} |",
                      f"| up baseline − mini baseline | {_ms([u - b for b, h, u in acc.values()])} |",
                      f"| up baseline − mini bp-high | {_ms([u - h for b, h, u in acc.values()])} |"]
        lines.append("")
    return lines


def curve_figure(rows: list[dict], target: Path) -> Path:
    """Deeper-layer entropy and GTD over pretraining steps, mean ± std over seeds, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    pre = _groups(rows, "pretrain")
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, len(CURVE_COLUMNS))
    for ax, (column, title) in zip(axes, CURVE_COLUMNS):
        for key in _order(pre):
            curves = [_curve(r, column) for r in pre[key].values()]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [statistics.mean(c[s] for c in curves) for s in steps]
            std = [statistics.stdev([c[s] for c in curves]) if len(curves) > 1 else 0.0 for s in steps]
            line = ax.plot(steps, mean, marker="o", ms=3, label=key)[0]
            ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(f"{title}, upper layers")
        ax.set_xlabel("pretraining step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    return target


def summarize(path: Path, figure: Path | None = None) -> None:
    rows = _rows(Path(path))
    print("\n".join(pretraining_tables(rows) + finetune_tables(rows)))
    figure = figure or Path(path).with_name("pretrain_curves.png")
    print(f"figure: {curve_figure(rows, figure)}")


if __name__ == "__main__":
    summarize(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
