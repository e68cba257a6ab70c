"""A built-in, seeded family of tiny instruction tasks, so the project runs without any hub access.

Every record is ``{"prompt": "<task>(<args>)=", "response": "<answer>"}``, e.g.::

    add(12,45)=    -> 57        copy(kitep)=  -> kitep      rev(kitep)=  -> petik
    color(goni)=   -> gray      home(goni)=   -> dadune
    shift(kitep)=  -> ljufq     sort(kitep)=  -> eikpt      sub(57,23)=  -> 34

Two groups of tasks:

* :data:`PRETRAIN_MIX` (``add``, ``copy``, ``rev`` and facts about a fixed generated world:
  ``color``, ``home``) make the corpus the tiny base model is pretrained on
  (:func:`pretrain_corpus`).
* :data:`FINETUNE_TASKS` (``shift``: each letter to the next, z→a; ``sort``: letters in order;
  ``sub``: subtraction) are held out of pretraining; :func:`finetune_splits` gives disjoint
  train/eval splits of one of them. Their answers use only characters the pretraining tasks also
  produce (digits, lowercase letters), so a method that trains only adapters (the LM head stays
  frozen) can still learn them. ``shift`` is the default: it builds on the copying the base model
  has learned, so a few hundred fine-tuning steps take exact match from 0 to well above 50%.
  ``sub`` is much harder for the tiny base (which does not master ``add``): loss drops clearly,
  exact match stays below ~10% after a few hundred steps.

Generation is pure Python with ``random.Random(seed)``: the same seed gives the same records on
every machine and every rank.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

Record = dict[str, str]

#: Seed of the generated world (entity names and their facts); fixed so every corpus agrees on it.
WORLD_SEED = 20251024
#: Number of entities in the generated world.
WORLD_SIZE = 48
#: Largest operand of ``add`` (pretraining) and of ``sub`` (held out).
MAX_ADD_OPERAND = 99
MAX_SUB_OPERAND = 99
#: Word lengths of the string tasks.
MIN_WORD, MAX_WORD = 3, 7

_COLORS = ("red", "blue", "green", "gold", "gray", "pink", "teal", "black")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _make_world() -> dict[str, dict[str, str]]:
    """``{entity: {"color": ..., "home": ...}}`` for :data:`WORLD_SIZE` distinct entities."""
    rng = random.Random(WORLD_SEED)
    towns = sorted({_pseudo_word(rng, 3) for _ in range(8)})
    entities: list[str] = []
    while len(entities) < WORLD_SIZE:
        name = _pseudo_word(rng, 2)
        if name not in entities:
            entities.append(name)
    return {name: {"color": rng.choice(_COLORS), "home": rng.choice(towns)} for name in entities}


WORLD = _make_world()
_ENTITIES = tuple(WORLD)


def _word(rng: random.Random) -> str:
    return "".join(
        rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_WORD, MAX_WORD))
    )


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(0, MAX_ADD_OPERAND), rng.randint(0, MAX_ADD_OPERAND)
    return {"prompt": f"add({a},{b})=", "response": str(a + b)}


def _sub(rng: random.Random) -> Record:
    a = rng.randint(0, MAX_SUB_OPERAND)
    b = rng.randint(0, a)
    return {"prompt": f"sub({a},{b})=", "response": str(a - b)}


def _copy(rng: random.Random) -> Record:
    word = _word(rng)
    return {"prompt": f"copy({word})=", "response": word}


def _rev(rng: random.Random) -> Record:
    word = _word(rng)
    return {"prompt": f"rev({word})=", "response": word[::-1]}


def _sort(rng: random.Random) -> Record:
    word = _word(rng)
    return {"prompt": f"sort({word})=", "response": "".join(sorted(word))}


def _shift(rng: random.Random) -> Record:
    word = _word(rng)
    shifted = "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)
    return {"prompt": f"shift({word})=", "response": shifted}


def _fact(attribute: str) -> Callable[[random.Random], Record]:
    def make(rng: random.Random) -> Record:
        entity = rng.choice(_ENTITIES)
        return {"prompt": f"{attribute}({entity})=", "response": WORLD[entity][attribute]}

    return make


#: Every task: name -> generator of one random record.
TASKS: dict[str, Callable[[random.Random], Record]] = {
    "add": _add,
    "copy": _copy,
    "rev": _rev,
    "color": _fact("color"),
    "home": _fact("home"),
    "sub": _sub,
    "sort": _sort,
    "shift": _shift,
}
#: Tasks the tiny base model is pretrained on, with their sampling weights. The string tasks get
#: more weight: copying needs an induction-style circuit that forms late, and facts are learned fast.
PRETRAIN_MIX: dict[str, float] = {"add": 2.0, "copy": 3.0, "rev": 3.0, "color": 1.0, "home": 1.0}
PRETRAIN_TASKS = tuple(PRETRAIN_MIX)
#: Tasks held out of pretraining, for fine-tuning.
FINETUNE_TASKS = ("shift", "sort", "sub")


def pretrain_corpus(
    num_records: int, seed: int = 0, mix: dict[str, float] | None = None
) -> list[Record]:
    """``num_records`` records drawn from the tasks of ``mix`` (default :data:`PRETRAIN_MIX`) with its
    weights; deterministic in ``seed``."""
    mix = PRETRAIN_MIX if mix is None else mix
    unknown = [t for t in mix if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; valid: {tuple(TASKS)}")
    rng = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    return [TASKS[rng.choices(names, weights)[0]](rng) for _ in range(num_records)]


def finetune_splits(
    task: str = "shift", num_train: int = 2000, num_eval: int = 200, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Disjoint ``(train, eval)`` splits of a held-out task; no prompt occurs in both.

    Records are drawn until ``num_eval`` distinct eval prompts exist; train records are then drawn
    from the remaining prompts (train prompts are distinct too). Raises ``ValueError`` when the task
    has too few distinct prompts for the requested sizes.
    """
    if task not in FINETUNE_TASKS:
        raise ValueError(f"finetune task must be one of {FINETUNE_TASKS}, got {task!r}")
    rng = random.Random(seed)
    make = TASKS[task]
    seen: set[str] = set()
    splits: tuple[list[Record], list[Record]] = ([], [])
    for split, size in ((splits[1], num_eval), (splits[0], num_train)):
        misses = 0
        while len(split) < size:
            record = make(rng)
            if record["prompt"] in seen:
                misses += 1
                if misses > 50 * (size + 100):
                    raise ValueError(
                        f"synthetic task {task!r} has too few distinct prompts for "
                        f"num_train={num_train} + num_eval={num_eval}"
                    )
                continue
            seen.add(record["prompt"])
            split.append(record)
    return splits


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(
            f"exact_match: {len(predictions)} predictions but {len(references)} references"
        )
    if not references:
        raise ValueError("exact_match: no references")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return hits / len(references)
