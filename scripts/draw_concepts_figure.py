"""Draw docs/img/soft-mixture-layout.png: where the adapter's vectors go in a filled template.

Run from the repository root after changing the figure (the PNG is committed, the docs build does not run this):

    python scripts/draw_concepts_figure.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

HARD = "#d9d9d9"
SUBJECT = "#9ecae1"
SOFT = "#fdae6b"
MASK = "#a1d99b"
LAYER = "#f2f2f2"
EDGE = "#404040"

# [CLS] Dante was born in [MASK] . [SEP] -- "[X] was born in [Y] ." filled with a subject, as BERT tokenises it.
TOKENS = [
    ("[CLS]", "hard"),
    ("Dante", "subject"),
    ("was", "soft"),
    ("born", "soft"),
    ("in", "soft"),
    ("[MASK]", "mask"),
    (".", "soft"),
    ("[SEP]", "hard"),
]
COLOURS = {"hard": HARD, "subject": SUBJECT, "soft": SOFT, "mask": MASK}


def box(ax, x, y, w, h, colour, text="", size=10, weight="normal", style="round,pad=0.02,rounding_size=0.08"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=colour, edgecolor=EDGE, linewidth=1))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, start, end, colour=EDGE, width=1.2, style="-|>"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, color=colour, linewidth=width))


def draw_template(ax) -> None:
    """Panel (a): one filled template through the frozen model, with soft words and deep offsets."""
    ax.set_xlim(-1.6, 9.2)
    ax.set_ylim(-1.25, 9.0)
    ax.axis("off")
    ax.set_title("(a) One template: soft words and deep prompts", fontsize=12, loc="left")
    width, gap = 0.92, 0.12
    xs = [i * (width + gap) for i in range(len(TOKENS))]
    soft_number = 0
    for x, (token, role) in zip(xs, TOKENS):
        # the token row
        box(ax, x, -0.9, width, 0.6, "white", token, size=9)
        # the input vector that enters layer 1
        if role == "soft":
            label = f"$e_{soft_number + 1}$"
            soft_number += 1
        elif role == "mask":
            label = "[MASK]"
        else:
            label = "frozen"
        box(ax, x, 0.2, width, 0.75, COLOURS[role], label, size=9 if role != "soft" else 11)
        arrow(ax, (x + width / 2, -0.3), (x + width / 2, 0.2))
    ax.text(xs[0] - 0.15, -0.6, "tokens", ha="right", va="center", fontsize=9)
    ax.text(xs[0] - 0.15, 0.58, "input\nvectors", ha="right", va="center", fontsize=9)

    # the frozen layers, with a deep offset added at every template-word position before each one
    layer_h, layer_gap, first_y = 0.85, 0.75, 1.75
    right = xs[-1] + width
    for layer, label in enumerate(["layer 1", "layer 2", "...", "layer L"]):
        y = first_y + layer * (layer_h + layer_gap)
        if label == "...":
            ax.text(right / 2, y + layer_h / 2, "...", ha="center", va="center", fontsize=14)
            continue
        box(ax, 0, y, right, layer_h, LAYER, f"frozen transformer {label}", size=10)
        superscript = "L" if label == "layer L" else str(layer + 1)
        for x, (_, role) in zip(xs, TOKENS):
            if role == "soft":
                ax.text(
                    x + width / 2,
                    y - layer_gap / 2,
                    rf"$+\Delta^{{{superscript}}}$",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="#a63603",
                )
    ax.text(
        xs[0] - 0.15,
        first_y - layer_gap / 2,
        "deep offsets\n(optional)",
        ha="right",
        va="center",
        fontsize=9,
        color="#a63603",
    )

    # the MLM head reads only the mask position
    mask_x = xs[5] + width / 2
    top = first_y + 3 * (layer_h + layer_gap) + layer_h
    box(ax, xs[4] - 0.3, top + 0.45, 2 * width + gap + 0.6, 0.7, MASK, r"$p_k(y \mid x)$", size=11)
    arrow(ax, (mask_x, top), (mask_x, top + 0.45))


def draw_mixture(ax) -> None:
    """Panel (b): K templates, each giving a distribution at its mask, mixed with learned weights."""
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.25, 9.0)
    ax.axis("off")
    ax.set_title("(b) A mixture of K templates", fontsize=12, loc="left")
    templates = ["[X] was born in [Y] .", "[X] is from [Y] .", "[X] , born in [Y] ."]
    ys = [6.0, 3.9, 1.8]
    for k, (template, y) in enumerate(zip(templates, ys), start=1):
        box(ax, 0.1, y, 4.1, 0.85, SOFT, template, size=10)
        arrow(ax, (4.2, y + 0.42), (5.0, y + 0.42))
        box(ax, 5.0, y, 1.6, 0.85, MASK, f"$p_{k}(y \\mid x)$", size=10)
        arrow(ax, (6.6, y + 0.42), (7.55, 3.95 + 0.4), colour="#555555")
        ax.text(7.0, (y + 0.42 + 4.35) / 2 + 0.25, f"$\\pi_{k}$", fontsize=11, ha="center")
    box(ax, 7.55, 3.45, 2.35, 1.8, "white", "", size=10)
    ax.text(8.72, 4.6, r"$p(y \mid x) =$", ha="center", va="center", fontsize=11)
    ax.text(8.72, 3.95, r"$\sum_k \pi_k\, p_k(y \mid x)$", ha="center", va="center", fontsize=11)
    ax.text(
        0.1,
        -0.15,
        "Each template's words are soft words of their own; the weights\n"
        r"$\pi = \mathrm{softmax}(\mathrm{mixture\_logits})$ are trained with them.",
        fontsize=9,
        va="center",
    )

    # legend
    entries = [
        (HARD, "special token, frozen"),
        (SUBJECT, "subject [X], frozen"),
        (SOFT, "soft word (trained)"),
        (MASK, "mask [Y] / prediction"),
    ]
    for i, (colour, text) in enumerate(entries):
        y, x = 8.1, 0.1 + i * 2.5
        ax.add_patch(Rectangle((x, y), 0.3, 0.3, facecolor=colour, edgecolor=EDGE))
        ax.text(x + 0.4, y + 0.15, text, fontsize=8, va="center")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/img/soft-mixture-layout.png"))
    args = parser.parse_args()
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.2), gridspec_kw={"width_ratios": [1.05, 1]})
    draw_template(left)
    draw_mixture(right)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # fixed metadata so that re-running the script on an unchanged figure gives the same bytes
    fig.savefig(args.output, dpi=110, metadata={"Software": None})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
