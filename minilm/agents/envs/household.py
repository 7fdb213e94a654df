"""Household: an ALFWorld-like text world with its six task types (LTC's decision-making task).

    from minilm.agents.envs import make_env
    env = make_env("household")
    obs = env.reset(seed=3)   # "You see: counter, desk, ...\nYour task is to: look at bowl under the lamp."
    for a in env.expert_actions():
        obs, reward, done, info = env.step(a)

Follows ALFWorld (Shridhar et al., arXiv 2010.03768, as used by LTC arXiv 2310.01444 and ReAct):
receptacles you go to, open and put things in; objects you take; the task types pick and place,
examine in light, clean (sink), heat (microwave), cool (fridge) and pick two. The goal names a
receptacle TYPE ("in cabinet"); any instance counts, as in ALFWorld.
Deviations, so that a whole expert episode fits the tiny model's 256 tokens (lesson 10):
- a world has 6-8 receptacles and a few objects, not a whole TextWorld room;
- short names the BPE knows (counter, not countertop), numbered only when two share a kind;
- observations never repeat what the agent just said ("go to drawer" -> "In it: pencil, lamp.");
- heating, cooling and cleaning take one action at the appliance (ALFWorld's too);
- the scripted expert reads the hidden state and walks straight to the objects (an oracle), and
  every generated task needs at most 8 expert steps.
"""

from __future__ import annotations

import random
import re

from minilm.agents.envs.base import TextEnv

OPENABLE = ["cabinet", "drawer", "fridge", "microwave"]
OPEN_TOP = ["counter", "shelf", "table", "sidetable", "desk", "chair", "bed"]
APPLIANCE = {"clean": "sink", "heat": "microwave", "cool": "fridge"}
LAMP = "lamp"
FOOD = ["apple", "egg", "potato", "tomato", "bread", "lettuce"]
DISH = ["mug", "cup", "plate", "bowl", "knife", "spoon"]
THING = ["book", "pen", "phone", "keychain", "card", "cd", "pencil", "vase"]
TASK_OBJECTS = {"pick": FOOD + DISH + THING, "look": THING + ["mug", "bowl"],
                "clean": FOOD + DISH, "heat": FOOD + ["mug", "cup", "plate"],
                "cool": FOOD + ["mug", "cup", "plate"], "two": DISH + THING}
TASK_TYPES = list(TASK_OBJECTS)
GOAL = {"pick": "put {a} {o} in {d}.", "look": "look at {o} under the lamp.",
        "clean": "put a clean {o} in {d}.", "heat": "put a hot {o} in {d}.",
        "cool": "put a cool {o} in {d}.", "two": "put two {p} in {d}."}
STATE = {"clean": "clean", "heat": "hot", "cool": "cool"}
VERBS = ("go to X, open X, close X, take X from Y, put X in Y, clean/heat/cool X with Y, use X, examine X, "
         "look, inventory")


def _kind(name: str) -> str:
    """The type of a named thing: "cabinet 2" -> "cabinet", "drawer" -> "drawer"."""
    return re.sub(r" \d+$", "", name)


