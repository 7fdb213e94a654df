"""Direct Nash Optimization: the pieces (Rosset et al. 2024, arXiv 2404.03715; lesson 09).

    from minilm.post.dno import dno_regression_loss, select_pairs, replay_pairs, scripted_teacher
    loss, metrics = dno_regression_loss(pi_1, pi_2, ref_1, ref_2, r_1, r_2, eta=0.1)   # Algorithm 1
    pairs = select_pairs(scores, teacher_index=5)                                     # Algorithm 2, 2c
    old = replay_pairs([pairs_t1, pairs_t2], shares=(0.3, 0.15), seed=0)              # Algorithm 2, 2d

The stage that uses them is minilm/stages/dno.py (`minilm dno`); `tabular_dno` below is the demo
with an intransitive oracle. DNO aims at the Nash equilibrium of the game with payoff P(y > y' | x):
iteration t rewards a reply by its expected win-rate against pi_t, r_t(y) = E_{y'~pi_t} P(y > y'),
and moves to pi_{t+1} ∝ pi_t exp(r_t / eta). Algorithm 1 fits that by a soft-label cross-entropy
(`dno_regression_loss`); Algorithm 2 (DNO-Prct) uses the DPO loss, reference pi_t, on large-margin
pairs. `VerifierOracle` scores 0..6 like the paper's rubric (a wrong reply <= 4), so the paper's
thresholds carry over: positive_min=5, teacher_margin=2, student_margin=1; with the filter off,
every pair whose scores differ is used (the paper's "all pairs" ablation). Pair statistics go in
the row of the iterate whose samples they describe, as in the paper's Table 2 (`place_pair_stats`).

Deviations (our choices). A reply that never closed its turn (no <|end|> before max_new_tokens)
is never the positive, in either mode, and is trained as a negative without an <|end|> it did not
produce (`build_pairs`, `encode_pair`). The NLL term (DPO + NLL) falls only on chosen replies
scoring >= positive_min (`positive_nll`): with the filter off, a 4-point wrong reply beating a
3-point one is still a DPO pair but is never imitated.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

from minilm.post.preferences import pair_batch
from minilm.post.oracles import RPS, RPS_TABLE

PAIR_KINDS = ("teacher>student", "student>teacher", "student>student")


def dno_regression_loss(pi_1: torch.Tensor, pi_2: torch.Tensor, ref_1: torch.Tensor, ref_2: torch.Tensor,
                        r_1: torch.Tensor, r_2: torch.Tensor, eta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Algorithm 1's loss over a batch of pairs (all inputs (B,)): soft labels sigmoid(r_1 - r_2).

    Delta = eta * (log pi(y1)/pi_t(y1) - log pi(y2)/pi_t(y2)); the loss is the binary
    cross-entropy  -[l log sigmoid(Delta) + (1 - l) log sigmoid(-Delta)],  l = sigmoid(r_1 - r_2).
    Its minimiser has Delta = r_1 - r_2, i.e. pi ∝ pi_t exp(r / eta): soft policy iteration,
    with the partition function cancelled by the difference. ref_* are pi_t's log-probs.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 (it scales the log-ratio), got {eta}")
    delta = eta * ((pi_1 - ref_1.detach()) - (pi_2 - ref_2.detach()))   # (B,)
    label = torch.sigmoid(r_1.float() - r_2.float()).to(delta.dtype)   # (B,) soft label in (0, 1)
    loss = F.binary_cross_entropy_with_logits(delta, label)
    with torch.no_grad():
        metrics = {"delta": delta.mean().item(), "label": label.mean().item(),
                   "regression_gap": (delta - (r_1 - r_2)).abs().mean().item()}
    return loss, metrics


def expected_win_rates(prefer: torch.Tensor, students: torch.Tensor) -> torch.Tensor:
    """r_t(y_i) = mean over the student samples j != i of P(y_i > y_j): (N,) from prefer (N, N).

    prefer[i, j] = P(candidate i beats candidate j); students is a bool mask (N,) of the
    candidates that were sampled from pi_t (the teacher is not a sample of pi_t).
    """
    n = prefer.shape[0]
    others = students[None, :].expand(n, n) & ~torch.eye(n, dtype=torch.bool)   # (N, N): j a student, j != i
    return (prefer * others).sum(1) / others.sum(1).clamp(min=1)


def select_pairs(scores: list[float], teacher_index: int | None = None, positive_min: float = 5,
                 teacher_margin: float = 2, student_margin: float = 1, large_margin: bool = True,
                 texts: list[str] | None = None, ended: list[bool] | None = None) -> list[tuple[int, int, str]]:
    """Algorithm 2 step 2c on one prompt's candidates: (positive, negative, kind) index pairs.

    large_margin: the positive scores >= positive_min and the negative is >= teacher_margin
    below a teacher positive, >= student_margin below a student positive. Otherwise every pair
    with different scores. Candidates with identical texts are never paired. ended[i] False (the
    reply never closed its turn) bars candidate i from being the positive in either mode: its
    text is a cut-off reply, so making it more likely teaches the model to run on.
    """
    pairs = []
    for i, si in enumerate(scores):
        if (large_margin and si < positive_min) or (ended is not None and not ended[i]):
            continue
        margin = teacher_margin if i == teacher_index else student_margin   # a teacher positive needs a wider gap
        for j, sj in enumerate(scores):
            ok = si - sj >= margin if large_margin else si > sj
            if i == j or not ok or (texts is not None and texts[i] == texts[j]):
                continue
            kind = ("teacher>student" if i == teacher_index else
                    "student>teacher" if j == teacher_index else "student>student")
            pairs.append((i, j, kind))
    return pairs


def build_pairs(cfg, oracle, monitor, prompts, students, teachers) -> tuple[list[dict], dict]:
    """Steps 2-3 of one iteration (cfg: the stage's DNOConfig): the pairs and what they say.

    students: per prompt, K (text, judged) samples of pi_t (`sample_replies`); the judged string
    ends in "<|end|>" exactly when the reply closed its turn. A pair records r_t of both sides
    (Algorithm 1's labels), chosen_positive (the chosen reply scores >= positive_min: only those
    get the NLL term) and rejected_ended (False: encode it without <|end|>). Stats: shares of each
    pair kind, best-of-K student vs teacher under the uncounted `monitor` verifier.
    """
    pairs, beats_teacher = [], 0
    for prompt, samples, teacher in zip(prompts, students, teachers):
        texts = [t for t, _ in samples] + [teacher]  # k student replies, the teacher at index k
        judged = [j for _, j in samples] + [teacher + "<|end|>"]  # as judges see them
        ended = [j.endswith("<|end|>") for j in judged]  # (k+1,): the teacher's reply always ends
        k = len(samples)
        seen = monitor.score_many([prompt] * (k + 1), judged)  # points, outside the budget
        beats_teacher += max(seen[:k]) > seen[k]
        if cfg.pairs_mode == "spin":  # no oracle: the teacher is always the positive (SPIN's premise)
            chosen = [(k, j, "teacher>student") for j in range(k) if texts[j] != teacher]
            r, positive = [0.0] * (k + 1), [True] * (k + 1)
        else:
            scores, prefer = score_candidates(oracle, prompt, judged)  # (k+1,) on 0..6, (k+1, k+1)
            # chosen: (i, j, kind) index triples, candidate i preferred over candidate j
            chosen = select_pairs(scores, k, cfg.positive_min, cfg.teacher_margin, cfg.student_margin,
                                  cfg.large_margin, texts, ended)
            if cfg.pairs_mode == "restrictive":
                chosen = [c for c in chosen if c[2] == "teacher>student"]
            students_mask = torch.tensor([True] * k + [False])
            r = expected_win_rates(prefer, students_mask).tolist()  # (k+1,): Algorithm 1's r_t
            positive = [s >= cfg.positive_min for s in scores]  # the threshold, also with the filter off
        pairs += [{"prompt": prompt, "chosen": texts[i], "rejected": texts[j], "kind": kind, "r_chosen": r[i],
                   "r_rejected": r[j], "chosen_positive": positive[i], "rejected_ended": ended[j]}
                  for i, j, kind in chosen]
    n = max(1, len(pairs))
    stats = {f"share_{kind}": sum(p["kind"] == kind for p in pairs) / n for kind in PAIR_KINDS}
    stats.update(n_new_pairs=len(pairs), best_of_k_beats_teacher=beats_teacher / max(1, len(prompts)))
    return pairs, stats


def positive_nll(logp_chosen: torch.Tensor, n_tokens: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """NLL per reply token of the chosen replies that passed the positive threshold (all (B,)).

    logp_chosen: summed reply log-probs; n_tokens: reply tokens per row; positive: bool. Rows that
    are not positive add nothing; a batch with none gives a zero that still carries the graph.
    """
    w = positive.to(logp_chosen.dtype)                        # (B,) 1 on positive rows
    return -(logp_chosen * w).sum() / (n_tokens.to(logp_chosen.dtype) * w).sum().clamp(min=1)


def place_pair_stats(rows: list[dict], new_row: dict, pair_stats: dict) -> list[dict]:
    """rows + [new_row], with pair_stats merged into the last existing row.

    rows[t] describes pi_{t+1} (rows[0]: SFT = pi_1). Iteration t samples pi_t and trains
    pi_{t+1}, so its pair statistics describe rows[t - 1], the iterate that produced the samples,
    while new_row (pi_{t+1}'s evaluation and training numbers) becomes rows[t].
    """
    return rows[:-1] + [{**rows[-1], **pair_stats}, new_row]


def best_iterate(rows: list[dict], key: str = "val_points") -> int:
    """Index of the best row on validation, rows[0] (the SFT model, pi_1) included; a tie goes to
    the earlier iterate, so an iterate must beat SFT to be chosen over it."""
    return max(range(len(rows)), key=lambda t: (rows[t][key], -t))


def replay_pairs(earlier: list[list[dict]], shares=(0.3, 0.15), seed: int = 0) -> list[dict]:
    """Algorithm 2 step 2d: a share of each earlier iteration's pairs, most recent first.

    earlier[0] is iteration t-1's pairs, earlier[1] t-2's, ...; shares[k] is the share kept of
    earlier[k], and iterations past the end of shares halve the last share each step back.
    Old pairs are reused as they were (not re-sampled, not re-judged).
    """
    rng = random.Random(seed)
    out = []
    for k, pairs in enumerate(earlier):
        share = shares[k] if k < len(shares) else shares[-1] * 0.5 ** (k - len(shares) + 1)
        out += rng.sample(pairs, int(share * len(pairs)))
    return out


def scripted_teacher(conversation: dict, rng: random.Random, error_rate: float = 0.25) -> str:
    """A good-but-not-perfect teacher: the reference reply, or with prob error_rate a near miss.

    Numbers: off by a small amount or a slipped factor of ten; text: the last word dropped;
    worked solutions: the last number changed. The near misses score 2-4 of VerifierOracle's 6
    points, so a correct student reply can beat the teacher (a student > teacher pair).
    """
    reply, answer = conversation["messages"][-1]["content"], str(conversation["answer"])
    if rng.random() >= error_rate:
        return reply
    if re.fullmatch(r"-?\d+", answer):
        value = int(answer)
        wrong = rng.choice([value + rng.choice([-2, -1, 1, 2]), value * 10, value // 10 or value + 3])
        wrong = wrong if wrong != value else value + 1     # e.g. 0 * 10: still a miss
        # replace the LAST occurrence of the answer, so a worked solution keeps its steps
        head, sep, _ = reply.rpartition(answer)
        return f"{head}{wrong}" + reply[len(head) + len(answer):] if sep else str(wrong)
    words = reply.split()
    return " ".join(words[:-1]) if len(words) > 1 else reply + " " + reply


# ---- the tabular demo: an intransitive oracle, a Bradley-Terry fit, and DNO's iterates

def bradley_terry_fit(prefer: torch.Tensor, steps: int = 2000, lr: float = 0.1) -> tuple[torch.Tensor, float]:
    """(scores (N,), mean cross-entropy) of the best point-wise reward for P (N, N) under
    P_BT(i > j) = sigmoid(s_i - s_j), by gradient descent on every ordered pair i != j."""
    n = prefer.shape[0]
    s = torch.zeros(n, requires_grad=True)
    off = ~torch.eye(n, dtype=torch.bool)                # every ordered pair i != j
    opt = torch.optim.Adam([s], lr=lr)
    for _ in range(steps):
        logits = (s[:, None] - s[None, :])[off]          # (N(N-1),) s_i - s_j
        loss = F.binary_cross_entropy_with_logits(logits, prefer[off].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return s.detach(), loss.item()


def preference_entropy(prefer: torch.Tensor) -> float:
    """The lowest cross-entropy any model can reach on P: its own entropy over the ordered pairs."""
    off = ~torch.eye(prefer.shape[0], dtype=torch.bool)
    p = prefer[off].float().clamp(1e-9, 1 - 1e-9)
    return (-(p * p.log() + (1 - p) * (1 - p).log())).mean().item()


def tabular_dno(prefer: torch.Tensor, iterations: int = 200, eta: float = 0.5, fit_steps: int = 0,
                lr: float = 0.5) -> dict:
    """DNO on a policy over N fixed responses (one prompt): returns the iterates and their average.

    fit_steps == 0 takes the exact target pi_{t+1} ∝ pi_t exp(r_t / eta); fit_steps > 0 reaches
    it the way Algorithm 1 does, by minimising `dno_regression_loss` over all pairs with Adam on
    the policy's logits (tabular: log pi(y) is a logit minus a log-sum-exp).
    """
    n = prefer.shape[0]
    logits = torch.zeros(n)
    iterates = []
    for _ in range(iterations):
        pi_t = logits.softmax(0)
        r = prefer.float() @ pi_t                       # r_t(y) = E_{y'~pi_t} P(y > y')
        if fit_steps == 0:                              # the exact soft policy iteration step
            logits = pi_t.log() + r / eta
        else:
            logits = _fit_regression(logits, r, eta, fit_steps, lr)
        iterates.append(logits.softmax(0))
    stack = torch.stack(iterates)                       # (iterations, N)
    return {"iterates": stack, "average": stack.mean(0), "last": stack[-1]}


def _fit_regression(ref_logits: torch.Tensor, r: torch.Tensor, eta: float, steps: int, lr: float) -> torch.Tensor:
    n = r.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)           # every unordered pair once
    ref_lp = ref_logits.log_softmax(0)
    theta = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        lp = theta.log_softmax(0)
        loss, _ = dno_regression_loss(lp[i], lp[j], ref_lp[i], ref_lp[j], r[i], r[j], eta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta.detach()


def cyclic_demo(iterations: int = 300, eta: float = 2.0) -> dict:
    """The intransitive-oracle demo on rock-paper-scissors (oracles.RPS_TABLE): the best
    Bradley-Terry fit's cross-entropy against P's own, and DNO's averaged vs last iterate
    against the von Neumann winner p ∝ (1, 1.5, 2) (solves M p = 0, M = P - 1/2)."""
    prefer = torch.tensor(RPS_TABLE)
    scores, bt_loss = bradley_terry_fit(prefer)
    out = tabular_dno(prefer, iterations, eta)
    nash = torch.tensor([1.0, 1.5, 2.0]) / 4.5
    return {"responses": RPS, "bt_scores": scores.tolist(), "bt_loss": bt_loss,
            "entropy": preference_entropy(prefer), "average": out["average"].tolist(),
            "last": out["last"].tolist(), "nash": nash.tolist(),
            "average_error": (out["average"] - nash).abs().max().item()}


def score_candidates(oracle, prompt, candidates: list[str]) -> tuple[list[float], torch.Tensor]:
    """(scores on the 0..6 scale, prefer matrix (N, N)) for one prompt's candidates.

    A VerifierOracle's points are the scores; any other oracle's score is 6 x the candidate's
    mean preference over the others (so the paper's thresholds keep their meaning).
    """
    n = len(candidates)
    triples = [(prompt, a, b) for a in candidates for b in candidates]
    prefer = torch.tensor(oracle.prefer_many(triples)).view(n, n)
    if hasattr(oracle, "points"):
        return oracle.score_many([prompt] * n, candidates), prefer
    off = ~torch.eye(n, dtype=torch.bool)
    return (6 * (prefer * off).sum(1) / max(1, n - 1)).tolist(), prefer


def make_batch_fn(encoded, pairs, batch_size: int, seed: int, pad_id: int, max_len: int,
                  step_ends: tuple[int, ...] = ()):
    """batch_fn(step): pair_batch of a shuffled pass (a pure function of seed and step), with the
    pairs' r_t values (2B,) for Algorithm 1's soft labels and "positive" (B,), each chosen reply's
    chosen_positive (the rows the NLL term may touch). step_ends: as pair_batch's (step credit).
    batch_fn(step, part, parts): of every parts-th pair of the step (a micro-batch, minilm/loop.py)."""
    n = len(encoded)
    orders = {}

    def order(epoch: int) -> list[int]:   # a fresh shuffle per epoch (epochs > 1: offline DPO)
        if epoch not in orders:
            orders[epoch] = random.Random(seed * 1_000_003 + epoch).sample(range(n), n)
        return orders[epoch]

    def batch_fn(step: int, part: int = 0, parts: int = 1) -> dict:
        picks = [order(i // n)[i % n] for i in range(step * batch_size, (step + 1) * batch_size)][part::parts]
        batch = pair_batch([encoded[j] for j in picks], pad_id, max_len, step_ends)
        batch["r"] = torch.tensor([pairs[j]["r_chosen"] for j in picks] + [pairs[j]["r_rejected"] for j in picks])
        batch["positive"] = torch.tensor([bool(pairs[j]["chosen_positive"]) for j in picks])
        return batch

    return batch_fn
