"""Built-in default corpus: a seeded fictional world rendered as pretraining text plus Q/A pairs.

Only `random.Random(seed-derived)` is used (no global random, no salted str `hash()`), so output is
byte-identical across processes. Every fact is restated in many documents and phrasings so a tiny
model can learn it; held-out entities get eval questions only, their facts still in the corpus.
The instruction set asks each fact two ways: from memory ("recall") and about a short passage given in
the prompt ("reading"), so a small model that cannot yet hold the whole world still has something an
instruction-tuned model answers and a base model does not."""
import hashlib
import json
import os
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

from ..fsutil import fsync_dir

GENERATOR_VERSION = 3  # 3: each source's documents also in sources/<name>.jsonl
DEFAULT_NUM_DOCUMENTS = 10000  # ~4 MB of text, under a second to generate
NUM_PEOPLE = 400  # even: people come in sibling pairs sharing a surname
NUM_TOWNS = 36
EVAL_FRACTION = 0.15

PROFESSIONS = ["baker", "potter", "weaver", "carpenter", "fisher", "miller", "teacher", "doctor",
               "farmer", "smith", "tailor", "brewer", "sailor", "painter", "gardener", "mason",
               "cook", "librarian", "shepherd", "clockmaker", "glassblower", "beekeeper",
               "musician", "merchant", "engineer"]
PETS = ["cat", "dog", "goat", "parrot", "tortoise", "rabbit", "hedgehog", "pony", "owl", "duck",
        "ferret", "goose"]
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "white", "black", "grey", "brown",
           "pink", "silver", "gold", "teal", "crimson"]
FOODS = ["soup", "bread", "cheese", "apples", "pears", "honey", "porridge", "dumplings", "pancakes",
         "noodles", "plums", "rice", "beans", "mushrooms", "carrots", "cherries", "fish", "pie"]
WEATHER = ["sunny", "rainy", "windy", "foggy", "cold", "warm", "grey", "bright"]
TIMES = ["One morning", "Early one day", "On a quiet afternoon", "One evening", "Last spring",
         "On a market day"]

# Simple syllables keep invented names short and pronounceable (cheap for a small tokenizer).
ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "th",
          "sh", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "ai", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk"]
TOWN_SUFFIXES = ["holm", "ford", "wick", "by", "stead", "mouth", "dale", "bury"]


@dataclass(frozen=True)
class Town:
    name: str
    river: str
    founded: int
    population: int
    held_out: bool


@dataclass(frozen=True)
class Person:
    name: str  # full name, unique in the world
    first: str
    gender: str  # "f" or "m", only for pronouns
    town: str
    profession: str
    pet: str
    pet_name: str
    colour: str
    food: str
    born: int
    sibling: str
    friend: str
    held_out: bool


@dataclass(frozen=True)
class World:
    seed: int
    people: tuple[Person, ...]
    towns: tuple[Town, ...]

    @cached_property
    def held_out_names(self) -> frozenset[str]:
        return frozenset(e.name for e in (*self.people, *self.towns) if e.held_out)

    @cached_property  # writes the instance __dict__ directly, so it works on a frozen dataclass
    def by_name(self) -> dict[str, Person | Town]:
        return {e.name: e for e in (*self.people, *self.towns)}  # invented names never collide


def _invent_word(rng: random.Random, syllables: int, used: set[str], suffix: str = "") -> str:
    # One `used` set for every invented word keeps names, towns, rivers and pets from colliding.
    while True:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables))
        word = (word + rng.choice(CODAS) + suffix).capitalize()
        if word not in used and len(word) >= 4:
            used.add(word)
            return word


