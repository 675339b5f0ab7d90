"""`herl plot`: one PNG of a run's learning curves, from its tables.

    herl plot runs/R [--out runs/R/plot.png]

Reads: rewards, verdicts, metrics (through herl.runs.query's read-only DuckDB). Writes one PNG
(atomically) with six panels, one point per iteration:
reward (mean, with the interquartile band and the min-max range), fraction of answers
meeting each rubric item (the 8 most graded items), the loss and its parts (on-policy and
hindsight), the clip fraction and KL, and the hindsight statistics (failed groups,
groups a revision beat, sequences given the bonus).
"""

from __future__ import annotations

from pathlib import Path

from herl.runs.query import connect_run
from schemas.tables import atomic_write

ITEMS_SHOWN = 8


def _metric(con, stage: str, names: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    rows = con.execute("SELECT name, iteration, value FROM metrics WHERE stage = ? AND list_contains(?, name) "
                       "ORDER BY iteration", [stage, list(names)]).fetchall()
    out: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    for name, k, value in rows:
        out[name].append((k, value))
    return out


def kl_or_grad_norm(train: dict[str, list[tuple[int, float]]]) -> tuple[dict, str]:
    """(series, title) of the fifth panel: the KL to the reference when the run has a KL
    term (train.kl_coef > 0: some value is not 0), else the gradient norm (a flat zero says
    nothing)."""
    if any(v for _, v in train.get("kl", [])):
        return {"kl": train["kl"]}, "KL to the reference (k3)"
    return {"grad_norm": train.get("grad_norm", [])}, "gradient norm (before clipping; KL is off)"


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves to `out` (default: RUN/plot.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "plot.png"
    con = connect_run(run_dir)  # read-only DuckDB over the run's tables
    rewards = con.execute("""
        SELECT iteration, avg(reward), quantile_cont(reward, 0.25), quantile_cont(reward, 0.75),
               min(reward), max(reward)
        FROM rewards GROUP BY iteration ORDER BY iteration""").fetchall()
    items = con.execute("""
        WITH top AS (SELECT item_id FROM verdicts GROUP BY item_id ORDER BY count(*) DESC, item_id LIMIT ?)
        SELECT item_id, iteration, avg((verdict = 'met')::int) FROM verdicts JOIN top USING (item_id)
        GROUP BY ALL ORDER BY item_id, iteration""", [ITEMS_SHOWN]).fetchall()
    train = _metric(con, "train", ("loss", "loss_on_policy", "loss_hindsight", "clip_fraction", "kl", "grad_norm"))
    hs = _metric(con, "hindsight", ("groups_failed", "groups_beaten_by_revision"))
    bonus = _metric(con, "advantages", ("bonus_applied",))

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    fig.suptitle(f"herl run {run_dir.name}")

    ax = axes[0][0]
    if rewards:
        k = [r[0] for r in rewards]
        ax.fill_between(k, [r[4] for r in rewards], [r[5] for r in rewards], alpha=0.15, label="min-max")
        ax.fill_between(k, [r[2] for r in rewards], [r[3] for r in rewards], alpha=0.35, label="25-75%")
        ax.plot(k, [r[1] for r in rewards], marker="o", label="mean")
    ax.set(title="reward per answer", xlabel="iteration", ylim=(-0.02, 1.02))
    ax.legend(loc="best", fontsize=8)

    ax = axes[0][1]
    by_item: dict[str, list[tuple[int, float]]] = {}
    for item_id, k, frac in items:
        by_item.setdefault(item_id, []).append((k, frac))
    for item_id, pts in by_item.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=item_id[:32])
    ax.set(title=f"answers meeting each rubric item (top {ITEMS_SHOWN})", xlabel="iteration", ylim=(-0.02, 1.02))
    if by_item:
        ax.legend(loc="best", fontsize=7)

    def lines(ax, series: dict[str, list[tuple[int, float]]], title: str) -> None:
        for name, pts in series.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set(title=title, xlabel="iteration")
        if any(series.values()):
            ax.legend(loc="best", fontsize=8)

    lines(axes[0][2], {n: train[n] for n in ("loss", "loss_on_policy", "loss_hindsight")}, "loss and its parts")
    lines(axes[1][0], {"clip_fraction": train["clip_fraction"]}, "clip fraction")
    lines(axes[1][1], *kl_or_grad_norm(train))
    lines(axes[1][2], {"failed groups": hs["groups_failed"], "groups a revision beat": hs["groups_beaten_by_revision"],
                       "sequences with bonus": bonus["bonus_applied"]}, "hindsight")

    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
    try:
        with atomic_write(out, "wb") as fh:  # never over a device, FIFO or folder (refuse_special)
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out
