"""The figures of lessons 06-12, and the token-box drawing they share with lesson 02.

lessons/figures.py is the script (`python lessons/figures.py --only 09_dno_simplex`); this file only
holds figure functions, each `name(path)` or `name(input, path)`, computed with minilm's own code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from minilm.plots import pyplot, save

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))     # benchmarks/ is a folder of scripts, importable from the root

DPI = 90          # the committed PNGs: small enough to keep in git (tens of KB each)


# ---- token boxes ---------------------------------------------------------------------------------

def show_token(text: str) -> str:
    """A token's text with its whitespace made visible: space -> ␣, newline -> ↵."""
    return text.replace(" ", "␣").replace("\n", "↵") or "∅"


def layout(pieces: list[str], width: int) -> list[tuple[float, int, float]]:
    """(x, line, box width) of each piece, left to right, wrapping at `width` characters."""
    out, x, line = [], 0.0, 0
    for text in pieces:
        w = len(text) + 0.8
        if x + w > width and x > 0:
            x, line = 0.0, line + 1
        out.append((x, line, w))
        x += w + 0.25
    return out


def draw_boxes(ax, pieces: list[str], colours: list[str], width: int = 100, fontsize: float = 7) -> int:
    """Draw `pieces` as coloured boxes on `ax` (axis off); returns the number of lines used."""
    plt = pyplot()
    boxes = layout(pieces, width)
    for text, colour, (x, line, w) in zip(pieces, colours, boxes):
        ax.add_patch(plt.Rectangle((x, -line - 0.85), w, 0.7, fc=colour, ec="0.35", lw=0.5))
        ax.text(x + w / 2, -line - 0.5, text, ha="center", va="center", fontsize=fontsize, family="monospace")
    lines = boxes[-1][1] + 1 if boxes else 1
    ax.set(xlim=(-0.3, width + 0.3), ylim=(-lines - 0.05, 0.05))
    ax.axis("off")
    return lines


def token_figure(tok, ids: list[int], colours: list[str], legend: dict[str, str], title: str,
                 width: int = 110):
    """A figure of the tokens `ids` as boxes, one colour each, with a legend {label: colour}."""
    plt = pyplot()
    pieces = [show_token(tok.decode_bytes([i]).decode("utf-8", "replace")) for i in ids]
    lines = layout(pieces, width)[-1][1] + 1
    fig, ax = plt.subplots(figsize=(width / 11, 0.8 + 0.24 * lines))
    draw_boxes(ax, pieces, colours, width, fontsize=6.5)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc=c, ec="0.35") for c in legend.values()],
              labels=list(legend), loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(legend),
              fontsize=7.5, frameon=False)
    ax.set_title(title, fontsize=9, pad=18)
    return fig


# ---- the figures ---------------------------------------------------------------------------------

def chat_mask(tokenizer_dir: Path, path: Path) -> None:
    """Lesson 06: render_chat's tokens, the ones SFT trains on (loss mask 1) highlighted."""
    from minilm.post.chat import render_chat
    from minilm.tokenizer import Tokenizer
    tok = Tokenizer.load(tokenizer_dir)
    messages = [{"role": "system", "content": "You answer in one line."},
                {"role": "user", "content": "What does `ls` do?"},
                {"role": "assistant", "content": "list directory contents"}]
    ids, mask = render_chat(tok, messages)
    specials = set(tok.special_tokens.values())
    colours = ["#fd8d3c" if m else "#bdbdbd" if i in specials else "#f0f0f0" for i, m in zip(ids, mask)]
    fig = token_figure(tok, ids, colours, {"trained (loss mask 1)": "#fd8d3c", "special token, mask 0": "#bdbdbd",
                                           "text, mask 0": "#f0f0f0"},
                       f"render_chat: {len(ids)} tokens, {sum(mask)} trained ({tok.name} tokenizer)", width=70)
    save(fig, path, dpi=DPI)


