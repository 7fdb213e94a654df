"""The pruning experiment of lesson 11: every method at 50% and 25% FFN density, one table, one plot.

    OMP_NUM_THREADS=1 python benchmarks/prune_experiment.py               # ~5 minutes on 2 CPU cores
    python benchmarks/prune_experiment.py --densities 0.5 --steps 100     # quicker
    python benchmarks/prune_experiment.py --distill                       # every run with KD

Santacroce et al. 2023 (arXiv 2302.03773) fine-tune GPT-type decoders while pruning the MLP
neurons with magnitude, random, movement and GUM, and compare the task metric and neuron-level
redundancy. Here: the tiny SFT checkpoint (runs/sft-tiny/checkpoint, itself from
runs/tiny/checkpoint), fine-tuned on the SFT chat data while pruning to each density
(minilm/stages/prune.py), metric = held-out assistant-token loss (lower is better), plus a dense
fine-tune with the same steps as the reference and "global movement" (GUM without the uniqueness
penalty) as the ablation that separates GUM's two ingredients. Writes runs/prune_experiment/
{results.json, table.md, prune.png}. One seed per cell: differences of a few hundredths of a nat
are within run-to-run noise at this size (see the lesson for the repeat we measured).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minilm.checkpoint import load_checkpoint
from minilm.config import build
from minilm.prune.scores import magnitude_scores, masks_from_scores
from minilm.stages.prune import PruneConfig, run_prune

RUNS = [("magnitude", {}), ("random", {}), ("movement", {}), ("gum", {}),
        ("global movement", {"method": "gum", "gum_weight": 0.0})]


def run_one(name: str, overrides: dict, density: float, args, out: Path) -> dict:
    fields = dict(init=args.init, out_dir=str(out / f"{name.replace(' ', '-')}-{density}"),
                  method=overrides.get("method", name), sparsity=round(1 - density, 4),
                  max_steps=args.steps, prune_warmup=args.steps // 10, prune_final=args.steps // 4,
                  eval_every=args.steps, ckpt_every=args.steps, distill=args.distill, resume=False,
                  seed=args.seed, **{k: v for k, v in overrides.items() if k != "method"})
    t0 = time.time()
    r = run_prune(build(PruneConfig, **fields))
    red, sens = r["redundancy_after"]["redundancy"], r["redundancy_after"]["sensitivity"]
    return {"method": name, "density": density, "heldout_loss": r["after"]["heldout_loss"],
            "heldout_ppl": r["after"]["heldout_ppl"], "redundancy": sum(red) / len(red),
            "sensitivity": sum(sens) / len(sens), "layer_density": r["densities"],
            "layer_redundancy": red, "redundancy_dense_init": r["redundancy_before"]["redundancy"],
            "compact_params": r["compact"]["params"], "seconds": time.time() - t0}


def table(rows: list[dict], dense: dict) -> str:
    lines = [f"dense fine-tune (same steps): held-out loss {dense['heldout_loss']:.3f}, redundancy "
             f"{dense['redundancy']:.3f}, sensitivity {dense['sensitivity']:.2e}", "",
             "| density | method | held-out loss | vs dense | ppl | redundancy | sensitivity | layer densities |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['density']:.2f} | {r['method']} | {r['heldout_loss']:.3f} | "
                     f"{r['heldout_loss'] - dense['heldout_loss']:+.3f} | {r['heldout_ppl']:.1f} | "
                     f"{r['redundancy']:.3f} | {r['sensitivity']:.2e} | "
                     f"{', '.join(f'{d:.2f}' for d in r['layer_density'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], dense: dict, magnitude_global: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    densities = sorted({r["density"] for r in rows}, reverse=True)
    methods = [name for name, _ in RUNS]
    width = 0.8 / len(densities)
    for i, d in enumerate(densities):
        got = {r["method"]: r for r in rows if r["density"] == d}
        xs = [j + i * width for j in range(len(methods))]
        axes[0].bar(xs, [got[m]["heldout_loss"] for m in methods], width, label=f"density {d:.2f}")
        layers = range(len(got["gum"]["layer_density"]))
        axes[1].plot(layers, got["gum"]["layer_density"], "o-", label=f"GUM (learned), target {d:.2f}")
        axes[1].plot(layers, magnitude_global[d], "s--", label=f"magnitude scores, target {d:.2f}")
        if i == 0:
            for m in methods:
                axes[2].plot(layers, got[m]["layer_redundancy"], "o-", label=m)
            axes[2].plot(layers, rows[0]["redundancy_dense_init"], "k:", label="dense (before)")
            axes[2].set_title(f"redundancy of kept neurons, density {d:.2f}")
    axes[0].axhline(dense["heldout_loss"], color="k", linestyle=":", label="dense fine-tune")
    axes[0].set_xticks([j + width * (len(densities) - 1) / 2 for j in range(len(methods))], methods,
                       rotation=20)
    axes[0].set_ylabel("held-out assistant-token loss (nats)")
    axes[0].set_ylim(min(r["heldout_loss"] for r in rows + [dense]) - 0.3,
                     max(r["heldout_loss"] for r in rows) + 0.1)
    axes[0].set_title("task metric per method (lower is better)")
    axes[1].set_title("per-layer FFN density under global ranking")
    axes[1].set_xlabel("layer"), axes[1].set_ylabel("kept fraction")
    axes[2].set_xlabel("layer"), axes[2].set_ylabel("mean max |cos| to another kept neuron")
    for ax in axes:
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_xticks(list(layers))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default="runs/sft-tiny/checkpoint")
    p.add_argument("--out", default="runs/prune_experiment")
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--distill", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dense = run_one("dense", {"method": "magnitude"}, 1.0, args, out)
    rows = [run_one(name, kw, d, args, out) for d in args.densities for name, kw in RUNS]
    lm = load_checkpoint(args.init).model   # what global ranking of plain magnitudes would do
    mags = [magnitude_scores(layer.mlp) for layer in lm.model.layers]
    magnitude_global = {d: [m.mean().item() for m in masks_from_scores(mags, d, True)]
                        for d in args.densities}
    text = table(rows, dense)
    print("\n" + text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"dense": dense, "rows": rows, "args": vars(args),
                                                  "magnitude_global_density": magnitude_global,
                                                  "seconds": time.time() - t0}, indent=2))
    plot(rows, dense, magnitude_global, out / "prune.png")
    print(f"\nwrote {out / 'table.md'}, {out / 'prune.png'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
