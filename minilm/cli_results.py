"""What each `minilm <stage>` command prints when it finishes: the numbers a user wants to see.

    show_sft(run_sft(cfg))      # held-out rates before -> after, and the checkpoint path

Each function takes the dict the stage's run_<stage> returned; minilm/cli.py calls them.
"""

from __future__ import annotations

from minilm.post.dno import cyclic_demo


def show_sft(result: dict) -> None:
    print(f"\nheld-out prompts ({result['n_heldout']}), greedy replies:   before -> after SFT")
    for key in sorted(result["before"]):
        print(f"  {key:22s} {result['before'][key]:6.3f} -> {result['after'].get(key, float('nan')):6.3f}")
    print(f"checkpoint: {result['checkpoint']}")


def show_prune(r: dict) -> None:
    print(f"\n{r['method']} ({r['ranking']} ranking), sparsity {r['sparsity']}: per-layer density "
          f"{', '.join(f'{d:.2f}' for d in r['densities'])}")
    print(f"  held-out loss {r['before']['heldout_loss']:.3f} -> {r['after']['heldout_loss']:.3f} (dense -> pruned)")
    for key in ("redundancy", "sensitivity"):
        before, after = r["redundancy_before"][key], r["redundancy_after"][key]
        print(f"  {key:12s} " + "  ".join(f"L{i} {b:.3g}->{a:.3g}" for i, (b, a) in enumerate(zip(before, after))))
    print(f"masked checkpoint: {r['masked_checkpoint']}"
          + (f"\ncompact checkpoint: {r['compact']['path']}" if r["compact"] else ""))


def show_reward(result: dict) -> None:
    before, after = result["before"], result["after"]
    print(f"\nheld-out pairs ({result['n_heldout_pairs']}):   before -> after")
    for key in ("eval_accuracy", "eval_margin", "eval_bt_loss", "eval_lm_loss"):
        print(f"  {key:16s} {before[key]:7.3f} -> {after[key]:7.3f}")
    for reason, acc in after["by_reason"].items():  # per kind of rejected reply
        print(f"  accuracy on {reason!r}: {before['by_reason'][reason]:.3f} -> {acc:.3f}")
    print(f"checkpoint (heads in heads.safetensors): {result['checkpoint']}")


def show_dpo(result: dict) -> None:
    print(f"\nheld-out pairs ({result['n_heldout_pairs']}): accuracy {result['eval_accuracy']:.3f}, "
          f"margin {result['eval_margin']:.3f}, chosen/rejected implicit reward "  # beta * log(pi / ref)
          f"{result['eval_chosen_reward']:.3f} / {result['eval_rejected_reward']:.3f}; the model itself "
          f"ranks chosen first: SFT {result['eval_ref_ranks_chosen']:.3f} -> DPO {result['eval_policy_ranks_chosen']:.3f}")
    print(f"held-out prompts ({result['n_judge']}), greedy replies:   SFT -> DPO")
    for key in result["sft"]:
        print(f"  {key:14s} {result['sft'][key]:6.3f} -> {result['dpo'][key]:6.3f}")
    h2h = result["dpo_vs_sft"]
    print(f"  DPO reply preferred over the SFT reply: {h2h['preferred_rate']:.3f} "
          f"(wins {h2h['win_rate']:.3f}, ties {h2h['tie_rate']:.3f})")
    print(f"checkpoint: {result['checkpoint']}")


def show_dno(result: dict) -> None:
    print("\n" + result["table"])
    print(f"best iterate on validation: {result['best_iteration']} ({result['best_checkpoint']})")


def show_cyclic_demo(iterations: int) -> None:
    """`minilm dno --oracle cyclic`: the tabular intransitive-oracle demo of minilm/post/dno.py."""
    d = cyclic_demo(iterations=iterations)
    print(f"rock-paper-scissors oracle: best Bradley-Terry fit {d['bt_loss']:.3f} nats vs the "
          f"preferences' own entropy {d['entropy']:.3f} (a point-wise reward cannot fit a cycle)")
    for name, key in (("DNO average iterate", "average"), ("DNO last iterate", "last"),
                      ("von Neumann winner", "nash")):
        print(f"  {name:20s} " + "  ".join(f"{r} {p:.3f}" for r, p in zip(d["responses"], d[key])))


def show_hydra_sft(result: dict) -> None:
    before, after = result["before"], result["after"]
    print(f"\nheld-out pairs ({result['n_heldout_pairs']}) and prompts, greedy replies:   before -> after")
    for key in ("eval_accuracy", "eval_bt_loss", "eval_lm_loss", "reward", "end_rate"):
        if key in before and key in after:
            print(f"  {key:16s} {before[key]:7.3f} -> {after[key]:7.3f}")
    print(f"checkpoint (heads in heads.safetensors): {result['checkpoint']}")


def show_ppo(result: dict) -> None:
    print(f"\nPPO ({result['variant']}), held-out prompts, greedy replies:   before -> after")
    for key in sorted(result["before"]):
        print(f"  {key:14s} {result['before'][key]:7.3f} -> {result['after'].get(key, float('nan')):7.3f}")
    print(f"final KL {result['final_kl']:.3f} nats/reply, length {result['final_length']:.1f} tokens, "
          f"{result['sec_per_sample']:.3f} s/sample")
    print(f"checkpoint: {result['checkpoint']}")


def show_ltc(r: dict) -> None:
    b, t = r["baseline"], r["ltc"]
    print(f"\nheld-out {r['env']} ({r['pattern']}, loss {r['loss']}):   IL baseline -> LTC")
    print(f"  success (EM / accuracy) {b['success']:6.3f} -> {t['success']:6.3f}")
    print(f"  score (F1 for qa)       {b['score']:6.3f} -> {t['score']:6.3f}")
    print(f"checkpoint: {r['checkpoint']} (curves.png and metrics.jsonl beside it)")
