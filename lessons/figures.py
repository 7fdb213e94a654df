"""The lessons' figures: every lessons/figures/NAME.png, redrawn from minilm's own code.

    python lessons/figures.py                    # every figure (runs the data pipeline once if needed)
    python lessons/figures.py --only 03_lr_schedule,09_dno_simplex
    python lessons/figures.py --list

One small function per figure. Each imports the library, computes what it shows (a forward pass, a
schedule, a loss, a manifest), and draws; the only data written here are the inputs chosen for the
picture. Lessons 00-05 are below, 06-12 in lessons/figures_post.py. Three figures read the output of

    python -m data_prep.pipeline --out runs/figures-pipeline --vocab-size 512 --ladder 200 \\
        --synthetic 200 --annotate-sample 120

(its manifest.json and its phase-1 tokenizer; about a minute, run by this script when missing).
The PNGs are committed small: dpi 90, a few inches wide.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]    # minilm, benchmarks/ and figures_post importable from anywhere

import figures_post as post  # lessons/figures_post.py: the figures of lessons 06-12, the token boxes
import torch
from figures_post import DPI, draw_boxes, show_token

from minilm.plots import pyplot, save

PIPELINE = ["--vocab-size", "512", "--ladder", "200", "--synthetic", "200", "--annotate-sample", "120"]


def layer_map(path: Path) -> None:
    """Lesson 00: the floors of tests/test_layers.py as boxes, top (interface) to bottom (base)."""
    spec = importlib.util.spec_from_file_location("test_layers", ROOT / "tests" / "test_layers.py")
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.6))
    n = len(layers.FLOORS)
    for k, (floor, patterns) in enumerate(layers.FLOORS):
        y = n - 1 - k
        ax.add_patch(plt.Rectangle((0, y + 0.08), 10, 0.84, fc=plt.cm.Blues(0.15 + 0.06 * k), ec="0.4"))
        ax.text(0.15, y + 0.5, floor, va="center", fontsize=10, weight="bold")
        ax.text(1.6, y + 0.5, "  ".join(p.removeprefix("minilm/") for p in patterns), va="center",
                fontsize=7.5, family="monospace")
    ax.annotate("", xy=(10.4, 0.2), xytext=(10.4, n - 0.2), arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.text(10.55, n / 2, "imports go down\n(or sideways),\nnever up", va="center", fontsize=8)
    ax.set(xlim=(0, 12), ylim=(0, n), title="minilm's floors (tests/test_layers.py FLOORS)")
    ax.axis("off")
    save(fig, path, dpi=DPI)


def decoder_diagram(path: Path, batch: int = 2, seq: int = 16) -> None:
    """Lesson 01: the tiny preset's decoder, each arrow labelled with the shape a hook recorded."""
    from minilm.config import get_preset
    from minilm.model import Phi3
    cfg = get_preset("tiny")
    model = Phi3(cfg)
    layer = model.model.layers[0]
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    watched = {"embed": model.model.embed_tokens, "norm1": layer.input_layernorm,
               "qkv": layer.self_attn.qkv_proj, "attn": layer.self_attn,
               "norm2": layer.post_attention_layernorm, "gate_up": layer.mlp.gate_up_proj,
               "down": layer.mlp.down_proj, "layer": layer, "norm": model.model.norm, "head": model.lm_head}
    shapes = {}   # key -> output shape, key_in -> shape of the first input, recorded by forward hooks
    for key, module in watched.items():
        module.register_forward_hook(lambda m, args, out, key=key: shapes.update(
            {key: tuple(out.shape), key + "_in": tuple(args[0].shape)}))
    with torch.no_grad():
        model(idx)
    d_qkv = f"(H + 2 H_kv) D = ({cfg.n_head} + 2*{cfg.n_kv_head}) * {cfg.head_dim}"
    steps = [  # (box, symbolic shape after it, recorded shape)
        ("token ids idx", "(B, T)", tuple(idx.shape)),
        ("embed_tokens", "(B, T, d)", shapes["embed"]),
        ("input_layernorm (RMSNorm)", "(B, T, d)", shapes["norm1"]),
        ("qkv_proj", f"(B, T, {d_qkv})", shapes["qkv"]),
        ((f"attention (RoPE, causal, GQA) + o_proj\nq (B, H={cfg.n_head}, T, D={cfg.head_dim}), "
          f"k and v (B, H_kv={cfg.n_kv_head}, T, D={cfg.head_dim})"), "(B, T, d)", shapes["attn"]),
        ("+ residual", "(B, T, d)", shapes["attn"]),
        ("post_attention_layernorm (RMSNorm)", "(B, T, d)", shapes["norm2"]),
        ("gate_up_proj", "(B, T, 2F)", shapes["gate_up"]),
        ("silu(gate) * up", "(B, T, F)", shapes["down_in"]),
        ("down_proj", "(B, T, d)", shapes["down"]),
        ("+ residual", "(B, T, d)", shapes["layer"]),
        ("norm (RMSNorm)", "(B, T, d)", shapes["norm"]),
        ("lm_head (tied to embed_tokens)", "(B, T, V)", shapes["head"]),
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 7.2))
    n = len(steps)
    for k, (name, symbolic, shape) in enumerate(steps):
        y = n - 1 - k
        inside = 2 <= k <= 10
        colour = "#fde2c4" if "residual" in name else "#dbe9f6" if inside else "#e8e8e8"
        ax.add_patch(plt.Rectangle((0, y + 0.2), 5.2, 0.6, fc=colour, ec="0.3"))
        ax.text(2.6, y + 0.5, name, ha="center", va="center", fontsize=7)
        if k < n - 1:
            ax.annotate("", xy=(2.6, y - 0.2), xytext=(2.6, y + 0.2), arrowprops=dict(arrowstyle="->"))
        ax.text(5.45, y + (0.0 if k < n - 1 else 0.5), f"{symbolic} = {shape}",
                va="center", fontsize=7, family="monospace")
    for start, plus in ((2, 5), (6, 10)):   # the residual stream goes around each block
        y0, y1 = n - 1 - start + 1.0, n - 1 - plus + 0.5
        ax.plot([2.6, -0.3, -0.3], [y0, y0, y1], c="#c0712c", lw=1)
        ax.annotate("", xy=(0, y1), xytext=(-0.3, y1), arrowprops=dict(arrowstyle="->", color="#c0712c"))
    ax.add_patch(plt.Rectangle((-0.55, n - 11 - 0.05), 5.95, 9.1, fill=False, ls="--", ec="0.5"))
    ax.text(-0.75, n - 6.5, f"x n_layer = {cfg.n_layer}", rotation=90, va="center", ha="center", fontsize=8)
    ax.set(xlim=(-1.0, 10.2), ylim=(-0.3, n), title=f"tiny preset, B = {batch}, T = {seq}: d = {cfg.d_model}, "
           f"F = {cfg.d_ff}, V = {cfg.vocab_size}, D = {cfg.head_dim}")
    ax.axis("off")
    save(fig, path, dpi=DPI)


