"""Does the data make the model? Raw text against the filtered + synthetic recipe, at equal tokens.

    python benchmarks/data_quality.py                              # 3 seeds, ~75 minutes on 2 CPU cores
    python benchmarks/data_quality.py --seeds 1337 --steps 200     # one quick, noisy pair

The SAME model (`tiny`), schedule and number of training tokens, on two data sets of the default
pinned corpus that share one tokenizer:

  raw       every pinned document (whitespace normalised only): no heuristic filters, no
            deduplication, no classifier, no synthetic textbook or skill-ladder data;
  filtered  the speedrun's data stage (`minilm data`): the first half of the steps on phase 1
            (filtered, deduplicated), the second half on phase 2 (the classifier's "educational"
            subset plus synthetic textbook exercises and skill-ladder worksheets), as Phi-3 runs its
            two phases (arXiv 2404.14219).

Then each model gets the same SFT (the speedrun's `laptop` SFT preset, its clean-text replay drawn
from its own real text: raw, or phase 1) and is scored on:

  held-out bpb   bits per byte of the pretrained model on the validation split of phase 2's real
                 documents: text that every data set holds out;
  ladder         greedy accuracy of the SFT model on 300 held-out skill-ladder problems (the eval
                 suite's), with the paired 95% bootstrap of filtered - raw on the same items.

Every (data, seed) pair is one pretraining + SFT run; finished runs in OUT are reused. Writes
OUT/results.json and OUT/data_quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.document import Document
from data_prep.pipeline import normalise, pipeline_config, run_pipeline
from data_prep.sources import iter_documents
from data_prep.stream import write_phase
from minilm.checkpoint import load_checkpoint
from minilm.data import is_validation
from minilm.eval.ladder import ladder_items, ladder_metrics
from minilm.eval.suite import judged_replies, load_for_eval
from minilm.post.winrate import paired_gain
from minilm.stages.pretrain import train, train_config
from minilm.stages.sft import run_sft, sft_config
from minilm.tokenizer import Tokenizer


def build_raw(pcfg, tokenizer, out: Path) -> tuple[Path, list[Document]]:
    """The unfiltered data set (same sources, same tokenizer) and the clean held-out documents."""
    dropped = [json.loads(line) for line in (Path(pcfg.out) / "dropped.jsonl").read_text().splitlines()]
    dropped_ids = {d["id"] for d in dropped}
    docs = [Document(d.id, d.source, normalise(d.text), dict(d.meta))
            for d in iter_documents(pcfg.sources, pcfg.limit_per_source)]
    docs = [d for d in docs if d.text.strip()]
    # held-out: real documents that reached phase 2 (dropped by no stage) and hash to validation
    held_out = [d for d in docs if d.id not in dropped_ids and is_validation(d.id, pcfg.val_fraction)]
    # leak guard: drop dedup duplicates whose original (or themselves) is a validation document
    val = lambda i: i is not None and is_validation(i, pcfg.val_fraction)
    leaks = {d["id"] for d in dropped if d["stage"] == "dedup" and (val(d["duplicate_of"]) or val(d["id"]))}
    leaks |= {d["duplicate_of"] for d in dropped if d["stage"] == "dedup" and val(d["id"])}
    if not (out / "meta.json").exists():
        write_phase(out, "raw", [d for d in docs if d.id not in leaks], tokenizer, pcfg.val_fraction)
    return out, held_out


@torch.no_grad()
def held_out_bpb(model, tokenizer, docs: list[Document], seq_len: int, max_windows: int = 256) -> float:
    """Bits per byte over the same token stream for every model: documents joined by <|endoftext|>."""
    ids = []
    for d in docs:
        ids += tokenizer.encode(d.text) + [tokenizer.eot_id]
        if len(ids) > max_windows * seq_len + 1:
            break
    n_windows = min(max_windows, (len(ids) - 1) // seq_len)
    data = torch.tensor(ids[:n_windows * seq_len + 1])
    x, y = data[:-1].view(n_windows, seq_len), data[1:].view(n_windows, seq_len)
    nats = sum(torch.nn.functional.cross_entropy(model(x[i:i + 16])[0].float().flatten(0, 1), y[i:i + 16].flatten(),
                                                 reduction="sum").item() for i in range(0, n_windows, 16))
    # bytes of exactly the scored tokens (<|endoftext|> counts as 0 bytes)
    scored_bytes = len(tokenizer.decode_bytes([t for t in y.flatten().tolist() if t != tokenizer.eot_id]))
    return nats / math.log(2) / scored_bytes


def pretrain_and_sft(root: Path, data: dict, steps: int, sft_steps: int, seed: int) -> tuple[Path, Path]:
    """One (data, seed) run: pretraining for `steps`, then the laptop SFT; resumes what exists."""
    pre = root / f"{data['name']}-seed{seed}"
    train(train_config("laptop", out_dir=str(pre), data_dir=str(data["dir"]), phase2_dir=str(data["phase2"]),
                       phase2_fraction=0.5 if data["phase2"] else 0.0, max_steps=steps,
                       warmup_steps=max(1, steps // 50), eval_every=10**9, ckpt_every=steps, seed=seed))
    sft = root / f"{data['name']}-seed{seed}-sft"
    # the clean-text replay reads each arm's real text, as the speedrun's SFT reads phase 1
    run_sft(sft_config("laptop", init=str(pre / "checkpoint"), out_dir=str(sft), seed=seed, n_eval=8, max_steps=sft_steps,
                       text_data=str(data["dir"])))
    return pre / "checkpoint", sft / "checkpoint"


def plot(rows: list[dict], gains: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, title in [(axes[0], "bpb", "held-out bits per byte (lower is better)"),
                           (axes[1], "ladder_acc", "held-out ladder accuracy after SFT")]:
        for x, name in enumerate(["raw", "filtered"]):
            values = [r[key] for r in rows if r["data"] == name]
            ax.bar(x, statistics.mean(values), color=["gray", "tab:green"][x], alpha=0.6)
            ax.scatter([x] * len(values), values, color="black", zorder=3, s=12, label="one seed" if x else None)
        ax.set(xticks=[0, 1], xticklabels=["raw", "filtered + synthetic"], title=title)
    axes[1].legend()
    fig.suptitle(f"same model and {rows[0]['train_tokens']:,} tokens; {len(gains)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=800, help="pretraining steps of 16 x 256 tokens per model")
    p.add_argument("--sft-steps", type=int, default=420, help="SFT steps (the laptop preset's)")
    p.add_argument("--seeds", default="1337,1,2", help="comma list of training seeds")
    p.add_argument("--per-rung", type=int, default=50, help="held-out ladder problems per rung")
    p.add_argument("--out-dir", default="runs/data_quality")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    root, t0 = Path(args.out_dir), time.time()
    pcfg = pipeline_config("laptop", out=str(root / "pipeline"), progress=False)
    if not (root / "pipeline" / "manifest.json").exists():
        run_pipeline(pcfg)
    phase1, phase2 = root / "pipeline" / "phase1", root / "pipeline" / "phase2"
    tokenizer = Tokenizer.load(phase1)
    raw_dir, held_out = build_raw(pcfg, tokenizer, root / "raw")
    datasets = [{"name": "raw", "dir": raw_dir, "phase2": ""}, {"name": "filtered", "dir": phase1, "phase2": phase2}]
    items = ladder_items(args.per_rung)
    rows, scores = [], {}
    for seed in seeds:
        for data in datasets:
            pre, sft = pretrain_and_sft(root, data, args.steps, args.sft_steps, seed)
            model = load_checkpoint(pre).model.eval()
            sft_model, sft_tok = load_for_eval(sft)
            scores[data["name"], seed] = [int(j["correct"]) for j in judged_replies(sft_model, sft_tok, items, 96, 64)]
            rows.append({"data": data["name"], "seed": seed, "train_tokens": args.steps * 16 * 256,
                         "bpb": held_out_bpb(model, tokenizer, held_out, model.config.max_seq_len),
                         **ladder_metrics(scores[data["name"], seed], items)})
            print(json.dumps(rows[-1]), flush=True)
    gains = []
    for seed in seeds:
        g, lo, hi = paired_gain(scores["filtered", seed], scores["raw", seed])
        bpb = {r["data"]: r["bpb"] for r in rows if r["seed"] == seed}
        gains.append({"seed": seed, "ladder_gain": g, "ladder_gain_lo": lo, "ladder_gain_hi": hi,
                      "bpb_gain": bpb["raw"] - bpb["filtered"]})
    print(f"\n{len(held_out)} held-out documents; {len(items)} held-out ladder problems; "
          f"{rows[0]['train_tokens']:,} pretraining tokens per model\n")
    print("| seed | raw bpb | filtered bpb | raw ladder | filtered ladder | ladder gain [95%] |")
    print("|---|---:|---:|---:|---:|---:|")
    for g in gains:
        r = {x["data"]: x for x in rows if x["seed"] == g["seed"]}
        print(f"| {g['seed']} | {r['raw']['bpb']:.3f} | {r['filtered']['bpb']:.3f} | {r['raw']['ladder_acc']:.3f} | "
              f"{r['filtered']['ladder_acc']:.3f} | {g['ladder_gain']:+.3f} [{g['ladder_gain_lo']:+.3f}, "
              f"{g['ladder_gain_hi']:+.3f}] |")
    def spread(key: str) -> str:
        values = [g[key] for g in gains]
        return f"{statistics.mean(values):+.3f} (min {min(values):+.3f}, max {max(values):+.3f})"
    print(f"\nover seeds: ladder gain {spread('ladder_gain')}; bpb lower by {spread('bpb_gain')}")
    out = {"config": vars(args), "held_out_documents": len(held_out), "rows": rows, "gains": gains}
    (root / "results.json").write_text(json.dumps(out, indent=2))
    plot(rows, gains, root / "data_quality.png")
    print(f"wrote {root / 'results.json'} and {root / 'data_quality.png'} in {time.time() - t0:.0f} s")
    return out


if __name__ == "__main__":
    main()
