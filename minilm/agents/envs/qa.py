"""Multi-hop QA: HotpotQA-like two-hop questions over real text, with a search tool (LTC's QA task).

    from minilm.agents.envs import make_env
    env = make_env("qa")
    obs = env.reset(seed=0)   # "... Question: What is the summary of the module that defines `dedent`?"
    env.step("search[dedent]")          # "dedent: Remove any common leading ... Module: textwrap."
    env.step("search[textwrap]")        # "textwrap: Text wrapping and filling. Functions: ..."
    env.step("finish[Text wrapping and filling]")   # reward 1.0, info["score"] = F1

Follows HotpotQA (Yang et al. 2018, arXiv 1809.09600) as driven by ReAct/LTC: actions search[entity] (the paragraph
titled entity, or "Could not find" with similar titles), lookup[keyword] (the next sentence of the
current paragraph that has the keyword), finish[answer]; scored by exact match and token F1 with
HotpotQA's answer normalisation (lower case, no punctuation, no articles a/an/the).

Real text: no HotpotQA ships offline, so paragraphs are the Python standard library's own
documentation, pinned from CPython 3.11.7 (data_prep.pinned.pinned_stdlib_qa) so that every machine
and Python version sees the same facts: one paragraph per public function (its docstring's first
sentence and its module) and one per module (its summary and its functions). Two question types, both two-hop:
  bridge      "What is the summary of the module that defines `f`?"  f -> its module -> the answer
  comparison  "Are `f` and `g` defined in the same module?"            yes / no (two paragraphs)
Each episode sees its two gold paragraphs plus 8 distractors (HotpotQA's distractor setting):
other functions of the same module and other modules. Splits: a function belongs to the test
split iff a hash of its name says so (base.content_split), and a question only uses functions of
its split, so train and test share no question.
"""

from __future__ import annotations

import collections
import difflib
import random
import re
import string
from functools import lru_cache

from data_prep.pinned import pinned_stdlib_qa
from minilm.agents.envs.base import TextEnv, content_split

N_DISTRACTORS = 8


# ---- HotpotQA scoring

def normalize_answer(s: str) -> str:
    """HotpotQA's normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 after normalisation; yes/no/noanswer must match exactly (as in HotpotQA)."""
    p, g = normalize_answer(prediction), normalize_answer(gold)
    if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
        return 0.0
    common = collections.Counter(p.split()) & collections.Counter(g.split())
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p.split()), same / len(g.split())
    return 2 * precision * recall / (precision + recall)


# ---- the corpus (built once per process)

@lru_cache(maxsize=1)
def corpus() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(paragraphs by title, module of each function, summary of each module with one).

    Functions whose bare name is not unique, or equals a module's name, are left out so that
    every title names one paragraph.
    """
    table = pinned_stdlib_qa()
    pairs = [tuple(f) for f in table["functions"]]
    counts = collections.Counter(f.split(".", 1)[1] for f, _ in pairs)
    modules = {f.split(".", 1)[0] for f, _ in pairs}
    func_module, paras, by_module = {}, {}, collections.defaultdict(list)
    for full, sentence in pairs:
        module, name = full.split(".", 1)
        if counts[name] == 1 and name not in modules:
            func_module[name] = module
            by_module[module].append(name)
            paras[name] = f"{name}: {sentence}. Module: {module}."
    summary = {}
    for module, names in sorted(by_module.items()):
        s = table["summaries"].get(module)
        if s:
            summary[module] = s
        paras[module] = f"{module}: {s or 'A standard library module'}. Functions: {', '.join(sorted(names)[:6])}."
    return paras, func_module, summary


class MultiHopQA(TextEnv):
    name = "qa"
    max_steps = 6

    def _new_task(self, rng: random.Random) -> str:
        paras, func_module, summary = corpus()
        pool = sorted(f for f in func_module if content_split(f) == self.split)   # this split's functions
        bridge_pool = [f for f in pool if func_module[f] in summary]   # a bridge needs a module summary
        if rng.random() < 0.5:
            f = rng.choice(bridge_pool)
            m = func_module[f]
            q, answer, gold = f"What is the summary of the module that defines `{f}`?", summary[m], [f, m]
            kind = "bridge"
        else:
            f = rng.choice(pool)
            same = [g for g in pool if g != f and func_module[g] == func_module[f]]
            # half the time a function of the same module, so "yes" and "no" are both common
            g = rng.choice(same if same and rng.random() < 0.5 else [g for g in pool if g != f])
            q, gold, kind = f"Are `{f}` and `{g}` defined in the same module?", [f, g], "comparison"
            answer = "yes" if func_module[f] == func_module[g] else "no"
        # distractors: up to 3 functions of the same module (hard ones), the rest from anywhere
        near = [x for x in func_module if func_module[x] == func_module[f] and x not in gold]
        others = sorted(set(paras) - set(gold) - set(near))
        distract = rng.sample(near, min(3, len(near)))
        distract += rng.sample(others, N_DISTRACTORS - len(distract))
        titles = sorted(gold + distract)
        self.task = {"question": q, "answer": answer, "type": kind, "gold_titles": gold,
                     "titles": titles, "solution": [f"search[{t}]" for t in gold] + [f"finish[{answer}]"]}
        self.page, self.lookups = None, collections.Counter()
        return ("Your task is to: answer the question. Use search[entity], lookup[keyword], "
                f"finish[answer].\nQuestion: {q}")

    def _act(self, action: str) -> tuple[str, bool, bool]:
        m = re.fullmatch(r"(search|lookup|finish)\[(.*)\]", action, re.S)
        if not m:
            return ("Nothing happens: unknown action. Valid: search[entity], lookup[keyword], "
                    "finish[answer]."), False, False
        verb, arg = m[1], m[2].strip()
        if verb == "finish":
            self.score = f1_score(arg, self.task["answer"])      # reported as info["score"]
            em = exact_match(arg, self.task["answer"]) == 1.0
            return f"Answer: {arg}. {'Correct' if em else 'Incorrect'}.", em, True
        if verb == "search":
            return self._search(arg), False, False
        return self._lookup(arg), False, False

    def _search(self, entity: str) -> str:
        by_lower = {t.lower(): t for t in self.task["titles"]}
        title = by_lower.get(entity.strip("` ").lower())
        if title is None:
            similar = difflib.get_close_matches(entity, self.task["titles"], n=3, cutoff=0.0)
            return f"Could not find [{entity}]. Similar: {', '.join(similar)}."
        self.page = title
        return corpus()[0][title]

    def _lookup(self, keyword: str) -> str:
        if self.page is None:
            return "Nothing happens: no paragraph is open. Valid: search[entity], then lookup[keyword]."
        sentences = re.split(r"(?<=\.) ", corpus()[0][self.page])
        hits = [s for s in sentences if keyword and keyword.lower() in s.lower()]
        if not hits:
            return f"No more results for [{keyword}] in {self.page}."
        i = self.lookups[(self.page, keyword)] % len(hits)      # each repeat shows the next hit
        self.lookups[(self.page, keyword)] += 1
        return f"(Result {i + 1} / {len(hits)}) {hits[i]}"

    def admissible_actions(self) -> list[str]:
        """Concrete searches for this episode's titles, then the lookup and finish templates."""
        return [f"search[{t}]" for t in self.task.get("titles", [])] + ["lookup[keyword]", "finish[answer]"]

    def expert_actions(self) -> list[str]:
        return list(self.task["solution"])
