#!/usr/bin/env python3
"""Generates the text data behind the embedded `tiny-llama` base and its example fine-tune.

Two outputs, both deterministic for a given seed:

* a pretraining corpus of simple English (short sentences, little stories, questions and
  dialogue about people, animals, objects, places and colours), written to
  ``build/text/corpus.txt`` by default, one document per block separated by a blank line;
* an example fine-tune dataset that teaches the base a *new format* it never saw in
  pretraining: ``Describe as JSON: <sentence>\\n`` -> ``{"who": ..., "did": ..., "where": ...}``.
  Written as JSONL (``prompt`` / ``completion``) to ``src/loraforge/examples/text/``:
  ``train.jsonl`` and ``heldout.jsonl`` (held-out sentences never appear in train).
  The completion is the bare JSON object: the training pipeline appends the tokenizer's EOS.
  ``loraforge.examples.text.task.follows_task`` checks a generation against this format.

The corpus never contains the JSON task (no braces, no "JSON"), so the bare base cannot
follow it; the task sentences themselves do come from the same grammar, so the base knows
the words and only has to learn the format.

    python scripts/make_text_data.py                 # corpus + fine-tune data, default sizes
    python scripts/make_text_data.py --docs 40000 --train 1500 --heldout 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT / "build" / "text" / "corpus.txt"
DEFAULT_EXAMPLES = ROOT / "src" / "loraforge" / "examples" / "text"

PROMPT_PREFIX = "Describe as JSON: "

# ----------------------------------------------------------------------------- word lists

NAMES = [
    "Tom",
    "Anna",
    "Max",
    "Lily",
    "Sam",
    "Mia",
    "Ben",
    "Zoe",
    "Leo",
    "Emma",
    "Jack",
    "Rosa",
    "Finn",
    "Nora",
    "Paul",
    "Ivy",
    "Omar",
    "Lucy",
    "Hugo",
    "Ella",
    "Tim",
    "Sara",
    "Noah",
    "Kate",
    "Ruby",
    "Adam",
    "Maya",
    "Eli",
    "Grace",
    "Luke",
    "Chloe",
    "Jake",
    "Alice",
    "Oscar",
    "Hannah",
    "Felix",
    "Julia",
    "Peter",
    "Olga",
    "Ravi",
    "Nina",
    "Carl",
    "Tara",
    "Dan",
    "Amy",
    "Bob",
]
ANIMALS = [
    "cat",
    "dog",
    "bird",
    "fox",
    "frog",
    "rabbit",
    "horse",
    "duck",
    "mouse",
    "bear",
    "owl",
    "pig",
    "cow",
    "goat",
    "sheep",
    "turtle",
    "lion",
    "puppy",
    "kitten",
    "squirrel",
    "elephant",
    "monkey",
    "tiger",
    "zebra",
    "giraffe",
    "snake",
    "whale",
    "dolphin",
    "penguin",
    "chicken",
    "donkey",
    "deer",
    "wolf",
    "hedgehog",
    "beetle",
    "butterfly",
    "bee",
    "ant",
    "spider",
    "crab",
    "parrot",
    "hamster",
    "camel",
    "kangaroo",
    "panda",
    "koala",
    "seal",
    "snail",
    "goose",
    "lamb",
]
PEOPLE = [
    "boy",
    "girl",
    "man",
    "woman",
    "baby",
    "farmer",
    "teacher",
    "king",
    "queen",
    "doctor",
    "pilot",
    "baker",
    "painter",
    "sailor",
    "nurse",
    "grandma",
    "grandpa",
    "prince",
    "princess",
    "student",
    "clown",
    "cook",
    "driver",
    "child",
    "wizard",
    "giant",
]
OBJECTS = [
    "ball",
    "box",
    "cup",
    "hat",
    "book",
    "kite",
    "toy",
    "apple",
    "key",
    "bag",
    "boat",
    "drum",
    "lamp",
    "shoe",
    "cake",
    "flower",
    "stone",
    "car",
    "bell",
    "chair",
    "blanket",
    "basket",
    "pencil",
    "spoon",
    "plate",
    "clock",
    "coin",
    "ring",
    "sock",
    "glove",
    "bucket",
    "rope",
    "shell",
    "feather",
    "leaf",
    "stick",
    "candle",
    "pillow",
    "mirror",
    "bottle",
    "jar",
    "map",
    "letter",
    "balloon",
    "umbrella",
    "ladder",
    "wagon",
    "guitar",
    "piano",
    "robot",
    "doll",
    "bicycle",
    "crayon",
    "sandwich",
    "banana",
    "pear",
    "egg",
    "cookie",
    "jacket",
    "scarf",
    "button",
    "brush",
    "towel",
    "bowl",
    "truck",
    "train",
    "box",
    "shovel",
    "hammer",
    "carpet",
]
PLACES = [
    "park",
    "garden",
    "house",
    "school",
    "river",
    "forest",
    "beach",
    "kitchen",
    "farm",
    "hill",
    "town",
    "shop",
    "lake",
    "barn",
    "road",
    "bridge",
    "mountain",
    "city",
    "village",
    "castle",
    "cave",
    "library",
    "station",
    "market",
    "street",
    "island",
    "zoo",
    "playground",
    "yard",
    "meadow",
    "valley",
    "sea",
    "tree",
    "table",
    "bed",
    "window",
    "door",
    "fence",
    "wall",
    "pond",
    "field",
    "rock",
    "bench",
    "roof",
    "floor",
    "sofa",
    "rug",
    "tent",
    "hut",
    "ship",
    "porch",
    "path",
    "stairs",
    "lawn",
    "box",
    "gate",
    "tower",
    "well",
    "nest",
    "bush",
]
N_OPEN_PLACES = 33  # PLACES[:N_OPEN_PLACES] are places one can go to or live near
COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "brown",
    "white",
    "black",
    "pink",
    "orange",
    "purple",
    "grey",
    "gold",
    "silver",
]
SIZES = [
    "big",
    "small",
    "little",
    "tiny",
    "old",
    "young",
    "new",
    "tall",
    "soft",
    "funny",
    "huge",
    "long",
    "short",
    "round",
    "shiny",
    "dirty",
    "clean",
    "wet",
    "dry",
    "warm",
    "cold",
    "pretty",
    "strange",
    "heavy",
    "quiet",
    "dark",
    "bright",
    "lovely",
    "wooden",
    "broken",
]
THING_ADJS = [a for a in SIZES if a not in ("young",)]
FEELINGS = [
    "happy",
    "sad",
    "sleepy",
    "hungry",
    "scared",
    "angry",
    "excited",
    "tired",
    "proud",
    "kind",
    "brave",
    "shy",
    "silly",
    "lonely",
    "calm",
    "busy",
    "curious",
    "grumpy",
    "gentle",
    "clever",
]
# intransitive verbs: (past, base, -ing)
VERBS = [
    ("sat", "sit", "sitting"),
    ("ran", "run", "running"),
    ("slept", "sleep", "sleeping"),
    ("jumped", "jump", "jumping"),
    ("played", "play", "playing"),
    ("waited", "wait", "waiting"),
    ("sang", "sing", "singing"),
    ("danced", "dance", "dancing"),
    ("walked", "walk", "walking"),
    ("hid", "hide", "hiding"),
    ("stood", "stand", "standing"),
    ("rested", "rest", "resting"),
    ("swam", "swim", "swimming"),
    ("laughed", "laugh", "laughing"),
    ("cried", "cry", "crying"),
    ("ate", "eat", "eating"),
    ("read", "read", "reading"),
    ("looked", "look", "looking"),
    ("smiled", "smile", "smiling"),
    ("waved", "wave", "waving"),
    ("climbed", "climb", "climbing"),
    ("crawled", "crawl", "crawling"),
    ("hopped", "hop", "hopping"),
    ("dreamed", "dream", "dreaming"),
    ("shouted", "shout", "shouting"),
    ("whispered", "whisper", "whispering"),
    ("landed", "land", "landing"),
    ("floated", "float", "floating"),
    ("fell", "fall", "falling"),
    ("worked", "work", "working"),
    ("napped", "nap", "napping"),
    ("stayed", "stay", "staying"),
    ("listened", "listen", "listening"),
    ("cooked", "cook", "cooking"),
    ("wrote", "write", "writing"),
    ("drew", "draw", "drawing"),
    ("hummed", "hum", "humming"),
    ("skipped", "skip", "skipping"),
    ("rolled", "roll", "rolling"),
    ("slid", "slide", "sliding"),
]
# transitive verbs: (past, base)
TVERBS = [
    ("found", "find"),
    ("saw", "see"),
    ("liked", "like"),
    ("took", "take"),
    ("had", "have"),
    ("wanted", "want"),
    ("lost", "lose"),
    ("made", "make"),
    ("gave", "give"),
    ("held", "hold"),
    ("painted", "paint"),
    ("carried", "carry"),
    ("dropped", "drop"),
    ("washed", "wash"),
    ("built", "build"),
    ("opened", "open"),
    ("closed", "close"),
    ("fixed", "fix"),
    ("kicked", "kick"),
    ("threw", "throw"),
    ("caught", "catch"),
    ("hugged", "hug"),
    ("shared", "share"),
    ("bought", "buy"),
    ("sold", "sell"),
    ("picked", "pick"),
    ("moved", "move"),
    ("cleaned", "clean"),
    ("filled", "fill"),
    ("pushed", "push"),
    ("pulled", "pull"),
    ("needed", "need"),
    ("loved", "love"),
    ("tried", "try"),
]
PREPS = ["on", "under", "near", "in", "behind", "by", "beside", "inside", "at", "next to", "over", "around"]
TIMES = [
    "One day",
    "In the morning",
    "At night",
    "After lunch",
    "Yesterday",
    "Later",
    "Then",
    "On a sunny day",
    "In the evening",
    "Soon",
    "After that",
    "Every day",
    "Last week",
    "Before dinner",
    "In the summer",
    "In the winter",
    "Long ago",
    "The next day",
    "Suddenly",
]
WEATHER = [
    "sunny",
    "rainy",
    "windy",
    "cold",
    "warm",
    "quiet",
    "bright",
    "cloudy",
    "snowy",
    "foggy",
    "hot",
    "lovely",
]
FOODS = [
    "bread",
    "soup",
    "milk",
    "cheese",
    "apples",
    "cookies",
    "rice",
    "carrots",
    "honey",
    "fish",
    "pie",
    "eggs",
    "grapes",
    "pasta",
    "berries",
    "nuts",
    "corn",
    "jam",
    "beans",
    "toast",
    "cake",
    "pears",
]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "many", "some"]
IRREGULAR_PLURALS = {
    "mouse": "mice",
    "sheep": "sheep",
    "fish": "fish",
    "leaf": "leaves",
    "man": "men",
    "woman": "women",
    "child": "children",
    "goose": "geese",
    "deer": "deer",
    "shelf": "shelves",
    "wolf": "wolves",
}

# ----------------------------------------------------------------------------- phrase builders


def a_or_an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(rng: random.Random, nouns: list[str], det: str = "the", p_adj: float = 0.6) -> str:
    noun = rng.choice(nouns)
    adjs: list[str] = []
    if rng.random() < p_adj:
        adjs.append(rng.choice(SIZES + FEELINGS if nouns is ANIMALS or nouns is PEOPLE else THING_ADJS))
    if rng.random() < p_adj * 0.6:
        adjs.append(rng.choice(COLOURS))
    words = " ".join(adjs + [noun])
    if det == "a":
        det = a_or_an(words)
    return f"{det} {words}"


def who(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return rng.choice(NAMES)
    if r < 0.8:
        return noun_phrase(rng, ANIMALS)
    return noun_phrase(rng, PEOPLE)


def where(rng: random.Random) -> str:
    prep = rng.choice(PREPS)
    nouns = PLACES if rng.random() < 0.75 else OBJECTS
    return f"{prep} {noun_phrase(rng, nouns, p_adj=0.55)}"


def plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def task_parts(rng: random.Random) -> tuple[str, str, str]:
    """One (who, did, where) triple; the fine-tune sentence is `Who did where.`"""
    return who(rng), rng.choice(VERBS)[0], where(rng)


def task_sentence(parts: tuple[str, str, str]) -> str:
    w, d, p = parts
    return f"{cap(w)} {d} {p}."


# ----------------------------------------------------------------------------- corpus


def simple_sentence(rng: random.Random) -> str:
    k = rng.randrange(18)
    if k == 12:
        n = rng.choice(NUMBERS)
        return f"{rng.choice(NAMES)} saw {n} {plural(rng.choice(ANIMALS))} {where(rng)}."
    if k == 13:
        return f"The {rng.choice(OBJECTS)} is {rng.choice(THING_ADJS)} and {rng.choice(COLOURS)}."
    if k == 14:
        w = who(rng)
        return f"{cap(w)} {rng.choice(VERBS)[0]} {where(rng)} and felt {rng.choice(FEELINGS)}."
    if k == 15:
        return f"{cap(who(rng))} {rng.choice(TVERBS)[0]} the {rng.choice(OBJECTS)} because it was {rng.choice(THING_ADJS)}."
    if k == 16:
        a, b = rng.sample(NAMES, 2)
        return f"{a} and {b} {rng.choice(VERBS)[0]} {where(rng)}."
    if k == 17:
        return f"There were {rng.choice(NUMBERS)} {plural(rng.choice(OBJECTS))} {where(rng)}."
    if k in (0, 1, 2):  # the same shape as the task sentences
        return task_sentence(task_parts(rng))
    if k == 3:
        return f"{cap(who(rng))} {rng.choice(TVERBS)[0]} {noun_phrase(rng, OBJECTS, det='a')}."
    if k == 4:
        return f"The {rng.choice(OBJECTS)} was {rng.choice(COLOURS)}."
    if k == 5:
        return f"{cap(who(rng))} was {rng.choice(FEELINGS)}."
    if k == 6:
        return f"{rng.choice(TIMES)}, {who(rng)} {rng.choice(VERBS)[0]} {where(rng)}."
    if k == 7:
        return f"{rng.choice(NAMES)} likes to {rng.choice(VERBS)[1]} {where(rng)}."
    if k == 8:
        return f"It was a {rng.choice(WEATHER)} day in the {rng.choice(PLACES[:N_OPEN_PLACES])}."
    if k == 9:
        return f"{cap(who(rng))} was {rng.choice(VERBS)[2]} {where(rng)}."
    if k == 10:
        return f"{cap(who(rng))} ate some {rng.choice(FOODS)}."
    return f"There was {noun_phrase(rng, OBJECTS, det='a')} {where(rng)}."


def story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    animal = rng.choice(ANIMALS)
    friend = rng.choice([n for n in NAMES if n != name])
    place = rng.choice(PLACES[:N_OPEN_PLACES])
    obj = rng.choice(OBJECTS)
    colour = rng.choice(COLOURS)
    feel = rng.choice(FEELINGS)
    verb = rng.choice(VERBS)
    tverb = rng.choice(TVERBS)
    hero = rng.choice([name, f"the {animal}"])
    lines = []
    opening = rng.randrange(3)
    if opening == 0:
        size = rng.choice(SIZES)
        lines.append(f"Once upon a time, there was {a_or_an(size)} {size} {animal} named {name}.")
        hero = name
    elif opening == 1:
        lines.append(
            f"{name} lived in a {rng.choice(['big', 'small', 'little', 'old', 'new'])} house near the {place}."
        )
        hero = name
    else:
        lines.append(f"It was a {rng.choice(WEATHER)} day. {cap(hero)} went to the {place}.")
    body = [
        f"{rng.choice(TIMES)}, {hero} {tverb[0]} {a_or_an(colour)} {colour} {obj} {where(rng)}.",
        f"{cap(hero)} was very {feel}.",
        f"{cap(hero)} {verb[0]} {where(rng)}.",
        f"{friend} came to {rng.choice(['play', 'help', 'talk', 'look'])}.",
        f'"Look at my {obj}!" said {hero}.',
        f'"Can I {tverb[1]} it?" asked {friend}.',
        f'"Yes, you can," said {hero}.',
        f"They {rng.choice(['played', 'laughed', 'sang', 'walked'])} together {where(rng)}.",
        f"The {obj} was {colour} and {rng.choice(THING_ADJS)}.",
        f"{cap(hero)} wanted to {verb[1]} {where(rng)}.",
        f"But {hero} could not find the {obj}.",
        f"{friend} looked {where(rng)} and found it.",
        f"{cap(hero)} ate some {rng.choice(FOODS)} and felt {rng.choice(FEELINGS)}.",
        f"{friend} asked where the {obj} was.",
        f'Nobody knew who had the {obj}, so {hero} asked: "Who has my {obj}?"',
        f"{cap(hero)} did not know what to do.",
        f"{cap(hero)} wondered where {friend} was, and who {friend} was with.",
        f'{friend} said: "I know where it is. It is {where(rng)}."',
        f"{cap(hero)} told {friend} what {hero} did, where {hero} went, and who {hero} saw.",
    ]
    k = rng.randint(3, 7)
    lines.extend(rng.sample(body, k))
    endings = [
        f"At the end of the day, {hero} went home and slept.",
        f"{cap(hero)} and {friend} were good friends.",
        f"From that day on, {hero} loved the {colour} {obj}.",
        "The end.",
        f"{cap(hero)} smiled.",
    ]
    lines.append(rng.choice(endings))
    sep = "\n" if rng.random() < 0.3 else " "
    return sep.join(lines)


def question(rng: random.Random, parts: tuple[str, str, str], only: bool) -> str:
    """A question about a `who did where` sentence, answered by copying from it.

    `only`: the sentence is the only one in the text, so vague questions ("Who was it?") are fair.
    """
    w, d, p = parts
    k = rng.randrange(7) if only else rng.choice([0, 1, 2, 5])
    if k == 0:
        return f"Who {d} {p}? {cap(w)}."
    if k == 1:
        return f"Where did {w} {_base(d)}? {cap(p)}."
    if k == 2:
        return f"What did {w} do? {cap(w)} {d}."
    if k == 3:
        return f"Who was it? It was {w}."
    if k == 4:
        return f"Where was it? It was {p}."
    if k == 5:
        return f"What did {w} do {p}? {cap(w)} {d}."
    return f"Tell me again. {task_sentence(parts)}"


def qa(rng: random.Random) -> str:
    """One to three `who did where` sentences, then questions about them answered from the text."""
    facts = [task_parts(rng) for _ in range(rng.randint(1, 3))]
    lines = [" ".join(task_sentence(f) for f in facts)]
    for _ in range(rng.randint(1, 3)):
        lines.append(question(rng, rng.choice(facts), only=len(facts) == 1))
    if rng.random() < 0.2:
        o, c = rng.choice(OBJECTS), rng.choice(COLOURS)
        lines.append(f"The {o} is {c}. What colour is the {o}? It is {c}.")
    return ("\n" if rng.random() < 0.3 else " ").join(lines)


def echo(rng: random.Random) -> str:
    """Somebody reads sentences out and somebody else repeats them: plain copying."""
    a, b = rng.sample(NAMES, 2)
    sents = [
        task_sentence(task_parts(rng)) if rng.random() < 0.7 else simple_sentence(rng)
        for _ in range(rng.randint(1, 3))
    ]
    text = " ".join(sents)
    k = rng.randrange(3)
    if k == 0:
        return f'{a} said, "{text}" {b} said it again, "{text}"'
    if k == 1:
        return f"{a} wrote on the board:\n{text}\n{b} wrote the same words:\n{text}"
    return f"{text} {a} liked it, so {a} said it again. {text}"


def _base(past: str) -> str:
    for v in VERBS:
        if v[0] == past:
            return v[1]
    return past


def list_text(rng: random.Random) -> str:
    n = rng.randint(3, 6)
    lines = [task_sentence(task_parts(rng)) for _ in range(n)]
    return "\n".join(lines)


READ_PREFIXES = [
    "Read this: ",
    "Sentence: ",
    "Look: ",
    "Here is a sentence: ",
    "Note: ",
    "Say what happened: ",
    "",
]
ROLE_WORDS = {"who": 0, "did": 1, "where": 2}


def extract_lines(parts: tuple[str, str, str], rng: random.Random) -> str:
    """The parts of a `who did where` sentence, each named by its role word, in one of several
    plain-text layouts (never the fine-tune's JSON); the order of the roles varies, so a role word has
    to be matched to its words in the sentence rather than to a position."""
    roles = ["who", "did", "where"]
    if rng.random() < 0.3:
        rng.shuffle(roles)
    k = rng.randrange(5)
    if k == 0:
        return " ".join(f"{r}: {parts[ROLE_WORDS[r]]}." for r in roles)
    if k == 1:
        return "\n".join(f"{r} = {parts[ROLE_WORDS[r]]}" for r in roles)
    if k == 2:
        return ", ".join(f'the {r} is "{parts[ROLE_WORDS[r]]}"' for r in roles) + "."
    if k == 3:
        return "; ".join(f"{r} - {parts[ROLE_WORDS[r]]}" for r in roles)
    return "\n".join(f"{cap(r)}: {parts[ROLE_WORDS[r]]}" for r in roles)


def extract(rng: random.Random) -> str:
    """A `who did where` sentence, then its parts copied out by role: in-context extraction."""
    parts = task_parts(rng)
    sent = task_sentence(parts)
    head = rng.choice(READ_PREFIXES) + sent
    if rng.random() < 0.25:  # the chat layout of the fine-tune, with a plain-text request
        ask = rng.choice(["Name the parts: ", "Split it up: ", "Who, did, where: ", "Take apart: "])
        return f"<|user|>\n{ask}{sent}\n<|assistant|>\n{extract_lines(parts, rng)}"
    return f"{head}{rng.choice([' ', chr(10)])}{extract_lines(parts, rng)}"


def all_words() -> list[str]:
    return sorted(
        set(
            NAMES
            + ANIMALS
            + PEOPLE
            + OBJECTS
            + PLACES
            + COLOURS
            + SIZES
            + FEELINGS
            + [v[0] for v in VERBS]
            + PREPS
        )
    )


_ALL_WORDS = all_words()


def repeat(rng: random.Random) -> str:
    """Random words, then the same words again: only copying predicts the second half."""
    words = " ".join(rng.choice(_ALL_WORDS) for _ in range(rng.randint(3, 12)))
    a, b = rng.choice([("Words", "Again"), ("List", "Same list"), ("Say", "Repeat"), ("First", "Copy")])
    sep = rng.choice([" ", "\n"])
    return f"{a}: {words}.{sep}{b}: {words}."


def document(rng: random.Random) -> str:
    """One document of the `base` mix (the corpus of the shipped tiny-llama)."""
    r = rng.random()
    if r < 0.42:
        return story(rng)
    if r < 0.62:
        return " ".join(simple_sentence(rng) for _ in range(rng.randint(2, 6)))
    if r < 0.85:
        return qa(rng)
    if r < 0.94:
        return echo(rng)
    return list_text(rng)


def copy_document(rng: random.Random) -> str:
    """One document of the `copy` mix: mostly text that rewards copying from earlier in the document
    (extraction by role, random word lists said twice, questions, echoes), some stories and sentences."""
    r = rng.random()
    if r < 0.15:
        return story(rng)
    if r < 0.23:
        return " ".join(simple_sentence(rng) for _ in range(rng.randint(2, 6)))
    if r < 0.38:
        return qa(rng)
    if r < 0.46:
        return echo(rng)
    if r < 0.48:
        return list_text(rng)
    if r < 0.83:
        return extract(rng)
    return repeat(rng)


MIXES = {"base": document, "copy": copy_document}


def make_corpus(n_docs: int, seed: int, mix: str = "base") -> list[str]:
    rng = random.Random(seed)
    make = MIXES[mix]
    return [make(rng) for _ in range(n_docs)]


# ----------------------------------------------------------------------------- fine-tune task


def task_row(parts: tuple[str, str, str]) -> dict:
    w, d, p = parts
    completion = json.dumps({"who": w, "did": d, "where": p}, separators=(", ", ": "))
    return {"prompt": f"{PROMPT_PREFIX}{task_sentence(parts)}\n", "completion": completion}


def make_task(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed + 1)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_heldout:
        parts = task_parts(rng)
        sent = task_sentence(parts)
        if sent in seen:
            continue
        seen.add(sent)
        rows.append(task_row(parts))
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs", type=int, default=60000, help="pretraining documents")
    ap.add_argument("--train", type=int, default=1500, help="fine-tune training rows")
    ap.add_argument("--heldout", type=int, default=100, help="held-out fine-tune rows")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument(
        "--mix",
        choices=sorted(MIXES),
        default="base",
        help="document mix: base (the shipped tiny-llama's corpus) or copy (copy-rewarding documents, experimental)",
    )
    ap.add_argument("--examples-dir", type=Path, default=DEFAULT_EXAMPLES)
    ap.add_argument("--no-corpus", action="store_true", help="only write the fine-tune dataset")
    args = ap.parse_args()

    if not args.no_corpus:
        docs = make_corpus(args.docs, args.seed, args.mix)
        text = "\n\n".join(docs) + "\n"
        assert "{" not in text and "JSON" not in text, "the corpus must not contain the fine-tune task"
        args.corpus.parent.mkdir(parents=True, exist_ok=True)
        args.corpus.write_text(text)
        print(f"corpus: {len(docs)} documents, {len(text) / 1e6:.2f} MB -> {args.corpus}")

    train, heldout = make_task(args.train, args.heldout, args.seed)
    write_jsonl(args.examples_dir / "train.jsonl", train)
    write_jsonl(args.examples_dir / "heldout.jsonl", heldout)
    print(f"fine-tune: {len(train)} train / {len(heldout)} held-out rows -> {args.examples_dir}")


if __name__ == "__main__":
    main()
