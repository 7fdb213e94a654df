"""Does data quality beat data quantity? The Phi-3 thesis at laptop scale.

    python benchmarks/data_quality.py                  # ~5 minutes on 2 CPU cores
    python benchmarks/data_quality.py --steps 240 --fresh   # quicker, noisier

The SAME model (`tiny`, same seed and schedule) trains for the SAME number of steps and tokens on
two data sets that share one tokenizer:

  raw       every document the sources give (normalised whitespace only): no heuristic filters,
            no deduplication, no classifier, no synthetic data;
  filtered  the data pipeline's two phases: the first half of the steps on phase 1 (filtered and
            deduplicated), then the second half on phase 2 (classifier-selected "educational" subset
            plus synthetic exercises), continuing from the phase-1 checkpoint (optimizer included).

Both are scored on the same bytes:
  held-out bpb  bits per byte on the validation split of phase 2's *real* (non-synthetic) documents:
                text that survived every filter, whose ids hash to validation in every data set;
  probe         100 arithmetic word problems from `data_prep.synthetic.word_problem`. For the prompt
                "Exercise: <question>\\nAnswer:" we compare the model's log-likelihood of " <answer>"
                with that of " <answer +-1>" and " <answer +-10>"; a problem counts when the correct
                answer ranks first. This is a likelihood-ranking probe, not generation: a 1M-parameter
                model cannot do the arithmetic, and chance is 1/k for k candidates (usually 1/5).

Fairness: raw training data drops any document that deduplication paired with a validation document,
so neither run sees a (near-)copy of the held-out text. Writes runs/data_quality/results.json and
data_quality.png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.document import Document
from data_prep.pipeline import PipelineConfig, normalise, run_pipeline, write_phase
from data_prep.sources import iter_documents
from data_prep.synthetic import word_problem
from minilm.checkpoint import load_checkpoint, read_config
from minilm.config import build
from minilm.data import is_validation
from minilm.stages.pretrain import TrainConfig, train
from minilm.tokenizer import Tokenizer

ROOT = Path("runs/data_quality")


class _StopPhase(Exception):
    """Raised from `on_step` to end phase 1 right after its checkpoint is written."""


def build_raw(pcfg: PipelineConfig, tokenizer, out: Path) -> tuple[Path, list[Document]]:
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
        write_phase(out, "raw", [d for d in docs if d.id not in leaks], tokenizer, pcfg)
    return out, held_out


@torch.no_grad()
def held_out_bpb(model, tokenizer, docs: list[Document], seq_len: int, max_windows: int = 512) -> dict:
    """Bits per byte over the same token stream for every model: documents joined by <|endoftext|>."""
    ids, n_bytes = [], 0
    for d in docs:
        toks = tokenizer.encode(d.text) + [tokenizer.eot_id]
        ids += toks
        n_bytes += len(d.text.encode("utf-8"))
        if len(ids) > max_windows * seq_len + 1:
            break
    n_windows = min(max_windows, (len(ids) - 1) // seq_len)
    ids = ids[:n_windows * seq_len + 1]
    data = torch.tensor(ids)
    x, y = data[:-1].view(n_windows, seq_len), data[1:].view(n_windows, seq_len)
    total = 0.0
    for i in range(0, n_windows, 16):
        logits, _ = model(x[i:i + 16])
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y[i:i + 16].flatten(),
                                                   reduction="sum").item()
    n_tok = n_windows * seq_len
    # bytes of exactly the scored tokens (decode the targets; <|endoftext|> counts as 0 bytes)
    scored_bytes = len(tokenizer.decode_bytes([t for t in y.flatten().tolist() if t != tokenizer.eot_id]))
    return {"loss": total / n_tok, "bpb": total / math.log(2) / scored_bytes, "tokens": n_tok,
            "bytes": scored_bytes}


@torch.no_grad()
def probe(model, tokenizer, n: int = 100, seed: int = 0) -> dict:
    """Rank the correct answer against answer+-1, +-10 by summed log-likelihood after "Answer:"."""
    rng, hits, chance = random.Random(seed), 0, 0.0
    for _ in range(n):
        question, answer = word_problem(rng)
        cands = [answer] + [c for c in (answer - 1, answer + 1, answer - 10, answer + 10) if c >= 0]
        prompt = tokenizer.encode(f"Exercise: {question}\nAnswer:")
        scores = []
        for c in cands:
            cont = tokenizer.encode(f" {c}")
            ids = torch.tensor([prompt + cont])
            logp = torch.log_softmax(model(ids[:, :-1])[0].float(), -1)[0]
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
        hits += max(range(len(cands)), key=scores.__getitem__) == 0
        chance += 1 / len(cands)
    return {"accuracy": hits / n, "chance": chance / n, "n": n}


def run(name: str, phases: list[tuple[str, int]], steps: int, args) -> Path:
    """Train one model through `phases` [(data_dir, end_step)] in one out_dir (one LR schedule)."""
    out = ROOT / name
    if (out / "checkpoint" / "train_state.pt").exists() and args.fresh:
        shutil.rmtree(out)
    for data_dir, end in phases:
        if (out / "checkpoint" / "config.json").exists() and read_config(out / "checkpoint")["meta"]["step"] >= end:
            continue  # this phase finished in an earlier run
        cfg = build(TrainConfig, preset="tiny", model=dict(args.model), out_dir=str(out), data_dir=str(data_dir),
                          batch_size=args.batch_size, seq_len=args.seq_len, max_steps=steps, lr=3e-3,
                          warmup_steps=max(1, steps // 20), eval_every=10**9, eval_batches=4,
                          ckpt_every=end, seed=1337, device="cpu")

        def stop(step, row, end=end):
            if step == end and end < steps:
                raise _StopPhase

        try:
            train(cfg, on_step=stop)
        except _StopPhase:
            pass
    return out / "checkpoint"


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["data"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.5))
    a.bar(names, [r["held_out_bpb"] for r in results], color=["gray", "tab:green"])
    a.set(ylabel="bits per byte (lower is better)", title="held-out clean text")
    b.bar(names, [r["probe_accuracy"] for r in results], color=["gray", "tab:green"])
    b.axhline(results[0]["probe_chance"], linestyle="--", color="black", label="chance")
    b.set(ylabel="accuracy", title="arithmetic probe (likelihood ranking)", ylim=(0, 1))
    b.legend()
    fig.suptitle(f"same model, same {results[0]['train_tokens']:,} training tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per model (split in half when phased)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=0, help="override the tiny preset's depth (0: keep)")
    p.add_argument("--limit-per-source", type=int, default=400)
    p.add_argument("--synthetic", type=int, default=1500)
    p.add_argument("--fresh", action="store_true", help="retrain even if checkpoints exist")
    args = p.parse_args(argv)
    args.model = {"n_layer": args.n_layer} if args.n_layer else {}
    t0 = time.time()
    torch.set_num_threads(2)

    pcfg = PipelineConfig(out=str(ROOT / "pipeline"), sources=["stdlib", "doc", "pypi", "man"],
                          limit_per_source=args.limit_per_source, vocab_size=2048, synthetic=args.synthetic,
                          progress=False)
    manifest = ROOT / "pipeline" / "manifest.json"
    if manifest.exists() and {k: json.loads(manifest.read_text())["config"][k] for k in ("limit_per_source", "synthetic")} \
            != {"limit_per_source": pcfg.limit_per_source, "synthetic": pcfg.synthetic}:
        raise SystemExit(f"{ROOT} was built with other data settings; delete it (rm -r {ROOT}) and re-run")
    if not manifest.exists():
        run_pipeline(pcfg)
    phase1, phase2 = ROOT / "pipeline" / "phase1", ROOT / "pipeline" / "phase2"
    tokenizer = Tokenizer.load(phase1)
    raw_dir, held_out = build_raw(pcfg, tokenizer, ROOT / "raw")

    half = args.steps // 2
    ckpts = {"raw": run("raw", [(raw_dir, args.steps)], args.steps, args),
             "filtered+synthetic": run("filtered", [(phase1, half), (phase2, args.steps)], args.steps, args)}
    results = []
    for name, ck_dir in ckpts.items():
        ck = load_checkpoint(ck_dir)
        assert ck.tokenizer.fingerprint() == tokenizer.fingerprint()
        ck.model.eval()
        ev, pr = held_out_bpb(ck.model, tokenizer, held_out, args.seq_len), probe(ck.model, tokenizer)
        steps = read_config(ck_dir)["meta"]["step"]  # what was trained, even when reused from a past run
        results.append({"data": name, "steps": steps, "train_tokens": steps * args.batch_size * args.seq_len,
                        "held_out_bpb": ev["bpb"], "held_out_loss": ev["loss"], "held_out_tokens": ev["tokens"],
                        "probe_accuracy": pr["accuracy"], "probe_chance": pr["chance"], "probe_n": pr["n"]})

    print(f"\nheld-out: {len(held_out)} phase-2 real validation documents "
          f"({results[0]['held_out_tokens']} tokens scored); probe: 100 word problems, candidates answer, +-1, +-10")
    print("| data | train tokens | held-out bpb | held-out loss (nats/tok) | probe acc | chance |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['data']} | {r['train_tokens']:,} | {r['held_out_bpb']:.3f} | {r['held_out_loss']:.3f} | "
              f"{r['probe_accuracy']:.2f} | {r['probe_chance']:.2f} |")
    (ROOT / "results.json").write_text(json.dumps({"config": {k: v for k, v in vars(args).items()},
                                                   "held_out_documents": len(held_out),
                                                   "results": results}, indent=2))
    if plot(results, ROOT / "data_quality.png"):
        print(f"wrote {ROOT / 'data_quality.png'}")
    print(f"wrote {ROOT / 'results.json'} in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