class Household(TextEnv):
    name = "household"
    max_steps = 12

    # ---- building a world

    def _new_task(self, rng: random.Random) -> str:
        kind = rng.choice(TASK_TYPES)
        extra = rng.sample(["cabinet", "drawer", "counter", "shelf", "table", "chair", "bed"],
                           rng.randint(3, 4))
        lamp_at = rng.choice(["desk", "sidetable"])
        if "cabinet" in extra and rng.random() < 0.5:         # two of a kind: numbered
            extra = [n for n in extra if n != "cabinet"] + ["cabinet 1", "cabinet 2"]
        names = sorted(["sink", "microwave", "fridge", lamp_at] + extra)
        self.contents = {r: [] for r in names}                         # receptacle -> objects in it
        self.is_open = {r: _kind(r) not in OPENABLE for r in names}    # openables start closed
        self.state: dict[str, set] = {}                                # object -> {"clean", "hot", "cool"}
        self.contents[lamp_at].append(LAMP)
        self.lamp_at, self.lamp_on, self.at, self.holding = lamp_at, False, None, None
        obj = rng.choice(TASK_OBJECTS[kind])
        # the destination is never the lamp's place nor an appliance (sink, microwave, fridge)
        dest = rng.choice([r for r in names if r != self.lamp_at and _kind(r) not in APPLIANCE.values()])
        if kind == "two":  # both sources open and the destination open: at most 8 steps
            dest = rng.choice([r for r in names if self.is_open[r] and r != self.lamp_at and r != "sink"])
        sources = [r for r in names if _kind(r) != _kind(dest) and _kind(r) not in
                   ("microwave", "sink") and (self.is_open[r] or kind != "two")]
        for o in ([f"{obj} 1", f"{obj} 2"] if kind == "two" else [obj]):
            self._place(o, rng.choice(sources))
        for o in rng.sample([o for o in FOOD + DISH + THING if o != obj], rng.randint(1, 2)):   # distractors
            self._place(o, rng.choice([r for r in names if r != "microwave"]))
        self.task = {"type": kind, "object": obj, "dest": _kind(dest), "dest_name": dest,
                     "goal": GOAL[kind].format(o=obj, d=_kind(dest), a="an" if obj[0] in "aeiou" else "a",
                                               p="knives" if obj == "knife" else obj + "s")}
        self._expert = self._plan()
        self.task["solution"] = list(self._expert)
        return f"You see: {', '.join(names)}.\nYour task is to: {self.task['goal']}"

    def _place(self, obj: str, where: str) -> None:
        self.contents[where].append(obj)
        self.state[obj] = set()

    # ---- the rules

    def _where(self, obj: str) -> str | None:
        return next((r for r, objs in self.contents.items() if obj in objs), None)

    def _view(self, r: str) -> str:
        """What the agent sees at receptacle r (it just named r, so the answer does not repeat it)."""
        if not self.is_open[r]:
            return "Closed."
        objs = self.contents[r]
        return f"In it: {', '.join(objs)}." if objs else "Empty."

    def _won(self) -> bool:
        t = self.task
        if t["type"] == "look":
            return bool(self.holding and _kind(self.holding) == t["object"] and self.lamp_on
                        and self.at == self.lamp_at)
        need = STATE.get(t["type"])
        good = [o for r, objs in self.contents.items() if _kind(r) == t["dest"] for o in objs
                if _kind(o) == t["object"] and (need is None or need in self.state[o])]
        return len(good) >= (2 if t["type"] == "two" else 1)

    def _act(self, action: str) -> tuple[str, bool, bool]:
        obs = self._rule(action.lower().rstrip("."))
        won = self._won()
        return (obs + " Task done." if won else obs), won, False

    def _rule(self, a: str) -> str:
        recs = self.contents
        if a == "look":
            return f"You are at {self.at}. " + self._view(self.at) if self.at else "You are in the room."
        if a == "inventory":
            return f"You carry {self.holding or 'nothing'}."
        if m := re.fullmatch(r"go to (.+)", a):
            if m[1] not in recs:
                return self._bad(f"there is no {m[1]}")
            self.at = m[1]
            return self._view(m[1])
        if m := re.fullmatch(r"(open|close) (.+)", a):
            if m[2] not in recs or _kind(m[2]) not in OPENABLE:
                return self._bad(f"{m[2]} cannot be opened")
            if self.at != m[2]:
                return self._bad(f"you are not at {m[2]}")
            self.is_open[m[2]] = m[1] == "open"
            return "Opened. " + self._view(m[2]) if m[1] == "open" else "Closed."
        if m := re.fullmatch(r"take (.+) from (.+)", a):
            return self._take(m[1], m[2])
        if m := re.fullmatch(r"put (.+?) (?:in/on|in|on) (.+)", a):
            return self._put(m[1], m[2])
        if m := re.fullmatch(r"(clean|heat|cool) (.+) with (.+)", a):
            return self._treat(m[1], m[2], m[3])
        if m := re.fullmatch(r"use (.+)", a):
            if m[1] != LAMP or self.at != self.lamp_at:
                return self._bad(f"there is no {m[1]} here")
            self.lamp_on = True
            return "The lamp is on."
        if m := re.fullmatch(r"examine (.+)", a):
            if m[1] == self.holding or self.at and self.is_open[self.at] and m[1] in recs[self.at]:
                states = " ".join(sorted(self.state.get(m[1], ())))
                return f"It is a {states + ' ' if states else ''}{m[1]}."
            return self._view(m[1]) if m[1] == self.at else self._bad(f"{m[1]} is not here")
        return f"Nothing happens: unknown action. Actions: {VERBS}."

    def _take(self, obj: str, src: str) -> str:
        if self.at != src:
            return self._bad(f"you are not at {src}")
        if not self.is_open[src]:
            return self._bad(f"{src} is closed")
        if obj not in self.contents[src] or obj == LAMP:
            return self._bad(f"there is no {obj} in {src}")
        if self.holding:
            return self._bad(f"you already carry {self.holding}")
        self.contents[src].remove(obj)
        self.holding = obj
        return f"You take {obj}."

    def _put(self, obj: str, dest: str) -> str:
        if self.holding != obj:
            return self._bad(f"you do not carry {obj}")
        if self.at != dest:
            return self._bad(f"you are not at {dest}")
        if not self.is_open[dest]:
            return self._bad(f"{dest} is closed")
        self.contents[dest].append(obj)
        self.holding = None
        return "Done."

    def _treat(self, verb: str, obj: str, tool: str) -> str:
        if self.holding != obj:
            return self._bad(f"you do not carry {obj}")
        if _kind(tool) != APPLIANCE[verb] or self.at != tool:
            return self._bad(f"{verb} needs you at the {APPLIANCE[verb]}")
        self.state[obj].add(STATE[verb])
        return f"You {verb} {obj}."

    def _bad(self, why: str) -> str:
        valid = "; ".join(a for a in self.admissible_actions() if not a.startswith("go to "))
        return f"Nothing happens: {why}. Valid: go to X{'; ' + valid if valid else ''}."

    # ---- admissible actions and the expert

    def admissible_actions(self) -> list[str]:
        acts = [f"go to {r}" for r in self.contents if r != self.at]
        r = self.at
        if r and _kind(r) in OPENABLE:
            acts.append(f"{'close' if self.is_open[r] else 'open'} {r}")
        if r and self.is_open[r] and not self.holding:
            acts += [f"take {o} from {r}" for o in self.contents[r] if o != LAMP]
        if r and self.holding:
            if self.is_open[r]:
                acts.append(f"put {self.holding} in {r}")
            verb = next((v for v, k in APPLIANCE.items() if _kind(r) == k), None)
            if verb:
                acts.append(f"{verb} {self.holding} with {r}")
        if r == self.lamp_at:
            acts.append(f"use {LAMP}")
        return acts

    def expert_actions(self) -> list[str]:
        """The scripted expert's plan, made at reset (it reads the hidden object positions)."""
        return list(self._expert)

    def _plan(self) -> list[str]:
        t, acts, opened, here = self.task, [], set(), [None]   # here: a cell visit() can rebind

        def visit(r: str) -> None:
            if here[0] != r:
                acts.append(f"go to {r}")
                here[0] = r
            if not self.is_open[r] and r not in opened:
                acts.append(f"open {r}")
                opened.add(r)

        for obj in [f"{t['object']} 1", f"{t['object']} 2"] if t["type"] == "two" else [t["object"]]:
            src = self._where(obj)
            visit(src)
            acts.append(f"take {obj} from {src}")
            if t["type"] == "look":
                visit(self.lamp_at)
                return acts + [f"use {LAMP}"]
            if t["type"] in APPLIANCE:
                tool = APPLIANCE[t["type"]]
                if here[0] != tool:
                    acts.append(f"go to {tool}")
                    here[0] = tool
                acts.append(f"{t['type']} {obj} with {tool}")
            visit(t["dest_name"])
            acts.append(f"put {obj} in {t['dest_name']}")
        return acts
