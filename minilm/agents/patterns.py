"""LTC's communication patterns: Monologue, Dialogue, Analogue; episodes as token sequences.

    from minilm.agents.patterns import RolloutConfig, ScriptedTeacher, make_pattern, run_episodes
    pattern = make_pattern("dialogue", teacher=ScriptedTeacher())
    episodes = run_episodes(hydra, tok, [env_a, env_b], seeds=[3, 4], pattern=pattern, cfg=RolloutConfig())
    ep = episodes[0]; ep.tokens, ep.who, ep.logprobs, ep.values, ep.reward, ep.success

Learning through Communication (Wang et al., arXiv 2310.01444, "Patterns and rewards"). An
episode is ONE chat in Phi-3's format (minilm/post/chat.py): user messages are the environment's
observations or a teacher's words ("Teacher: ..."), each assistant turn is one SAMPLED action.
Per token: `who` (the source-mask role, numbered as the paper's App. A.2: SYSTEM 0, AGENT 1,
TEACHER 2, plus our VETOED 3), the behaviour log-prob, the old value V(state before the token).
- Monologue: the agent alone; the environment answers every action.
- Dialogue: a teacher that knows the expert's plan vetoes a wrong action (not executed; its
  tokens become VETOED: a judged-wrong answer, return -1, never imitated) and answers "Teacher:
  not that. Try: <the expert's next action>", at most max_hints times per episode.
- Analogue: the teacher first shows a solved example of another seed, then gives the reward in words.

Deviations from the paper: the teacher is scripted (the paper's is GPT-4) and corrects with the
expert's next action, not free text (`ModelTeacher` lets a minilm model word it). Analogue's
example is one compact line of actions, and the student does not also solve the teacher's problem.
Lesson 10 walks through an episode token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minilm import MinilmError
from minilm.checkpoint import load_checkpoint
from minilm.generate import generate
from minilm.post.chat import closing_ids, parse_reply, render_prompt

FINAL_ACTIONS = ("finish[", "answer[")
# source-mask roles (`Episode.who`), numbered as the paper's App. A.2 (the reference code swaps 0 and 1)
SYSTEM = 0      # chat tags, environment observations: no loss
AGENT = 1       # sampled by the agent and executed: LM, policy and value losses
TEACHER = 2     # the teacher's (or another agent's) words: imitation through the policy loss, no value loss
VETOED = 3      # sampled by the agent, then vetoed by the teacher: its own return -1, no LM imitation
SAMPLED = (AGENT, VETOED)   # the roles that carry a behaviour log-prob


@dataclass
class RolloutConfig:
    temperature: float = 1.0        # sample (the reference code is effectively greedy; we are not)
    max_reply_tokens: int = 32      # one action (a worked line of a unit conversion runs ~25)
    min_reply_tokens: int = 6       # less room left in the context: the episode ends as a failure
    max_hints: int = 2              # Dialogue: teacher interventions per episode
    max_example_chars: int = 240    # Analogue: the solved example's length budget


@dataclass
class Episode:
    tokens: list[int] = field(default_factory=list)
    who: list[int] = field(default_factory=list)          # role per token: SYSTEM, AGENT, TEACHER, VETOED
    logprobs: list[float] = field(default_factory=list)   # behaviour log-prob per token (0 unless SAMPLED)
    values: list[float] = field(default_factory=list)     # V(state before the token), filled at the end
    messages: list[dict] = field(default_factory=list)
    reward: float = 0.0             # +1 / -1, on the last AGENT token (vetoed turns have their own -1)
    success: bool = False
    score: float = 0.0              # env info["score"] (F1 for QA), else success as 0/1
    seed: int = 0
    done: bool = False
    turns: int = 0
    hints: int = 0
    reply_at: int = 0               # where the latest agent reply starts (what a veto marks)

    def add(self, ids: list[int], who: int, logprobs: list[float] | None = None) -> None:
        self.tokens.extend(ids)
        self.who.extend([who] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    def add_message(self, tok, role: str, content: str, who: int = SYSTEM) -> None:
        """A whole non-agent message, encoded exactly as render_chat encodes it; `who` is the role of
        its content (the chat tags around it are always SYSTEM: nobody has to learn to say them)."""
        pieces = [tok.special_id(f"<|{role}|>"), "\n", content, tok.special_id("<|end|>"), "\n"]
        ids, is_content = tok.encode_chat(pieces, [0, 0, 1, 0, 0])
        for t, c in zip(ids, is_content):
            self.add([t], who if c else SYSTEM)
        self.messages.append({"role": role, "content": content})

    def last_agent_index(self) -> int:
        """The last AGENT token (where the terminal reward goes), -1 if none; vetoed turns do not count."""
        return max((i for i, w in enumerate(self.who) if w == AGENT), default=-1)

    def veto_last_turn(self) -> None:
        """Mark the agent's latest reply VETOED: the teacher rejected it, the environment never saw it."""
        self.who[self.reply_at:] = [VETOED if w == AGENT else w for w in self.who[self.reply_at:]]


