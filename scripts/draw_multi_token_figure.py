"""Draw docs/img/multi-token-scoring.png: how objects of several tokens are scored, masked and causal.

Run from the repository root after changing the figure (the PNG is committed, the docs build does not run this):

    python scripts/draw_multi_token_figure.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

COLOURS = {"hard": "#d9d9d9", "subject": "#9ecae1", "soft": "#fdae6b", "mask": "#a1d99b", "object": "#c6dbef"}
EDGE = "#404040"


def box(ax, x, y, w, h, colour, text="", size=9):
    style = "round,pad=0.02,rounding_size=0.08"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=colour, edgecolor=EDGE, linewidth=1))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, color=EDGE, linewidth=1.0))


def token_row(ax, tokens, y, width=0.95, gap=0.1):
    xs = [i * (width + gap) for i in range(len(tokens))]
    for x, (text, role) in zip(xs, tokens):
        box(ax, x, y, width, 0.55, COLOURS[role], text)
    return [x + width / 2 for x in xs]


def masked_panel(ax) -> None:
    ax.set_xlim(-0.3, 11.5)
    ax.set_ylim(-0.5, 6.2)
    ax.axis("off")
    ax.set_title("(a) Masked LM: n masks for candidates of n tokens, one pass per length", fontsize=11, loc="left")
    tokens = [("[CLS]", "hard"), ("Dante", "subject"), ("was", "soft"), ("born", "soft"), ("in", "soft"),
              ("[MASK]", "mask"), ("[MASK]", "mask"), (".", "soft"), ("[SEP]", "hard")]  # fmt: skip
    centres = token_row(ax, tokens, 0.2)
    box(ax, -0.1, 1.3, 9.5, 0.7, "#f2f2f2", "frozen masked LM (soft words in place, deep offsets optional)", 9)
    for c in centres:
        arrow(ax, (c, 0.78), (c, 1.28))
    for i, position in enumerate((5, 6)):
        arrow(ax, (centres[position], 2.02), (centres[position], 2.6))
        box(ax, centres[position] - 0.5, 2.6, 1.0, 0.55, COLOURS["mask"], f"p(· | mask {i + 1})", 7)
    rows = [("New York", "log p(New) + log p(York)"), ("Buenos Aires", "log p(Buenos) + log p(Aires)")]
    for r, (candidate, score) in enumerate(rows):
        y = 3.6 + r * 0.8
        box(ax, 4.2, y, 2.4, 0.55, COLOURS["object"], candidate)
        ax.text(6.8, y + 0.27, "→ " + score + "   (gathered: any number of candidates)", va="center", fontsize=8)
    ax.text(
        0.0, 5.55,
        "log p(y|x) = logsumexp_k [ log π_k + Σ_j log p_k(y_j | x, all masks) ]   (one row per template k)",
        fontsize=9,
    )  # fmt: skip


def causal_panel(ax) -> None:
    ax.set_xlim(-0.3, 11.5)
    ax.set_ylim(-0.5, 6.2)
    ax.axis("off")
    ax.set_title(
        "(b) Causal LM: the prompt runs once; candidates continue its key/value cache", fontsize=11, loc="left"
    )
    prompt = [("<s>", "hard"), ("Dante", "subject"), ("was", "soft"), ("born", "soft"), ("in", "soft")]
    centres = token_row(ax, prompt, 0.2)
    box(ax, -0.1, 1.3, 5.2, 0.7, "#f2f2f2", "frozen causal LM → cache", 9)
    for c in centres:
        arrow(ax, (c, 0.78), (c, 1.28))
    continuations = [[("New", "object"), ("York", "object"), (".", "soft")], [("Florence", "object"), (".", "soft")]]
    for r, tokens in enumerate(continuations):
        y = 2.6 + r * 1.1
        x0 = 5.6
        arrow(ax, (5.1, 1.65), (x0, y + 0.27))
        for i, (text, role) in enumerate(tokens):
            box(ax, x0 + i * 1.05, y, 0.95, 0.55, COLOURS[role], text)
    ax.text(
        0.0, 5.3,
        "prefix scoring: Σ_j log p_k(y_j | prompt, y_<j);  whole sentence: also the words after [Y] (the soft '.')",
        fontsize=8.5,
    )  # fmt: skip
    ax.text(0.0, 4.8, "cost grows with the candidates' tokens, not with candidates x prompt length", fontsize=8.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("docs/img/multi-token-scoring.png"))
    args = parser.parse_args()
    fig, axes = plt.subplots(2, 1, figsize=(11, 8.2))
    masked_panel(axes[0])
    causal_panel(axes[1])
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor=EDGE) for c in COLOURS.values()]
    labels = ["hard token", "subject", "soft word", "mask", "object token"]
    fig.legend(handles, labels, loc="lower center", ncol=5, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
