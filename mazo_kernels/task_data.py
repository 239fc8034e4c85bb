"""Real classification tasks built from human-curated data that ships inside Python packages.

    python -m mazo_kernels.task_data --out DIR          # writes DIR/<task>_{train,dev,test}.jsonl + manifest.json

Four tasks, each in the JSONL task format of ``mazo_kernels.tasks`` (prompt, choices, label, task), with prompts in
the style of MeZO's (a short template, candidate answers scored by likelihood):

| task | source (package) | item | prompt | choices |
|---|---|---|---|---|
| ``sentiment`` | vaderSentiment's rated lexicon (``vader_lexicon.txt``: mean of 10 human ratings in [-4, 4]) | a word with mean rating |m| >= 1.5 and rating std <= 1.0 | ``Cheerful. It was`` | `` terrible`` / `` great`` (MeZO's SST-2 verbalizer) |
| ``capital`` | countryinfo (country -> capital) | a country whose capital is unique in the data | ``The capital of France is`` | the capital and 3 other countries' capitals |
| ``past_tense`` | lemminflect's inflection lexicon (verbs, past tense VBD) | a verb whose past tense is not the naive ``+ed`` / ``+d`` form | ``The past tense of go is`` | the past tense and the naive form (`` went`` / `` goed``) |
| ``article`` | inflect's a/an rules (``inflect.engine().a``) over lemminflect's noun lemmas | a noun | ``Which article goes before "hour", a or an? Answer:`` | `` a`` / `` an`` |

Determinism: the items of a task are sorted by ``sha256("mazo_kernels.task_data/v1/<task>/<item>")``, a fixed
pseudo-random order that depends on the item alone (not on the order the package lists them in), and the splits are
consecutive slices of that order, so the three splits never share an item (the item is the word, the country, the
verb or the noun). Binary tasks are class-balanced in every split (the larger class is cut to the smaller one's
size, again in hash order). Choice order and distractors come from ``random.Random`` seeded by the item's hash. The
same package versions give byte-identical files; ``manifest.json`` records the versions, counts and sha256 of
every file.

The data packages are an optional extra (``pip install -e ".[tasks]"``): vaderSentiment, countryinfo, lemminflect,
inflect. Only their data is read: vaderSentiment's lexicon file (the module itself, which needs ``requests``, is
not imported), countryinfo's country list, lemminflect's inflection table and ``getAllInflections``, inflect's
``engine().a``.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import random
import sys

BUILDER_VERSION = 1
TASKS = ("sentiment", "capital", "past_tense", "article")
SPLITS = ("train", "dev", "test")
# fraction of a task's items per split, and the most items a split may take (binary tasks: split evenly by class)
FRACTIONS = {"test": 0.25, "dev": 0.15}
CAPS = {"train": 1000, "dev": 200, "test": 400}
PACKAGES = {"sentiment": ("vaderSentiment",), "capital": ("countryinfo",), "past_tense": ("lemminflect",),
            "article": ("inflect", "lemminflect")}
PIP_NAMES = {"vaderSentiment": "vaderSentiment", "countryinfo": "countryinfo", "lemminflect": "lemminflect",
             "inflect": "inflect"}

SENTIMENT_MIN_ABS = 1.5
SENTIMENT_MAX_STD = 1.0
CAPITAL_CHOICES = 4


class MissingDataPackage(ImportError):
    """A data package of the task builder is not installed; the message says what to install."""


def _require(module: str):
    if importlib.util.find_spec(module) is None:
        raise MissingDataPackage(
            f"the task builder needs the package {PIP_NAMES.get(module, module)!r} (module {module!r}), which is not "
            f"installed: pip install {PIP_NAMES.get(module, module)}   (or all data packages at once: "
            "pip install --no-build-isolation -e \".[tasks]\")")
    return importlib.import_module(module)


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def item_hash(task: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"mazo_kernels.task_data/v{BUILDER_VERSION}/{task}/{key}".encode()).digest()[:8],
                          "big")


def _hash_order(task: str, items, key=lambda x: x[0], salt: str = ""):
    return sorted(items, key=lambda x: (item_hash(task, salt + key(x)), key(x)))


# ---------------------------------------------------------------------------------------------------- sources
def _vader_rows():
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None:
        _require("vaderSentiment")
    # the lexicon is a data file of the package; the package's module imports `requests`, which is not needed here
    path = os.path.join(list(spec.submodule_search_locations)[0], "vader_lexicon.txt")
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                yield parts[0], float(parts[1]), float(parts[2])


def sentiment_items():
    """[(word, label)]: label 1 = positive (mean rating > 0), 0 = negative."""
    rows = list(_vader_rows())
    seen = {}
    for word, _, _ in rows:
        seen[word] = seen.get(word, 0) + 1
    out = []
    for word, mean, std in rows:
        if seen[word] == 1 and word.isalpha() and word.isascii() and word.islower() and len(word) >= 3 \
                and abs(mean) >= SENTIMENT_MIN_ABS and std <= SENTIMENT_MAX_STD:   # words listed twice are left out
            out.append((word, int(mean > 0)))
    return sorted(out)


def capital_items():
    """[(country, capital)] for countries with one plain capital that no other country in the data shares."""
    ci = _require("countryinfo")
    rows = []
    for c in ci.all_countries():
        try:
            name, cap = c.name(), c.capital()
        except Exception:  # noqa: BLE001 -- an entry without the field is skipped, like one with an empty field
            continue
        if not isinstance(name, str) or not isinstance(cap, str):
            continue
        name, cap = name.strip(), cap.strip()
        if not name or not cap or any(ch in name for ch in ",()") or "/" in cap:
            continue
        rows.append((name, cap))
    count = {}
    for _, cap in rows:
        count[cap] = count.get(cap, 0) + 1
    return sorted({(n, c) for n, c in rows if count[c] == 1})


def _lemminflect_rows(category: str):
    li = _require("lemminflect")
    path = li.config.inflection_lu_fn
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[1] == category:
                yield row[0]


def naive_past(verb: str) -> str:
    return verb + ("d" if verb.endswith("e") else "ed")


def past_tense_items():
    """[(verb, past tense, naive form)] for verbs whose past tense is not the naive +ed / +d form."""
    li = _require("lemminflect")
    out = set()
    for lemma in _lemminflect_rows("verb"):
        if not (lemma.isalpha() and lemma.isascii() and lemma.islower() and len(lemma) >= 2):
            continue
        vbd = li.getAllInflections(lemma, upos="VERB").get("VBD")
        if not vbd:
            continue
        naive = naive_past(lemma)
        past = vbd[0]
        if naive in vbd or not (past.isalpha() and past.isascii()) or past == lemma:
            continue
        out.add((lemma, past, naive))
    return sorted(out)


def article_items():
    """[(noun, label)]: label 1 = "an", 0 = "a", by inflect's rules, over lemminflect's noun lemmas."""
    inflect = _require("inflect")
    _require("lemminflect")
    eng = inflect.engine()
    out = set()
    for noun in _lemminflect_rows("noun"):
        if not (noun.isalpha() and noun.isascii() and noun.islower() and len(noun) >= 3):
            continue
        art = eng.a(noun).split(" ", 1)[0]
        if art in ("a", "an"):
            out.add((noun, int(art == "an")))
    return sorted(out)


# ---------------------------------------------------------------------------------------------------- splits
def _split_counts(n: int, strata: int = 1):
    """Items per split for a pool of n (per stratum when strata > 1): test and dev by fraction and cap, train the
    rest up to its cap."""
    out = {}
    rest = n
    for s in ("test", "dev"):
        k = min(CAPS[s] // strata, int(round(FRACTIONS[s] * n)))
        out[s] = k
        rest -= k
    out["train"] = min(CAPS["train"] // strata, rest)
    return out


def _slices(task: str, items, strata_of=None):
    """{split: [item]} from hash-ordered items; with strata_of, each stratum (class) is cut to the smallest one's size
    and split separately, so every split is balanced."""
    if strata_of is None:
        groups = [_hash_order(task, items)]
    else:
        by = {}
        for it in items:
            by.setdefault(strata_of(it), []).append(it)
        groups = [_hash_order(task, by[k]) for k in sorted(by)]
        m = min(len(g) for g in groups)
        groups = [g[:m] for g in groups]
    out = {s: [] for s in SPLITS}
    for g in groups:
        c = _split_counts(len(g), len(groups))
        out["test"] += g[:c["test"]]
        out["dev"] += g[c["test"]:c["test"] + c["dev"]]
        out["train"] += g[c["test"] + c["dev"]:c["test"] + c["dev"] + c["train"]]
    # interleave classes in an order independent of the one that chose the items (a cut class's items have the
    # lowest first hashes, so that order would list it first), so every prefix of a file is about balanced
    return {s: _hash_order(task, v, salt="order/") for s, v in out.items()}


def _rng(task: str, key: str) -> random.Random:
    return random.Random(item_hash(task, "choices/" + key))


def build_task(task: str) -> dict:
    """{split: [example dict]} for one task."""
    if task == "sentiment":
        sp = _slices(task, sentiment_items(), strata_of=lambda x: x[1])
        return {s: [{"prompt": f"{w.capitalize()}. It was", "choices": [" terrible", " great"], "label": y,
                     "task": task, "item": w} for w, y in v] for s, v in sp.items()}
    if task == "capital":
        items = capital_items()
        capitals = sorted({c for _, c in items})
        sp = _slices(task, items)
        out = {}
        for s, v in sp.items():
            rows = []
            for name, cap in v:
                r = _rng(task, name)
                others = r.sample([c for c in capitals if c != cap], CAPITAL_CHOICES - 1)
                choices = others + [cap]
                r.shuffle(choices)
                rows.append({"prompt": f"The capital of {name} is", "choices": [" " + c for c in choices],
                             "label": choices.index(cap), "task": task, "item": name})
            out[s] = rows
        return out
    if task == "past_tense":
        sp = _slices(task, past_tense_items())
        out = {}
        for s, v in sp.items():
            rows = []
            for verb, past, naive in v:
                choices = [past, naive]
                if _rng(task, verb).random() < 0.5:
                    choices.reverse()
                rows.append({"prompt": f"The past tense of {verb} is", "choices": [" " + c for c in choices],
                             "label": choices.index(past), "task": task, "item": verb})
            out[s] = rows
        return out
    if task == "article":
        sp = _slices(task, article_items(), strata_of=lambda x: x[1])
        return {s: [{"prompt": f'Which article goes before "{n}", a or an? Answer:', "choices": [" a", " an"],
                     "label": y, "task": task, "item": n} for n, y in v] for s, v in sp.items()}
    raise ValueError(f"unknown task {task!r}; the tasks are {list(TASKS)}")


def split_path(out_dir, task: str, split: str) -> str:
    return os.path.join(os.fspath(out_dir), f"{task}_{split}.jsonl")


def _dumps(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def build(out_dir, tasks=TASKS, *, quiet: bool = True) -> dict:
    """Write ``out_dir/<task>_<split>.jsonl`` for every task and split, and ``out_dir/manifest.json``; return the
    manifest. Raises MissingDataPackage naming the package when one is not installed."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; the tasks are {list(TASKS)}")
        for mod in PACKAGES[t]:
            _require(mod)
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"format": "mazo_kernels.task_data", "builder_version": BUILDER_VERSION,
                "packages": {p: package_version(p) for p in sorted({m for t in tasks for m in PACKAGES[t]})},
                "tasks": {}}
    for t in tasks:
        data = build_task(t)
        manifest["tasks"][t] = {}
        for s in SPLITS:
            blob = _dumps(data[s])
            with open(split_path(out_dir, t, s), "wb") as f:
                f.write(blob)
            manifest["tasks"][t][s] = {"n": len(data[s]), "sha256": hashlib.sha256(blob).hexdigest(),
                                       "file": os.path.basename(split_path(out_dir, t, s))}
        if not quiet:
            print(f"{t:<11} " + "  ".join(f"{s} {len(data[s]):4d}" for s in SPLITS))
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


def is_built(out_dir, tasks=TASKS) -> bool:
    """Whether out_dir holds every split of every task and a manifest that names them with matching sizes."""
    mpath = os.path.join(os.fspath(out_dir), "manifest.json")
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    if m.get("builder_version") != BUILDER_VERSION:
        return False
    for t in tasks:
        for s in SPLITS:
            e = m.get("tasks", {}).get(t, {}).get(s)
            if e is None or not os.path.isfile(split_path(out_dir, t, s)):
                return False
    return True


def load_splits(data_dir, tasks=TASKS, splits=SPLITS) -> dict:
    """{split: {task: [Example]}} from a built directory."""
    from .tasks import load_task_file
    return {s: {t: load_task_file(split_path(data_dir, t, s), task=t) for t in tasks} for s in splits}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mazo_kernels.task_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    a = p.parse_args(argv)
    try:
        m = build(a.out, a.tasks, quiet=False)
    except MissingDataPackage as exc:
        print(f"task_data: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} (packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