class ScriptedTeacher:
    """Sees the gold plan; corrects wrong steps with the expert's next action; shows examples."""

    def start(self, env, ep: Episode) -> None:
        # the plan must be read right after reset; plan_pos is how much of it the agent has done
        ep.plan, ep.plan_pos = list(env.expert_actions()), 0

    def review(self, env, ep: Episode, action: str) -> str | None:
        """None if `action` is on the expert's remaining plan (it advances), else a correction."""
        rest = ep.plan[ep.plan_pos:]
        norm = action.strip().lower()
        for j, step in enumerate(rest):     # a later step counts too: the agent may skip ahead
            if norm == step.strip().lower():
                ep.plan_pos += j + 1
                return None
        if not rest:                        # the plan is done: nothing to correct, the env judges
            return None
        return f"not that. Try: {rest[0]}"

    def example(self, env, seed: int, max_chars: int) -> str:
        """A solved analogous task: the first observation's task line and the expert's actions."""
        obs = env.reset(seed)
        task = next((line for line in obs.splitlines() if "task" in line.lower()), obs.splitlines()[-1])
        text = f"Teacher: a solved example. {task.strip()} Solution: {'; '.join(env.expert_actions())}"
        return text[:max_chars]

    def verdict(self, env, success: bool) -> str:
        gold = env.task.get("answer") if isinstance(env.task, dict) else None
        if success:
            return "Teacher: correct. Reward +1."
        return f"Teacher: wrong. Reward -1.{f' The answer was {gold}.' if gold is not None else ''}"


class ModelTeacher(ScriptedTeacher):
    """A minilm chat model words the correction (given the gold next action); scripted otherwise.

    Its text becomes a user message "Teacher: <the model's words> Try: <gold action>" (who = TEACHER).
    The teacher has its own tokenizer: only text passes between it and the student.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 24):
        self.model, self.tok, self.max_new_tokens = model, tokenizer, max_new_tokens

    @classmethod
    def from_checkpoint(cls, path, device="cpu", max_new_tokens: int = 24) -> "ModelTeacher":
        """A frozen teacher from a chat model checkpoint (e.g. a larger SFT model)."""
        try:
            ck = load_checkpoint(path, device=device)
        except (MinilmError, OSError) as e:
            raise MinilmError(f"cannot load the teacher checkpoint {path}: {e}; pass --teacher a "
                              f"directory written by `minilm sft` (or leave it empty for the scripted teacher)") from e
        if ck.tokenizer is None or "<|assistant|>" not in ck.tokenizer.special_tokens:
            raise MinilmError(f"the teacher checkpoint {path} has no chat tokenizer; a teacher must be a "
                              f"chat model (e.g. runs/sft-tiny/checkpoint)")
        return cls(ck.model.eval().requires_grad_(False), ck.tokenizer, max_new_tokens)

    @staticmethod
    def request(action: str, gold: str) -> list[dict]:
        """The chat the teacher model answers: the student's action and the gold one."""
        return [{"role": "user", "content": f"A student did '{action}'. The right action is '{gold}'. Correct them."}]

    def review(self, env, ep: Episode, action: str) -> str | None:
        scripted = super().review(env, ep, action)
        if scripted is None:
            return None
        gold = ep.plan[ep.plan_pos]
        prompt = render_prompt(self.tok, self.request(action, gold))
        out = generate(self.model, [prompt], self.max_new_tokens, temperature=0.0,
                       stop_tokens=list(self.tok.special_tokens.values()), pad_id=self.tok.eot_id)
        text, _ = parse_reply(self.tok, out.responses()[0])
        return f"{text} Try: {gold}" if text else scripted