def causal_masks(path: Path, t: int = 4, s: int = 6) -> None:
    """Lesson 01: T queries over S keys, top-left (j <= i) against minilm's bottom-right mask."""
    from minilm.ops.reference import causal_mask
    masks = {"top-left: j <= i\n(SDPA is_causal; rows of the square mask's top)": causal_mask(s, s)[:t],
             "bottom-right: j <= i + (S - T)\n(minilm causal_mask(T, S))": causal_mask(t, s)}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.3))
    for ax, (title, mask) in zip(axes, masks.items()):
        ax.imshow(mask.int().numpy(), cmap="Blues", vmin=-0.3, vmax=1.2)
        for i in range(t):
            for j in range(s):
                ax.text(j, i, "sees" if mask[i, j] else "", ha="center", va="center", fontsize=7, c="w")
        ax.set_xticks(range(s), [f"k{j}" for j in range(s)])
        ax.set_yticks(range(t), [f"q{i}" for i in range(t)])
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"T = {t} new queries, S = {s} keys (the last {t} positions are the queries)", fontsize=9)
    save(fig, path, dpi=DPI)


def bpe(path: Path) -> None:
    """Lesson 02: how the two split patterns cut an expression, and tokens left per merge learnt."""
    import regex

    import minilm.bpe_train as tk
    expr = "x = 1234 + 56;"
    text = tk.__doc__    # the BPE trainer's own docstring: ~2 KB of English
    merges = tk.learn_merges(tk.count_chunks([text]), 200)
    steps = list(range(0, 201, 10))
    counts = [len(tk.reference_encode(text, merges[:k])) for k in steps]
    plt = pyplot()
    fig = plt.figure(figsize=(9, 3.6))
    grid = fig.add_gridspec(2, 2, width_ratios=(1.1, 1))
    for row, (name, pattern) in enumerate((("SPLIT_PATTERN (minilm)", tk.SPLIT_PATTERN),
                                           ("GPT4_SPLIT_PATTERN (cl100k)", tk.GPT4_SPLIT_PATTERN))):
        ax = fig.add_subplot(grid[row, 0])
        chunks = regex.findall(pattern, expr)
        draw_boxes(ax, [show_token(c) for c in chunks], ["#dbe9f6" if c.strip().isdigit() else "#eeeeee"
                                                          for c in chunks], width=30, fontsize=9)
        ax.set_ylim(-2.4, 0.4)    # one line of boxes, not stretched to the panel's height
        ax.set_title(f"{expr!r} cut by {name}: {len(chunks)} chunks", fontsize=8.5)
    ax = fig.add_subplot(grid[:, 1])
    ax.plot(steps, counts, marker=".")
    ax.set(xlabel="merges learnt", ylabel="tokens", title="the BPE trainer's docstring, BPE on itself")
    ax.title.set_fontsize(9)
    save(fig, path, dpi=DPI)