def dpo_loss_curves(path: Path, betas=(0.05, 0.1, 0.5)) -> None:
    """Lesson 07: dpo_loss and its push on the chosen reply against the log-ratio difference."""
    from minilm.post.dpo import dpo_loss
    deltas = torch.linspace(-40, 40, 161)
    zero = torch.zeros(1)
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.3))
    for beta in betas:
        losses, pushes = [], []
        for delta in deltas:     # one pair: log pi(y_c) - log ref(y_c) = delta, the rejected side at 0
            chosen = delta.reshape(1).clone().requires_grad_(True)
            loss, _ = dpo_loss(chosen, zero, zero, zero, beta=beta)
            loss.backward()
            losses.append(loss.item())
            pushes.append(-chosen.grad.item())
        ax.plot(deltas.tolist(), losses, label=f"beta = {beta:g}")
        bx.plot(deltas.tolist(), pushes, label=f"beta = {beta:g}")
    ax.axhline(torch.log(torch.tensor(2.0)).item(), ls=":", c="gray", lw=0.8)
    ax.annotate("log 2 at 0: policy = reference", xy=(0, 0.69), xytext=(3, 6), fontsize=7.5, color="0.3",
                arrowprops=dict(arrowstyle="->", color="0.5"))
    ax.set(xlabel="log-ratio difference (nats); margin = beta x this", ylabel="L_DPO", title="the loss")
    bx.set(xlabel="log-ratio difference (nats)", ylabel="-dL / d log pi(y_c)",
           title="its push: beta * sigmoid(-margin)")
    ax.legend(fontsize=8)
    save(fig, path, dpi=DPI)


def hydra_memory(path: Path) -> None:
    """Lesson 08: benchmarks/hydra_memory.py's measurement (tiny preset, CPU, ~20 s), as bars."""
    from benchmarks.hydra_memory import BenchConfig, peak_bytes, ppo_runner, sft_runner, static_bytes
    from minilm.config import get_preset
    from minilm.post.ppo_models import VARIANTS
    cfg, model_cfg = BenchConfig(), get_preset("tiny")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, model_cfg.vocab_size, (cfg.batch_size, cfg.prompt_len), generator=gen).tolist()
    rows = {}
    for name in ("sft", *VARIANTS):
        model, step = sft_runner(cfg, model_cfg, prompts) if name == "sft" else \
            ppo_runner(name, cfg, model_cfg, prompts)
        weights, trainable = static_bytes(model)
        rows[name] = (weights / 1e6, trainable / 1e6, peak_bytes(model, step, "cpu") / 1e6)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = torch.arange(len(rows)).float()
    for k, label in enumerate(("weights", "trainable weights", "peak of one step")):
        bars = ax.bar(x + (k - 1) * 0.27, [r[k] for r in rows.values()], 0.27, label=label)
        if k == 2:
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.axhline(rows["sft"][2], ls="--", c="k", lw=0.8)
    ax.set_xticks(x, list(rows))
    ax.set(ylabel="MB (fp32)", title=f"tiny preset, batch {cfg.batch_size} x ({cfg.prompt_len} + {cfg.new_tokens}) "
           f"tokens, LoRA r = {cfg.lora_r} (LiveBytes on CPU)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    save(fig, path, dpi=DPI)


def dno_simplex(path: Path, iterations: int = 300, eta: float = 2.0) -> None:
    """Lesson 09: tabular DNO on rock-paper-scissors: the iterates circle, their average converges."""
    from minilm.post.dno import cyclic_demo, tabular_dno
    from minilm.post.oracles import RPS, RPS_TABLE
    out = tabular_dno(torch.tensor(RPS_TABLE), iterations, eta)
    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3 ** 0.5 / 2]])   # rock, paper, scissors
    steps = torch.arange(1, iterations + 1).float()[:, None]
    points = (out["iterates"] @ corners).numpy()
    average = ((out["iterates"].cumsum(0) / steps) @ corners).numpy()
    nash = (torch.tensor(cyclic_demo(iterations, eta)["nash"]) @ corners).numpy()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    ax.fill(*corners.numpy().T, fc="#f7f7f7", ec="0.3")
    for (x, y), name in zip(corners.tolist(), RPS):
        ax.text(x, y + (0.04 if y > 0 else -0.07), name, ha="center", fontsize=9)
    ax.plot(*points.T, c="#9ecae1", lw=0.8, marker=".", ms=3, label="iterate pi_t")
    ax.plot(*average.T, c="C3", lw=1.5, label="average of pi_1..pi_t")
    ax.plot(*nash, "k*", ms=12, label="von Neumann winner (1 : 1.5 : 2)")
    ax.plot(*points[0], "o", c="C0", ms=5, label="pi_1")
    ax.set(aspect="equal", ylim=(-0.12, 0.95))
    ax.set_title(f"tabular_dno on RPS_TABLE, eta = {eta:g}, {iterations} iterations", fontsize=9, pad=14)
    ax.axis("off")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(0.98, 1.0))
    save(fig, path, dpi=DPI)


