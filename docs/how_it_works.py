"""Draw docs/how-it-works.png, the README's pipeline picture.

    MPLBACKEND=Agg python docs/how_it_works.py
"""
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parent / "how-it-works.png"
STEPS = [
    ("teacher", "DermoSegDiff\ndiffusion U-Net\n(dual branch)"),
    ("EFKD", "edge-focused\ndistillation\n(boundary-weighted)"),
    ("student", "depth cut of the\nteacher, starts from\nits stages"),
    ("few-step sampler", "DDIM K = 1 step,\nensemble N = 3\n-> mask + uncertainty"),
    ("export", "ExecuTorch .pte,\nCoreML, ONNX\n(int8, parity-gated)"),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 2.2), dpi=100)
    ax.set_xlim(0, len(STEPS) * 2.2)
    ax.set_ylim(0, 2)
    ax.axis("off")
    for i, (title, body) in enumerate(STEPS):
        x = 0.1 + i * 2.2
        ax.add_patch(FancyBboxPatch((x, 0.15), 1.7, 1.7, boxstyle="round,pad=0.02", fc="#eef3fb", ec="#3b6db3"))
        ax.text(x + 0.85, 1.55, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + 0.85, 0.8, body, ha="center", va="center", fontsize=8.5)
        if i:  # arrow from the previous box
            ax.add_patch(FancyArrowPatch((x - 0.48, 1.0), (x - 0.02, 1.0), arrowstyle="-|>", mutation_scale=14))
    fig.tight_layout()
    fig.savefig(OUT, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