class Monologue:
    """The agent alone with the environment's feedback."""
    name = "monologue"

    def __init__(self, teacher=None):
        self.teacher = teacher

    def begin(self, env, ep: Episode, tok, cfg: RolloutConfig) -> None:
        ep.add_message(tok, "user", env.reset(ep.seed))

    def respond(self, env, ep: Episode, tok, action: str, cfg: RolloutConfig) -> None:
        obs, _, done, info = env.step(action)
        ep.success, ep.done = bool(info.get("success", False)), bool(done)
        ep.score = float(info.get("score", float(ep.success)))
        if not ep.done:
            ep.add_message(tok, "user", obs)


class Dialogue(Monologue):
    """A teacher that knows the gold plan corrects wrong steps and wrong final answers."""
    name = "dialogue"

    def begin(self, env, ep, tok, cfg) -> None:
        super().begin(env, ep, tok, cfg)
        self.teacher.start(env, ep)

    def respond(self, env, ep, tok, action, cfg) -> None:
        hint = self.teacher.review(env, ep, action) if ep.hints < cfg.max_hints else None
        if hint is None:
            return super().respond(env, ep, tok, action, cfg)
        # a judged-wrong answer: if the hint later rescues the episode, this turn must not share the
        # success (imitating it would teach "err, then take the hint"); it keeps its own -1
        ep.veto_last_turn()
        ep.hints += 1
        ep.add_message(tok, "user", f"Teacher: {hint}", TEACHER)


class Analogue(Monologue):
    """The teacher shows a solved analogous example first and gives the reward at the end."""
    name = "analogue"
    EXAMPLE_SEED_OFFSET = 500_000      # example seeds: 500_000 + seed mod 400_000, apart from the rest

    def __init__(self, teacher=None, example_env=None):
        super().__init__(teacher)
        self.example_env = example_env

    def begin(self, env, ep, tok, cfg) -> None:
        source = self.example_env if self.example_env is not None else env
        example = self.teacher.example(source, self.EXAMPLE_SEED_OFFSET + ep.seed % 400_000, cfg.max_example_chars)
        # two messages, so each keeps render_chat's encoding and one role (a shared message would
        # merge BPE chunks like "]\n" across the teacher/environment boundary)
        ep.add_message(tok, "user", example, TEACHER)
        ep.add_message(tok, "user", env.reset(ep.seed))

    def respond(self, env, ep, tok, action, cfg) -> None:
        super().respond(env, ep, tok, action, cfg)
        if ep.done:
            ep.add_message(tok, "user", self.teacher.verdict(env, ep.success), TEACHER)


PATTERNS = {"monologue": Monologue, "dialogue": Dialogue, "analogue": Analogue}


def make_pattern(name: str, teacher=None, example_env=None):
    if name not in PATTERNS:
        raise ValueError(f"unknown pattern {name!r}; choose one of {', '.join(PATTERNS)}")
    teacher = teacher or ScriptedTeacher()
    if name == "analogue":
        return Analogue(teacher, example_env)
    return PATTERNS[name](teacher)