def lr_schedule(path: Path) -> None:
    """Lesson 03: lr_at over the tiny preset's pretraining run, warmup and the phase-2 switch marked."""
    from minilm.loop import lr_at
    from minilm.stages.pretrain import phase2_start, train_config
    cfg = train_config("tiny")
    steps = range(cfg.max_steps)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot(steps, [lr_at(s, cfg.optim, cfg.max_steps) for s in steps])
    ax.axvline(cfg.optim.warmup_steps, ls="--", c="gray", label=f"warmup ends ({cfg.optim.warmup_steps})")
    ax.axvline(phase2_start(cfg), ls=":", c="k", label=f"phase 2 data ({phase2_start(cfg)})")
    ax.set(xlabel="step", ylabel="learning rate", title=f"train_config('tiny'): lr {cfg.optim.lr:g}, "
           f"cosine to {cfg.optim.min_lr_ratio:g} x lr at {cfg.max_steps}")
    ax.legend(fontsize=8)
    save(fig, path, dpi=DPI)


def online_softmax(path: Path, keys: int = 48, block: int = 8) -> None:
    """Lesson 04: one query row against key tiles: scores, running max m and running lse = m + log l."""
    from minilm.ops.tiled import flash_forward
    gen = torch.Generator().manual_seed(4)   # a row whose maximum grows in several tiles
    d = 16
    q = torch.randn(1, 1, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, keys, d, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 1.6, keys)[:, None]
    v = torch.randn(1, 1, keys, d, generator=gen, dtype=torch.float64)
    scores = (q @ k.transpose(-2, -1))[0, 0, 0] / d ** 0.5
    ends = list(range(block, keys + 1, block))
    # the lse flash_forward returns after the first j tiles = the running m + log l after tile j
    lse = [flash_forward(q, k[:, :, :j], v[:, :, :j], causal=False, block_k=block)[1].item() for j in ends]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 3.3))
    ax.bar(range(keys), scores.tolist(), color="#9ecae1", label="score s_j = q k_j / sqrt(D)")
    for j in ends[:-1]:
        ax.axvline(j - 0.5, c="0.7", lw=0.8)
    xs = [x for j in ends for x in (j - block - 0.5, j - 0.5)]
    ax.plot(xs, [scores[:j].max().item() for j in ends for _ in (0, 1)], c="C3", label="running max m")
    ax.plot(xs, [v for v in lse for _ in (0, 1)], c="C2", label="running lse = m + log l (flash_forward)")
    ax.axhline(torch.logsumexp(scores, 0).item(), ls="--", c="k", lw=0.8, label="logsumexp of the whole row")
    ax.set(xlabel=f"key j (tiles of {block})", ylabel="score", title="online softmax: one query row, tile by tile")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(fig, path, dpi=DPI)


