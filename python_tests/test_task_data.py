"""The task builder (mazo_kernels.task_data): deterministic splits, no item in two splits, well-formed examples whose
answers agree with the source packages, and the committed copy under bench/data/real_tasks."""
import hashlib
import importlib.util
import json
import os

import pytest

from mazo_kernels import task_data as td
from mazo_kernels.tasks import load_task_file

MISSING = [m for m in ("vaderSentiment", "countryinfo", "lemminflect", "inflect") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"data packages not installed: {MISSING} "
                                                      "(pip install -e '.[tasks]')")
COMMITTED = os.path.join(os.path.dirname(__file__), "..", "bench", "data", "real_tasks")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    manifest = td.build(d)
    return d, manifest


def _rows(d, task, split):
    with open(td.split_path(d, task, split), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_deterministic(built, tmp_path):
    d, manifest = built
    again = td.build(tmp_path, tasks=("capital", "past_tense", "sentiment"))
    for t in ("capital", "past_tense", "sentiment"):
        for s in td.SPLITS:
            a = open(td.split_path(d, t, s), "rb").read()
            b = open(td.split_path(tmp_path, t, s), "rb").read()
            assert a == b, (t, s)
            assert manifest["tasks"][t][s]["sha256"] == hashlib.sha256(a).hexdigest()


def test_splits_disjoint_and_sized(built):
    d, manifest = built
    for t in td.TASKS:
        items = {s: [r["item"] for r in _rows(d, t, s)] for s in td.SPLITS}
        prompts = {s: {r["prompt"] for r in _rows(d, t, s)} for s in td.SPLITS}
        for s in td.SPLITS:
            assert len(items[s]) == len(set(items[s])), f"{t}/{s} repeats an item"
            assert len(items[s]) == manifest["tasks"][t][s]["n"] > 0
            assert len(items[s]) <= td.CAPS[s]
        for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
            assert not set(items[a]) & set(items[b]), f"{t}: {a} and {b} share items"
            assert not prompts[a] & prompts[b], f"{t}: {a} and {b} share prompts"
        assert len(items["test"]) >= 50 and len(items["train"]) >= 100


def test_well_formed(built):
    d, _ = built
    for t in td.TASKS:
        for s in td.SPLITS:
            exs = load_task_file(td.split_path(d, t, s))        # the package's own parser accepts every line
            for e, r in zip(exs, _rows(d, t, s)):
                assert e.task == t and e.is_choice
                assert len(set(e.choices)) == len(e.choices) >= 2
                assert 0 <= e.label < len(e.choices)
                assert all(c.startswith(" ") and c.strip() == c[1:] for c in e.choices)
                assert e.prompt and not e.prompt.endswith(" ")
                assert r["item"] in e.prompt or r["item"].capitalize() in e.prompt


def test_balanced_binary_tasks(built):
    d, _ = built
    for t in ("sentiment", "article"):
        for s in td.SPLITS:
            labels = [r["label"] for r in _rows(d, t, s)]
            assert abs(sum(labels) - len(labels) / 2) <= 1, (t, s)
            first = labels[:40]                                  # classes interleaved, not one class first
            assert 10 <= sum(first) <= 30, (t, s)
    for t in ("capital", "past_tense"):                          # answer positions spread over the choices
        labels = [r["label"] for r in _rows(d, t, "train")]
        n = len(_rows(d, t, "train")[0]["choices"])
        for k in range(n):
            assert labels.count(k) >= len(labels) / n / 2, (t, k)


def test_answers_agree_with_sources(built):
    d, _ = built
    import inflect
    import lemminflect
    eng = inflect.engine()
    capitals = dict(td.capital_items())
    vader = {w: m for w, m, _ in td._vader_rows()}
    for r in _rows(d, "capital", "test"):
        assert r["choices"][r["label"]] == " " + capitals[r["item"]]
        assert len(r["choices"]) == td.CAPITAL_CHOICES
        assert all(c[1:] in capitals.values() for c in r["choices"])
    for r in _rows(d, "past_tense", "test"):
        past = r["choices"][r["label"]][1:]
        assert past in lemminflect.getAllInflections(r["item"], upos="VERB")["VBD"]
        assert r["choices"][1 - r["label"]][1:] == td.naive_past(r["item"])
    for r in _rows(d, "article", "test"):
        assert eng.a(r["item"]).split(" ")[0] == r["choices"][r["label"]][1:]
    for r in _rows(d, "sentiment", "test"):
        m = vader[r["item"]]
        assert abs(m) >= td.SENTIMENT_MIN_ABS and r["label"] == int(m > 0)
        assert r["choices"] == [" terrible", " great"]


def test_committed_copy_matches_builder(built):
    """bench/data/real_tasks is what the GPU benchmark reads; it must be this builder's output."""
    d, manifest = built
    with open(os.path.join(COMMITTED, "manifest.json")) as f:
        committed = json.load(f)
    if committed["packages"] != manifest["packages"]:
        pytest.skip(f"data package versions differ from the committed build: {committed['packages']} vs "
                    f"{manifest['packages']}")
    assert committed == manifest
    for t in td.TASKS:
        for s in td.SPLITS:
            assert open(td.split_path(COMMITTED, t, s), "rb").read() == open(td.split_path(d, t, s), "rb").read()
    assert td.is_built(COMMITTED)


def test_missing_package_names_it(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "countryinfo" else real(name, *a))
    with pytest.raises(td.MissingDataPackage, match="pip install countryinfo"):
        td.build(tmp_path, tasks=("capital",))
    assert td.main(["--out", str(tmp_path), "--tasks", "capital"]) == 2
    with pytest.raises(ValueError, match="unknown task"):
        td.build(tmp_path, tasks=("nope",))