def _agent_turn(tok, ep: Episode, reply: list[int], logprobs: list[float]) -> str:
    """Append one sampled reply (agent tokens) in chat format; returns the action text."""
    end, *newline = closing_ids(tok)
    text, _ = parse_reply(tok, reply)
    ep.reply_at = len(ep.tokens)
    ep.add(reply, AGENT, logprobs)
    if not reply or reply[-1] != end:
        ep.add([end], SYSTEM)       # the reply ran out or stopped at another special: close it for it
    ep.add(newline, SYSTEM)
    ep.messages.append({"role": "assistant", "content": text})
    return text


@torch.no_grad()
def episode_values(model, episodes: list[Episode], pad_id: int) -> None:
    """Fill ep.values: tanh(value head) read at t - 1, i.e. V(state before token t); 0 without a head."""
    if not hasattr(model, "heads"):
        for ep in episodes:
            ep.values = [0.0] * len(ep.tokens)
        return
    width = max(len(ep.tokens) for ep in episodes)
    tokens = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(tokens)
    for b, ep in enumerate(episodes):
        tokens[b, :len(ep.tokens)] = torch.tensor(ep.tokens)
        attn[b, :len(ep.tokens)] = 1
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    head = model(tokens.to(device), attn.to(device))[2]["value"].tanh().cpu()     # (B, T)
    model.train(was)
    for b, ep in enumerate(episodes):      # shift right by one: token 0 has no state before it
        ep.values = [0.0] + head[b, :len(ep.tokens) - 1].tolist()


@torch.no_grad()
def run_episodes(model, tok, envs: list, seeds: list[int], pattern, cfg: RolloutConfig) -> list[Episode]:
    """One episode per (env, seed), all envs stepped together; every agent turn is one batched sample."""
    if len(envs) != len(seeds):
        raise ValueError(f"one env per seed: got {len(envs)} envs and {len(seeds)} seeds")
    lm = model.lm if hasattr(model, "lm") else model
    episodes = [Episode(seed=s) for s in seeds]
    for env, ep in zip(envs, episodes):
        pattern.begin(env, ep, tok, cfg)
    prefix = tok.encode_chat([tok.special_id("<|assistant|>"), "\n"], [0, 0])[0]   # opens every agent turn
    stops = sorted(tok.special_tokens.values())
    limit = lm.config.max_seq_len
    while True:
        for env, ep in zip(envs, episodes):     # out of turns or out of context: a failure
            if not ep.done and (ep.turns >= env.max_steps + cfg.max_hints
                                or len(ep.tokens) + len(prefix) + cfg.min_reply_tokens > limit):
                ep.done, ep.success, ep.score = True, False, 0.0
        live = [i for i, ep in enumerate(episodes) if not ep.done]
        if not live:
            break
        prompts = [episodes[i].tokens + prefix for i in live]      # the episode so far IS the prompt
        budget = min(cfg.max_reply_tokens, limit - max(len(p) for p in prompts))   # one budget per batch
        out = generate(lm, prompts, budget, temperature=cfg.temperature, stop_tokens=stops,
                       pad_id=tok.eot_id)
        for row, i in enumerate(live):
            ep, keep = episodes[i], out.gen_mask[row].bool()   # keep: this row's sampled tokens, no padding
            ep.add(prefix, SYSTEM)
            action = _agent_turn(tok, ep, out.tokens[row][keep].tolist(), out.logprobs[row][keep].tolist())
            ep.turns += 1
            pattern.respond(envs[i], ep, tok, action, cfg)
    for ep in episodes:             # a last observation may run past the context: cut it (never agent text)
        del ep.tokens[limit:], ep.who[limit:], ep.logprobs[limit:]
    episode_values(model, episodes, tok.eot_id)
    for ep in episodes:
        ep.reward = 1.0 if ep.success else -1.0
    return episodes