def data_funnel(manifest_path: Path, path: Path) -> None:
    """Lesson 05: documents and MB kept after each pipeline stage, from a run's manifest.json."""
    import json
    stages = json.loads(Path(manifest_path).read_text())["stages"]
    names = ["read", "normalise", "filters", "dedup", "classifier", "synthetic"]
    kept = [stages[n]["kept"]["total"] for n in names]
    dropped = [stages[n]["dropped"]["total"]["documents"] for n in names]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    colours = ["#6baed6"] * 4 + ["#2171b5", "#fd8d3c"]
    for ax, key, scale, label in ((axes[0], "documents", 1, "documents kept"),
                                  (axes[1], "characters", 1e6, "MB kept (characters / 1e6)")):
        values = [k[key] / scale for k in kept]
        ax.barh(names[::-1], values[::-1], color=colours[::-1])
        for y, (value, gone) in enumerate(zip(values[::-1], dropped[::-1])):
            text = f" {value:.2f}" if scale > 1 else f" {value:,.0f}" + (f"  ({gone} dropped)" if gone else "")
            ax.text(value, y, text, va="center", fontsize=7.5)
        ax.set(xlabel=label, xlim=(0, max(values) * 1.45))
    fig.suptitle("data_prep.pipeline's manifest.json: phase 1 = after dedup; phase 2 = the classifier's top "
                 "+ synthetic", fontsize=9)
    save(fig, path, dpi=DPI)


def registry(pipeline: Path) -> dict:
    """NAME -> function(path) for every figure; the pipeline's outputs feed 05, 06 and 10."""
    tokenizer = pipeline / "phase1"
    return {"00_layers": layer_map, "01_decoder": decoder_diagram, "01_masks": causal_masks,
            "02_bpe": bpe, "03_lr_schedule": lr_schedule, "04_online_softmax": online_softmax,
            "05_data_funnel": partial(data_funnel, pipeline / "manifest.json"),
            "06_chat_mask": partial(post.chat_mask, tokenizer), "07_dpo_loss": post.dpo_loss_curves,
            "08_hydra_memory": post.hydra_memory, "09_dno_simplex": post.dno_simplex,
            "10_ltc_episode": partial(post.ltc_episode, tokenizer), "11_prune_schedule": post.prune_schedule,
            "12_speedrun_dag": post.speedrun_dag}


NEEDS_PIPELINE = ("05_data_funnel", "06_chat_mask", "10_ltc_episode")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated figure names (default: all)")
    parser.add_argument("--out", default=str(HERE / "figures"), help="folder for NAME.png")
    parser.add_argument("--pipeline", default=str(ROOT / "runs" / "figures-pipeline"),
                        help="a data_prep.pipeline output folder (made if it has no manifest.json)")
    parser.add_argument("--list", action="store_true", help="print the figure names and stop")
    args = parser.parse_args(argv)
    pipeline, out = Path(args.pipeline), Path(args.out)
    figures = registry(pipeline)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(figures)
    if args.list:
        print("\n".join(figures))
        return
    unknown = [n for n in names if n not in figures]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose from: {', '.join(figures)}")
    if any(n in NEEDS_PIPELINE for n in names) and not (pipeline / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data_prep.pipeline", "--out", str(pipeline), *PIPELINE],
                       cwd=ROOT, check=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        torch.manual_seed(0)
        figures[name](out / f"{name}.png")
        print(f"{name}.png  {(out / f'{name}.png').stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