def generate_world(seed: int) -> World:
    rng = random.Random(f"{seed}:world")
    used: set[str] = set()
    towns = [Town(_invent_word(rng, 1, used, rng.choice(TOWN_SUFFIXES)), _invent_word(rng, 2, used),
                  rng.randint(900, 1850), rng.randint(8, 600) * 100, i < NUM_TOWNS * EVAL_FRACTION)
             for i in range(NUM_TOWNS)]
    first_pool = [_invent_word(rng, 2, used) for _ in range(NUM_PEOPLE * 2 // 3)]  # names repeat
    names, firsts = [], []
    for _ in range(NUM_PEOPLE // 2):  # a family = two siblings with one surname
        surname = _invent_word(rng, rng.choice([2, 3]), used)
        pair = rng.sample(first_pool, 2)
        firsts += pair
        names += [f"{first} {surname}" for first in pair]
    friends = names[:]
    while any(a == b for a, b in zip(names, friends)):
        rng.shuffle(friends)
    held_out = set(rng.sample(range(NUM_PEOPLE), round(NUM_PEOPLE * EVAL_FRACTION)))
    people = tuple(Person(
        name=names[i], first=firsts[i], gender=rng.choice("fm"), town=rng.choice(towns).name,
        profession=rng.choice(PROFESSIONS), pet=rng.choice(PETS), pet_name=_invent_word(rng, 2, used),
        colour=rng.choice(COLOURS), food=rng.choice(FOODS), born=rng.randint(1920, 2005),
        sibling=names[i ^ 1], friend=friends[i], held_out=i in held_out) for i in range(NUM_PEOPLE))
    return World(seed, people, tuple(towns))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _fields(world: World, p: Person) -> dict[str, str]:
    she, her = ("she", "her") if p.gender == "f" else ("he", "his")
    return dict(name=p.name, first=p.first, town=p.town, river=world.by_name[p.town].river,
                job=p.profession, a_job=_a(p.profession), pet=p.pet, a_pet=_a(p.pet),
                pet_name=p.pet_name, colour=p.colour, food=p.food, born=str(p.born),
                sibling=p.sibling, friend=p.friend, she=she, She=she.capitalize(), her=her)


# Third-person phrasings of each person fact; several per fact so the model sees varied wording.
FACT_SENTENCES = {
    "town": ["{name} lives in {town}.", "{name} makes {her} home in the town of {town}.",
             "{name} has lived in {town}, on the river {river}, for many years."],
    "job": ["{name} works as {a_job}.", "By trade, {name} is {a_job}.",
            "{name} earns a living as {a_job} in {town}."],
    "pet": ["{name} has {a_pet} named {pet_name}.", "{name} keeps {a_pet} called {pet_name}.",
            "{pet_name} is the {pet} that belongs to {name}."],
    "colour": ["The favourite colour of {name} is {colour}.", "{name} likes the colour {colour} best.",
               "{name} loves anything that is {colour}."],
    "food": ["The favourite food of {name} is {food}.", "{name} would eat {food} every day.",
             "Nothing pleases {name} more than a plate of {food}."],
    "born": ["{name} was born in {born}.", "{name} came into the world in the year {born}.",
             "Records show that {name} was born in {born}."],
    "sibling": ["{name} is the sibling of {sibling}.", "{name} and {sibling} are siblings.",
                "The sibling of {name} is {sibling}."],
    "friend": ["The best friend of {name} is {friend}.", "{name} is best friends with {friend}.",
               "{friend} is the closest friend of {name}."],
}


def _biography(world: World, p: Person, rng: random.Random) -> str:
    f = _fields(world, p)
    facts = list(FACT_SENTENCES)
    rng.shuffle(facts)
    body = " ".join(rng.choice(FACT_SENTENCES[k]).format(**f) for k in facts)
    title = rng.choice(["{name}", "About {name}", "A short life of {name}", "Who is {name}?"])
    return title.format(**f) + "\n\n" + body


def _story(world: World, p: Person, rng: random.Random) -> str:
    f = dict(_fields(world, p), when=rng.choice(TIMES), weather=rng.choice(WEATHER))
    g = {k + "2": v for k, v in _fields(world, world.by_name[p.friend]).items()}
    lines = [
        "{when}, {name} the {job} set out from {town} with {her} {pet}, {pet_name}.",
        "The day was {weather}, and {she} wore a {colour} scarf, because {colour} is {her} favourite colour.",
        "{She} was going to {town2} to visit {her} best friend, {name2}, who works there as {a_job2}.",
        "{name2} had cooked {food}, knowing that the favourite food of {name} is {food}.",
        "They talked about {sibling}, the sibling of {name}, and about {pet_name2}, the {pet2} of "
        "{name2}.",
        rng.choice(["In the evening {name} walked home along the river {river}.",
                    "At sunset {name} went back to {town}, tired and happy.",
                    "{name} stayed until dark and then returned to {town}."]),
    ]
    middle = sorted(rng.sample(range(2, 5), 2))  # two of the three visit lines, in story order
    return "\n".join(lines[i].format(**f, **g) for i in [0, 1, *middle, 5])


def _letter(world: World, p: Person, rng: random.Random) -> str:
    f, sib = _fields(world, p), world.by_name[p.sibling]
    g = {k + "2": v for k, v in _fields(world, sib).items()}
    news = ["Work here is busy; being {a_job} in {town} never gets dull.",
            "{pet_name}, my {pet}, sends you a greeting.",
            "I bought a {colour} coat, of course, since {colour} is still my favourite colour.",
            "Yesterday I cooked {food} again. You know I could eat {food} every day.",
            "Do you remember that I was born in {born}? It feels like a long time ago.",
            "My best friend {friend} asked about you."]
    body = " ".join(s.format(**f) for s in rng.sample(news, 4))
    return (f"To: {g['name2']}, {g['town2']}\nFrom: {f['name']}, {f['town']}\n\nDear {g['first2']},\n\n"
            f"The weather in {f['town']} is {rng.choice(WEATHER)} today. {body}\n"
            f"How is {g['pet_name2']}, and how is life as {g['a_job2']}?\n\n"
            f"With love from your sibling,\n{f['name']}")


def _dialogue(world: World, p: Person, rng: random.Random) -> str:
    f, other = _fields(world, p), _fields(world, world.by_name[p.friend])
    a, b = f["name"], other["name"]
    return "\n".join([
        f"{a}: Hello {other['first']}! How are things in {other['town']}?",
        f"{b}: Good, thank you. Being {other['a_job']} keeps me busy. And you, still in {f['town']}?",
        f"{a}: Yes, I still live in {f['town']} and work as {f['a_job']}.",
        f"{b}: And how is {f['pet_name']}, your {f['pet']}?",
        f"{a}: {f['pet_name']} is well. " + rng.choice([
            f"I made {f['food']} for dinner, my favourite food.",
            f"I painted my door {f['colour']}; {f['colour']} is my favourite colour.",
            f"My sibling {f['sibling']} is coming to visit soon."]),
        f"{b}: " + rng.choice(["Wonderful.", "Glad to hear it.", "See you soon, old friend."])])


def _record(world: World, p: Person, rng: random.Random) -> str:
    # Code-like text: exercises indentation, tabs, quotes and braces in the tokenizer.
    f = _fields(world, p)
    keys = ["name", "town", "job", "pet", "pet_name", "colour", "food", "born", "sibling", "friend"]
    if rng.random() < 0.5:
        items = "".join(f"    \"{k}\": {f[k] if k == 'born' else json.dumps(f[k])},\n" for k in keys)
        var = f["first"].lower()
        return (f"# person record\n{var} = {{\n{items}}}\n\n\ndef describe(person):\n"
                f"    return f\"{{person['name']}} lives in {{person['town']}}.\"\n")
    lines = "".join(f"\t{k}\t{f[k]}\n" for k in keys)
    return f"[person]\n{lines}"


def _gazetteer(world: World, t: Town, rng: random.Random) -> str:
    residents = [p for p in world.people if p.town == t.name]
    shown = rng.sample(residents, min(len(residents), 6))
    listing = "".join(f"- {p.name}, {p.profession}\n" for p in shown)
    intro = rng.choice(["{n} is a town on the river {r}. It was founded in {y} and has {k} inhabitants.",
                        "Founded in {y}, {n} lies on the river {r} and is home to {k} people.",
                        "The town of {n} (population {k}) was founded in {y} beside the river {r}."])
    return (f"{t.name}\n\n" + intro.format(n=t.name, r=t.river, y=t.founded, k=t.population)
            + f"\n\nResidents of {t.name} include:\n{listing}")


def _table(world: World, rng: random.Random) -> str:
    rows = rng.sample(world.people, 6)
    if rng.random() < 0.5:
        return "name,town,profession,born\n" + "".join(
            f"{p.name},{p.town},{p.profession},{p.born}\n" for p in rows)
    return "| name | pet | pet name | favourite colour |\n|---|---|---|---|\n" + "".join(
        f"| {p.name} | {p.pet} | {p.pet_name} | {p.colour} |\n" for p in rows)


# Document kind -> relative frequency; person kinds take a protagonist, "town" a town.
DOC_KINDS = {_biography: 3, _story: 3, _letter: 2, _dialogue: 2, _record: 2, "town": 1.5, "table": 1, "quiz": 2}
# The built-in corpus is a mixture of two sources (data.sources.<name>): running text, and tables and records.
# Each source's file is sources/<name>.jsonl; corpus.jsonl keeps every document, in generation order.
SOURCE_OF_KIND = {_biography: "prose", _story: "prose", _letter: "prose", _dialogue: "prose", "quiz": "prose",
                  _record: "records", "town": "records", "table": "records"}
SOURCES = {"prose": 0.75, "records": 0.25}  # default weights: records (~21% of the text) a little upsampled


def iter_documents(world: World, seed: int, num_documents: int) -> Iterator[str]:
    for _, text in iter_sourced_documents(world, seed, num_documents):
        yield text


def iter_sourced_documents(world: World, seed: int, num_documents: int) -> Iterator[tuple[str, str]]:
    """(source, document) in corpus order: the documents of iter_documents, each with its source."""
    rng = random.Random(f"{seed}:documents")
    kinds, weights = list(DOC_KINDS), list(DOC_KINDS.values())
    trainable = [p for p in world.people if not p.held_out]
    # Protagonists come from reshuffled queues, so every entity is covered about equally often.
    people_queue: list[Person] = []
    towns_queue: list[Town] = []
    for _ in range(num_documents):
        kind = rng.choices(kinds, weights)[0]
        source = SOURCE_OF_KIND[kind]
        if kind == "table":
            yield source, _table(world, rng)
        elif kind == "quiz":  # never about held-out people: their Q/A pairs are for evaluation only
            yield source, _quiz(world, rng.choice(trainable), rng)
        elif kind == "town":
            towns_queue = towns_queue or rng.sample(world.towns, len(world.towns))
            yield source, _gazetteer(world, towns_queue.pop(), rng)
        else:
            people_queue = people_queue or rng.sample(world.people, len(world.people))
            yield source, kind(world, people_queue.pop(), rng)


# Keyed by the attribute that answers the question; prompts are formatted with the entity's fields.
PERSON_QUESTIONS = {
    "town": ["In which town does {name} live?", "Where does {name} live?", "What town is {name} from?"],
    "profession": ["What does {name} do for a living?", "What is the profession of {name}?",
                   "What is {name}'s job?"],
    "pet": ["What kind of pet does {name} have?", "What animal does {name} keep as a pet?"],
    "pet_name": ["What is the name of {name}'s pet?", "What is the {pet} of {name} called?"],
    "colour": ["What is {name}'s favourite colour?", "Which colour does {name} like best?"],
    "food": ["What is {name}'s favourite food?", "What food does {name} love most?"],
    "born": ["In which year was {name} born?", "When was {name} born?"],
    "sibling": ["Who is the sibling of {name}?", "What is the name of {name}'s sibling?"],
    "friend": ["Who is {name}'s best friend?", "Who is the best friend of {name}?"],
}
TOWN_QUESTIONS = {
    "river": ["Which river flows through {name}?", "On which river does {name} lie?"],
    "founded": ["In which year was {name} founded?", "When was {name} founded?"],
    "population": ["How many people live in {name}?", "What is the population of {name}?"],
}


# Which passage sentence states the fact a question asks for.
PERSON_FACT_SENTENCE = {"town": "town", "profession": "job", "pet": "pet", "pet_name": "pet", "colour": "colour",
                        "food": "food", "born": "born", "sibling": "sibling", "friend": "friend"}


def _sentence(world: World, p: Person, fact: str, rng: random.Random, avoid: frozenset[str]) -> str | None:
    """One phrasing of a fact of p that names nothing in `avoid`, or None when every phrasing does."""
    for template in rng.sample(FACT_SENTENCES[fact], len(FACT_SENTENCES[fact])):
        sentence = template.format(**_fields(world, p))
        if not any(name in sentence for name in avoid):
            return sentence
    return None


# The kind of word each fact sentence adds to a passage; other people's names count as "person".
FACT_KIND = {"town": "place", "job": "job", "pet": "pet", "colour": "colour", "food": "food", "born": "year",
             "sibling": "person", "friend": "person"}


def _person_passage(world: World, p: Person, attrs: list[str], rng: random.Random) -> str | None:
    """Sentences stating `attrs` of p, one more fact of p and, where it adds no competing answer, one fact
    of somebody of p's split, shuffled. The extra sentences never hold another word of the kind asked for
    (a second colour for a colour question), so a small model can answer by finding the word of that kind.
    A passage about a training person never names a held-out person or town (training prompts stay clear
    of them); None when a fact asked for cannot be stated without one."""
    avoid = frozenset() if p.held_out else world.held_out_names
    facts = list(dict.fromkeys(PERSON_FACT_SENTENCE[a] for a in attrs))
    asked = {FACT_KIND[f] for f in facts}
    sentences = [_sentence(world, p, fact, rng, avoid) for fact in facts]
    if None in sentences:
        return None
    free = [f for f in rng.sample(list(FACT_SENTENCES), len(FACT_SENTENCES)) if FACT_KIND[f] not in asked]
    extra = [s for s in (_sentence(world, p, f, rng, avoid) for f in free if f not in facts) if s]
    if "person" not in asked:  # the stranger's own name would compete with a name answer
        stranger = rng.choice([q for q in world.people if q.held_out == p.held_out and q.name != p.name])
        extra[1:] = [s for s in (_sentence(world, stranger, f, rng, avoid) for f in free
                                 if FACT_KIND[f] != "person") if s][:1]
    sentences += extra[:2]
    rng.shuffle(sentences)
    return " ".join(sentences)


def _quiz(world: World, p: Person, rng: random.Random) -> str:
    """Reading practice in plain text: a passage, then questions it answers (the skill the reading
    instructions ask for; fine-tuning then only has to teach the chat format)."""
    attrs = rng.sample(list(PERSON_QUESTIONS), rng.randint(1, 3))
    # half the answers start their own line, as an assistant's answer does in the chat template (all of
    # them inline took exact match after fine-tuning on the default run from 0.30 to 0.17)
    separator = rng.choice([" ", "\n"])
    qa = "".join(f"\n\nQuestion: {rng.choice(PERSON_QUESTIONS[a]).format(**vars(p))}\nAnswer:{separator}"
                 f"{getattr(p, a)}" for a in attrs)
    passage = _person_passage(world, p, attrs, rng) or _person_passage(world, p, attrs[:1], rng) or ""
    return rng.choice(["Reading practice", "Questions on a text", "Quiz"]) + "\n\n" + passage + qa


def _town_passage(world: World, t: Town, rng: random.Random) -> str:
    return _gazetteer(world, t, rng).split("\n\nResidents")[0].split("\n\n", 1)[1]


def instructions(world: World, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) Q/A pairs; eval covers only held-out entities, whose facts are still in the corpus.

    Every fact is asked from memory (`task: recall`) and after a passage that states it (`task: reading`)."""
    rng = random.Random(f"{seed}:instructions")
    train, evaluation = [], []
    entities = [(p, PERSON_QUESTIONS) for p in world.people] + [(t, TOWN_QUESTIONS) for t in world.towns]
    for entity, questions in entities:
        split = evaluation if entity.held_out else train
        for attr, templates in questions.items():
            answer = str(getattr(entity, attr))
            # Train sees two phrasings per fact (teaches the format); eval asks one.
            for template in rng.sample(templates, 1 if entity.held_out else 2):
                split.append({"prompt": template.format(**vars(entity)), "response": answer, "task": "recall"})
            passage = (_person_passage(world, entity, [attr], rng) if isinstance(entity, Person)
                       else _town_passage(world, entity, rng))
            if passage is None:  # it would name a held-out person or town in a training prompt
                continue
            split.append({"prompt": passage + "\n\n" + rng.choice(templates).format(**vars(entity)),
                          "response": answer, "task": "reading"})
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


@dataclass(frozen=True)
class DefaultCorpusInfo:
    corpus_path: Path
    instructions_train_path: Path
    instructions_eval_path: Path
    num_documents: int
    corpus_bytes: int
    num_train_instructions: int
    num_eval_instructions: int


CORPUS, TRAIN, EVAL, INFO = "corpus.jsonl", "instructions_train.jsonl", "instructions_eval.jsonl", "info.json"


def source_file(source: str) -> str:
    """The file of one built-in source, beside corpus.jsonl."""
    return f"{source}.jsonl"


SOURCE_FILES = tuple(source_file(name) for name in SOURCES)


def _write_atomically(path: Path, lines: Iterator[str]) -> tuple[int, str]:
    """Stream lines into a temp file, fsync, rename into place; returns (bytes, sha256)."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")  # per-pid: concurrent writers don't clash
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as fh:
        for line in lines:
            data = line.encode("utf-8")
            digest.update(data)
            size += len(data)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size, digest.hexdigest()


def _info_from(out_dir: Path, info: dict) -> DefaultCorpusInfo:
    return DefaultCorpusInfo(
        out_dir / CORPUS, out_dir / TRAIN, out_dir / EVAL, info["num_documents"],
        info["files"][CORPUS]["bytes"], info["num_train_instructions"], info["num_eval_instructions"])


def _reusable(out_dir: Path, seed: int, num_documents: int) -> dict | None:
    """The recorded info if it matches the request and every file still has its recorded size."""
    try:
        info = json.loads((out_dir / INFO).read_text(encoding="utf-8"))
        matches = (info["seed"], info["num_documents"], info["generator_version"]) == (
            seed, num_documents, GENERATOR_VERSION)
        if matches and all((out_dir / n).stat().st_size == info["files"][n]["bytes"]
                           for n in (CORPUS, TRAIN, EVAL, *SOURCE_FILES)):
            return info
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _writer_is_gone(tmp: Path) -> bool:
    """True for a temp file left by a crashed run; a concurrent live writer's file is left alone."""
    try:
        pid = int(tmp.name.rsplit(".", 1)[1])
        os.kill(pid, 0)  # signal 0 only checks that the process exists
        return pid <= 0 or pid == os.getpid()
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:  # alive, owned by another user
        return False


def _source_documents(world: World, seed: int, num_documents: int, name: str) -> Iterator[dict]:
    return ({"text": doc} for source, doc in iter_sourced_documents(world, seed, num_documents) if source == name)


def write_default_corpus(out_dir: Path, seed: int = 1234,
                         num_documents: int = DEFAULT_NUM_DOCUMENTS) -> DefaultCorpusInfo:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = _reusable(out_dir, seed, num_documents)
    if info is not None:
        return _info_from(out_dir, info)
    # Drop the old info.json first: if we crash midway, no stale info can vouch for mixed files.
    (out_dir / INFO).unlink(missing_ok=True)
    fsync_dir(out_dir)
    for leftover in out_dir.glob(".*.tmp.*"):
        if leftover.name.split(".tmp.")[0][1:] in (CORPUS, TRAIN, EVAL, INFO, *SOURCE_FILES) and _writer_is_gone(leftover):
            leftover.unlink(missing_ok=True)
    world = generate_world(seed)
    train, evaluation = instructions(world, seed)
    docs = ({"text": doc} for doc in iter_documents(world, seed, num_documents))
    files = {}
    # one pass per file keeps memory bounded for any num_documents (generation is cheap and seeded)
    by_source = [(source_file(name), _source_documents(world, seed, num_documents, name)) for name in SOURCES]
    for name, objects in [(CORPUS, docs), (TRAIN, train), (EVAL, evaluation), *by_source]:
        size, sha = _write_atomically(
            out_dir / name, (json.dumps(obj, ensure_ascii=False) + "\n" for obj in objects))
        files[name] = {"bytes": size, "sha256": sha}
    info = {"seed": seed, "num_documents": num_documents, "generator_version": GENERATOR_VERSION,
            "num_train_instructions": len(train), "num_eval_instructions": len(evaluation),
            "files": files}
    _write_atomically(out_dir / INFO, iter([json.dumps(info, indent=2, ensure_ascii=False) + "\n"]))
    return _info_from(out_dir, info)
