"""The Parquet tables of a scan: per-head means and flags, per-layer summaries, per-example rows.

They are built from the probe's sums (probe.means does the token-weighted division). This module only
shapes tables; it computes no attention metric (metrics.py) and writes no file (outputs.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnprobe.formulas import metrics
from attnprobe.config import Thresholds
from attnprobe.capture.probe import means

FLAG_COLUMNS = (*metrics.FLAGS, "nonfinite_flag")
METRIC_COLUMNS = (
    "direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm", "gtd",
    "self_mass", "local_mass", "first_mass", "special_mass", "sink_mass", "bp_shift",
)
# standard errors of the multi-hop metrics under --sample-queries (0 where computed exactly)
SE_COLUMNS = ("gtd_se", "indirect_entropy_se", "indirect_entropy_norm_se")


def head_frame(sums: dict[str, torch.Tensor], thresholds: Thresholds):
    """The heads.parquet table from ``(L, H)`` sums: token-weighted means plus flags."""
    import pandas as pd

    m = means(sums)
    L, H = m["queries"].shape
    records = []
    for layer in range(L):
        for head in range(H):
            row: dict[str, Any] = {"layer": layer, "head": head, "queries": int(m["queries"][layer, head])}
            for name in METRIC_COLUMNS:
                value = float(m[name][layer, head]) if name in m else float("nan")
                row[name] = None if math.isnan(value) else value
            row["nonfinite"] = int(m["nonfinite"][layer, head])
            nan = float("nan")
            f = metrics.flags(
                row["direct_entropy_norm"] if row["direct_entropy_norm"] is not None else nan,
                row["gtd"] if row["gtd"] is not None else nan,
                row["sink_mass"] if row["sink_mass"] is not None else nan,
                thresholds,
            )
            row.update(f)
            row["nonfinite_flag"] = row["nonfinite"] > 0
            for name in SE_COLUMNS:
                value = float(m[name][layer, head])
                row[name] = None if math.isnan(value) else value
            records.append(row)
    df = pd.DataFrame.from_records(records)
    for name in (*METRIC_COLUMNS, *SE_COLUMNS):
        df[name] = df[name].astype("float64")
    return df


def layer_frame(heads):
    """The layers.parquet table: metric means over heads, number of heads and of flagged heads.

    A layer's standard error is that of its mean over heads, ``sqrt(sum_h se_h^2) / H`` (the heads' row draws
    are independent)."""
    cols = list(METRIC_COLUMNS)
    grouped = heads.groupby("layer", sort=True)
    df = grouped[cols].mean()
    for name in SE_COLUMNS:
        if name in heads:
            df[name] = grouped[name].apply(lambda se: float((se.astype(float) ** 2).sum() ** 0.5 / len(se)))
    df["queries"] = grouped["queries"].max()
    df["nonfinite"] = grouped["nonfinite"].sum()
    df["heads"] = grouped["head"].count()
    flagged = heads["collapsed"] | heads["high_gtd"] | heads["sink"] | heads["diffuse"] | heads["nonfinite_flag"]
    df["flagged_heads"] = flagged.groupby(heads["layer"]).sum().astype("int64")
    for flag in FLAG_COLUMNS:
        df[f"{flag}_heads"] = heads.groupby("layer")[flag].sum().astype("int64")
    return df.reset_index()


def example_frame(rows: list[int], tokens: list[int], per: dict[str, torch.Tensor]):
    """Per-(example, layer, head) rows from one batch's ``(B, L, H)`` sums."""
    import pandas as pd

    m = means(per)
    B, L, H = m["queries"].shape
    data = {
        "example": torch.tensor(rows).repeat_interleave(L * H).numpy(),
        "tokens": torch.tensor(tokens).repeat_interleave(L * H).numpy(),
        "layer": torch.arange(L).repeat_interleave(H).repeat(B).numpy(),
        "head": torch.arange(H).repeat(B * L).numpy(),
    }
    for name in METRIC_COLUMNS:
        data[name] = m[name].reshape(-1).numpy() if name in m else float("nan")
    data["nonfinite"] = m["nonfinite"].reshape(-1).to(torch.int64).numpy()
    return pd.DataFrame(data)
