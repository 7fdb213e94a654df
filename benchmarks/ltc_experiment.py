"""LTC vs the instruction-tuned baseline, with the paper's ablations, on held-out seeds (lesson 10).

    OMP_NUM_THREADS=1 python benchmarks/ltc_experiment.py                      # household, ~10 min
    OMP_NUM_THREADS=1 python benchmarks/ltc_experiment.py --env all --out-dir runs/ltc-exp   # ~21 min
    python benchmarks/ltc_experiment.py --env qa --arms full --il-steps 300 --init runs/speedrun-laptop/sft/checkpoint
(times on 2 CPU cores shared with other jobs). Arms already finished in OUT are resumed, not rerun:
delete OUT (or one arm's folder) after changing the code.

Per environment: one instruction tuning on the scripted expert's demonstrations (the baseline,
shared by every arm), then four LTC runs from it (minilm/stages/ltc.py):
  full LTC   pattern = the environment's teacher pattern, L = L_LM + 0.5 L_PPO
  LM only    same pattern, L = L_LM (imitation of successful episodes, teacher text included)
  PPO only   same pattern, L = 0.5 L_PPO
  no teacher Monologue, L = L_LM + 0.5 L_PPO
Every arm is evaluated on the same held-out test seeds, greedy, with the agent alone; the Analogue
arms (and math's baseline) also with the solved example Analogue trains with. Writes
OUT/results.md (a table shaped like the paper's: rows = methods, columns = success / EM / F1 /
accuracy), OUT/results.json and OUT/ablations_ENV.png (held-out success per iteration, all arms).

Patterns: the paper pairs ALFWorld with Monologue, HotpotQA with Dialogue, GSM8K with Analogue.
For household we give the full arm a Dialogue teacher too, so "no teacher" is a real ablation
there (with the paper's pairing it would be the full arm itself).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from minilm.post.winrate import wilson_interval
from minilm.runtime import setup_runtime
from minilm.stages.ltc import instruction_tuned, ltc_config, run_ltc

TEACHER_PATTERN = {"household": "dialogue", "qa": "dialogue", "math": "analogue"}
METRIC = {"household": ("success", "success"), "qa": ("EM", "F1"), "math": ("accuracy", "accuracy")}


def arms(env: str, keep: list[str]) -> dict[str, dict]:
    every = {"lm": ("LM loss only", dict(pattern=TEACHER_PATTERN[env], loss="lm")),
             "ppo": ("PPO only", dict(pattern=TEACHER_PATTERN[env], loss="ppo")),
             "monologue": ("no teacher (Monologue)", dict(pattern="monologue", loss="full")),
             "full": (f"full LTC ({TEACHER_PATTERN[env]})", dict(pattern=TEACHER_PATTERN[env], loss="full"))}
    return dict(every[k] for k in keep)


def run_env(env: str, args) -> dict:
    out = Path(args.out_dir) / env
    common = dict(env=env, iterations=args.iterations, episodes_per_iter=args.episodes,
                  n_test=args.n_test, seed=args.seed)
    # the baseline: instruction tuning once, evaluated on the test seeds (no LTC iteration yet)
    # the teacher pattern only decides what the evaluation measures (analogue: also with the example)
    base = instruction_tuned(ltc_config(init=args.init, out_dir=str(out / "il-only"), pattern=TEACHER_PATTERN[env],
                                        il_steps=args.il_steps, **common), setup_runtime("auto"))[-1]
    il_ckpt = str(out / "il-only" / "il" / "checkpoint")
    results = {"instruction-tuned baseline": {**base, "rows": []}}
    for name, arm in arms(env, args.arms).items():
        t0 = time.time()
        r = run_ltc(ltc_config(init=il_ckpt, il_steps=0, out_dir=str(out / arm["loss"] / arm["pattern"]),
                               **common, **arm))
        results[name] = {**r["ltc"], "rows": r["rows"], "seconds": round(time.time() - t0, 1),
                         "best": max(row["test_success"] for row in r["rows"])}
        print(f"{env} / {name}: {r['ltc']}  ({results[name]['seconds']} s)", flush=True)
    plot(env, results, Path(args.out_dir) / f"ablations_{env}.png")
    return results


def plot(env: str, results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(results["instruction-tuned baseline"]["success"], color="gray", linestyle="--",
               label="instruction-tuned baseline")
    for name, r in results.items():
        if r["rows"]:
            ax.plot([0] + [row["iteration"] for row in r["rows"]],
                    [results["instruction-tuned baseline"]["success"]] + [row["test_success"] for row in r["rows"]],
                    marker="o", label=name)
    ax.set(xlabel="LTC iteration", ylabel=f"held-out {METRIC[env][0]}", title=f"LTC ablations: {env}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(rate: float, n: int) -> str:
    lo, hi = wilson_interval(rate * n, n)
    return f"{100 * rate:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def table(all_results: dict, n: int) -> str:
    """Markdown: rows = methods, columns = each environment's metric, with 95% Wilson intervals;
    math adds its accuracy with Analogue's solved example in the context (the training context)."""
    envs = list(all_results)
    extra = {"qa": f" | qa {METRIC['qa'][1]}", "math": " | math accuracy with example"}
    head = " | ".join(f"{e} {METRIC[e][0]}" + extra.get(e, "") for e in envs)
    lines = [f"| method | {head} |", "|---" * (1 + len(envs) + sum(e in extra for e in envs)) + "|"]
    for name in all_results[envs[0]]:
        cells = []
        for e in envs:
            r = next((v for k, v in all_results[e].items() if k.split(" (")[0] == name.split(" (")[0]), None)
            cells.append(_pct(r["success"], n) if r else "-")
            if e == "qa":
                cells.append(f"{100 * r['score']:.1f}" if r else "-")
            if e == "math":      # only arms evaluated with the example have it (not Monologue's)
                cells.append(_pct(r["success_with_example"], n) if r and "success_with_example" in r else "-")
        label = "full LTC (teacher pattern)" if name.startswith("full LTC") else name
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="household", choices=["household", "qa", "math", "all"])
    p.add_argument("--init", default="runs/sft-tiny/checkpoint")
    p.add_argument("--out-dir", default="runs/ltc-exp")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--il-steps", type=int, default=150, help="instruction-tuning steps of the shared baseline")
    p.add_argument("--arms", default="lm,ppo,monologue,full",
                   help="comma list of the LTC arms to run from the baseline: lm, ppo, monologue, full")
    args = p.parse_args()
    args.arms = args.arms.split(",")
    if not args.arms or set(args.arms) - {"lm", "ppo", "monologue", "full"}:
        p.error(f"--arms takes a comma list of lm, ppo, monologue, full; got {','.join(args.arms)!r}")
    envs = ["household", "qa", "math"] if args.env == "all" else [args.env]
    all_results = {env: run_env(env, args) for env in envs}
    out = Path(args.out_dir)
    md = (f"Held-out test seeds: {args.n_test} per environment, greedy, agent alone; "
          f"{args.iterations} LTC iterations x {args.episodes} episodes; % with 95% Wilson intervals (F1 without).\n\n{table(all_results, args.n_test)}\n")
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(all_results, indent=1))
    print(md)


if __name__ == "__main__":
    main()