def ltc_episode(tokenizer_dir: Path, path: Path, seed: int = 3) -> None:
    """Lesson 10: one Dialogue episode on the math env, a scripted agent (one wrong answer, then the
    expert's actions), with every token coloured by its role (`Episode.who`)."""
    from minilm.agents import patterns as pt
    from minilm.agents.envs import make_env
    from minilm.tokenizer import Tokenizer
    tok, env, cfg = Tokenizer.load(tokenizer_dir), make_env("math", split="test"), pt.RolloutConfig()
    pattern = pt.make_pattern("dialogue", teacher=pt.ScriptedTeacher())
    ep = pt.Episode(seed=seed)
    pattern.begin(env, ep, tok, cfg)
    prefix, end = [tok.special_id("<|assistant|>")] + tok.encode("\n"), tok.special_id("<|end|>")
    for action in ["answer[0]", *env.expert_actions()]:   # what run_episodes does, without sampling
        if ep.done:
            break
        ep.add(prefix, pt.SYSTEM)
        reply = tok.encode(action) + [end]
        pattern.respond(env, ep, tok, pt._agent_turn(tok, ep, reply, [0.0] * len(reply)), cfg)
    roles = {"SYSTEM (no loss)": "#f0f0f0", "AGENT (LM, policy, value)": "#74c476",
             "TEACHER (LM, policy)": "#6baed6", "VETOED (policy and value, return -1)": "#fb6a4a"}
    colours = [list(roles.values())[w] for w in ep.who]
    fig = token_figure(tok, ep.tokens, colours, roles, f"a Dialogue episode on math (seed {seed}): "
                       f"{len(ep.tokens)} tokens, success {ep.success}", width=115)
    save(fig, path, dpi=DPI)


def prune_schedule(path: Path) -> None:
    """Lesson 11: SparsitySchedule.density over the tiny prune preset, as the stage builds it."""
    from minilm.config import get_preset
    from minilm.prune.schedule import SparsitySchedule
    from minilm.stages.prune import prune_config
    cfg = prune_config("tiny")
    sched = SparsitySchedule(1.0 - cfg.sparsity, cfg.max_steps, cfg.prune_warmup, cfg.prune_final, cfg.mask_every)
    d_ff = get_preset("tiny").d_ff
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.step(range(cfg.max_steps), [sched.density(s) for s in range(cfg.max_steps)], where="post")
    ramp_end = cfg.prune_warmup + sched.ramp_steps
    ax.axvspan(0, cfg.prune_warmup, color="#c6dbef", alpha=0.6, label=f"warmup: dense ({cfg.prune_warmup})")
    ax.axvspan(ramp_end, cfg.max_steps, color="#fdd0a2", alpha=0.6, label=f"recovery at d_f ({cfg.prune_final})")
    ax.set(xlabel="step", ylabel="density (kept FFN neurons)", ylim=(0, 1.05),
           title=f"prune_config('tiny'): cubic ramp to {1 - cfg.sparsity:g}, mask every {cfg.mask_every} steps")
    ax.title.set_fontsize(9)
    right = ax.secondary_yaxis("right", functions=(lambda d: d * d_ff, lambda n: n / d_ff))
    right.set_ylabel(f"neurons per layer (of {d_ff})")
    ax.legend(fontsize=8, loc="lower left")
    save(fig, path, dpi=DPI)


def speedrun_dag(path: Path) -> None:
    """Lesson 12: the speedrun's STAGES, in run order (top to bottom), with arrows for `needs`."""
    from minilm.speedrun.stages import STAGES
    depth: dict[str, int] = {}
    for name, stage in STAGES.items():     # needs always name earlier stages
        depth[name] = 1 + max((depth[n] for n in stage.needs), default=-1)
    pos = {name: (depth[name] * 2.6, -row) for row, name in enumerate(STAGES)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, stage in STAGES.items():
        x, y = pos[name]
        for need in stage.needs:     # down from under the stage it needs, then right into this one
            nx, ny = pos[need][0] + 0.3, pos[need][1] - 0.3
            ax.plot([nx, nx], [ny, y], c="0.5", lw=1)
            ax.annotate("", xy=(x - 0.1, y), xytext=(nx, y), arrowprops=dict(arrowstyle="->", color="0.5"))
        ax.text(x, y, f"{name}", ha="left", va="center", fontsize=8.5, weight="bold",
                bbox=dict(boxstyle="round", fc="#dbe9f6" if stage.needs else "#fde2c4", ec="0.4"))
        ax.text(x + 0.35 + 0.15 * len(name), y, stage.title, va="center", fontsize=7, color="0.3")
    ax.set(xlim=(-0.2, max(x for x, _ in pos.values()) + 5.5), ylim=(-len(STAGES) + 0.4, 0.6),
           title="minilm speedrun: STAGES top to bottom in run order; arrows: needs")
    ax.title.set_fontsize(9)
    ax.axis("off")
    save(fig, path, dpi=DPI)
