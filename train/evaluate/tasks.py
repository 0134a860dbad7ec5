"""The four benchmarks, read from local files in the schema of each public release.

Nothing is downloaded. ``--data-dir DIR`` holds one folder per benchmark, laid out as its
release ships it (docs/evaluate.md says where each is published and how to place it):

    DIR/medqa_4options/phrases_no_exclude_test.jsonl   questions (Jin et al. 2021, US, 4 options)
    DIR/medqa_4options/phrases_no_exclude_train.jsonl  demonstrations
    DIR/medmcqa/dev.json, train.json                   JSON lines (Pal et al. 2022); dev is scored
    DIR/pubmedqa/test_set.json, train_set.json         PQA-L objects keyed by PMID (Jin et al. 2019)
    DIR/mmlu/test/<subject>_test.csv, dev/<subject>_dev.csv   (Hendrycks et al. 2021)

A missing file or a malformed record raises DataError naming the file and the line.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os

LETTERS = ("A", "B", "C", "D")
DECISIONS = ("yes", "no", "maybe")
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")


class DataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Question:
    task: str                 # the (sub)task it belongs to, e.g. "medmcqa" or "mmlu_anatomy"
    id: str                   # stable within the task: the dataset's id, a PMID, or the line number
    question: str
    labels: tuple[str, ...]   # what an answer is called: A..D, or yes/no/maybe
    answer: int               # index of the gold label
    options: tuple[str, ...] = ()   # option texts, one per label (none for PubMedQA)
    context: str = ""         # PubMedQA's abstract
    explanation: str = ""     # MedMCQA's exp, PubMedQA's long answer: used by chain-of-thought prompts

    @property
    def gold(self) -> str:
        return self.labels[self.answer]


@dataclasses.dataclass
class TaskData:
    name: str
    questions: list[Question]          # the questions scored
    pools: dict[str, list[Question]]   # demonstrations, per (sub)task
    files: list[str]                   # the files read, for results.json


# ----------------------------------------------------------------------------------- readers
def _need(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (see docs/evaluate.md for the expected layout)")


def _jsonl(path: str):
    """(line number, object) of every non-blank line."""
    _need(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                shape = _whole_file_shape(path)
                if shape is not None:
                    raise DataError(f"{path}: valid JSON, but one {shape} rather than JSON lines (one object per "
                                    "line)") from None
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def _whole_file_shape(path: str) -> str | None:
    """"a JSON array" (or object, ...) when the whole file is one valid JSON document, else None."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except ValueError:
        return None
    return {list: "JSON array", dict: "JSON object"}.get(type(doc), f"JSON {type(doc).__name__}")


def _json_object_members(path: str):
    """(line number, key, value) of each member of a file holding one JSON object.

    Decodes member by member so a bad record can be reported with its line."""
    _need(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    dec = json.JSONDecoder()
    line = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731

    def skip(pos):
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def expect(pos, ch):
        pos = skip(pos)
        if pos >= len(text) or text[pos] != ch:
            raise DataError(f"{path}:{line(pos)}: not valid JSON (expected {ch!r})")
        return pos + 1

    if not text[skip(0):].startswith("{"):
        shape = _whole_file_shape(path)
        if shape is not None:
            raise DataError(f"{path}: valid JSON, but one {shape}; expected one JSON object mapping each PMID "
                            "to its record")
    pos = expect(0, "{")
    if skip(pos) < len(text) and text[skip(pos)] == "}":
        return
    while True:
        pos = skip(pos)
        try:
            key, pos = dec.raw_decode(text, pos)
            pos = expect(pos, ":")
            start = skip(pos)
            value, pos = dec.raw_decode(text, start)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(key, str):
            raise DataError(f"{path}:{line(start)}: expected a string key")
        yield line(start), key, value
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        expect(pos, "}")
        return


def _str(obj: dict, key: str, where: str, optional: bool = False) -> str:
    v = obj.get(key)
    if v is None and optional:
        return ""
    if not isinstance(v, str) or (not optional and not v.strip()):
        got = "missing" if key not in obj else f"{type(v).__name__} {v!r}"[:80]
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {got}")
    return v


def _one_line(text: str) -> str:
    # explanations become one paragraph: a blank line ends an answer in generated text
    return " ".join(text.split())


# ----------------------------------------------------------------------------------- tasks
def _medqa(path: str, task: str) -> list[Question]:
    out = []
    for n, obj in _jsonl(path):
        where = f"{path}:{n}"
        q = _str(obj, "question", where)
        options = obj.get("options")
        if not isinstance(options, dict) or sorted(options) != list(LETTERS):
            raise DataError(f"{where}: field 'options' must be an object with keys A, B, C, D "
                            f"(the 4-options release), got {options!r}"[:200])
        texts = tuple(_str(options, k, f"{where}: options") for k in LETTERS)
        idx = obj.get("answer_idx")
        if "answer_idx" not in obj:
            raise DataError(f"{where}: field 'answer_idx' missing (the letter of the answer: A, B, C or D)")
        if idx not in LETTERS:
            raise DataError(f"{where}: answer_idx {idx!r} is not one of the options A, B, C, D")
        if "answer" in obj and obj["answer"] != options[idx]:
            raise DataError(f"{where}: answer {obj['answer']!r} differs from option {idx} {options[idx]!r}")
        out.append(Question(task, str(n), q, LETTERS, LETTERS.index(idx), texts))
    return out


def _medmcqa(path: str, task: str) -> list[Question]:
    out = []
    for n, obj in _jsonl(path):
        where = f"{path}:{n}"
        q = _str(obj, "question", where)
        texts = tuple(_str(obj, k, where) for k in ("opa", "opb", "opc", "opd"))
        cop = obj.get("cop")
        if isinstance(cop, bool) or not isinstance(cop, int) or not 1 <= cop <= 4:
            hint = (" (the original release numbers options 1-4; the Hugging Face copy numbers them 0-3: "
                    "add 1, see docs/evaluate.md)" if cop == 0 else "")
            raise DataError(f"{where}: cop {cop!r} is not one of the options 1, 2, 3, 4{hint}")
        qid = obj.get("id", str(n))
        out.append(Question(task, str(qid), q, LETTERS, cop - 1, texts,
                            explanation=_one_line(_str(obj, "exp", where, optional=True))))
    return out


def _pubmedqa(path: str, task: str) -> list[Question]:
    out = []
    for n, pmid, obj in _json_object_members(path):
        where = f"{path}:{n} (PMID {pmid})"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
        q = _str(obj, "QUESTION", where)
        ctx = obj.get("CONTEXTS")
        if not isinstance(ctx, list) or not ctx or not all(isinstance(c, str) for c in ctx):
            raise DataError(f"{where}: field 'CONTEXTS' must be a non-empty list of strings")
        decision = obj.get("final_decision")
        if decision not in DECISIONS:
            raise DataError(f"{where}: final_decision {decision!r} is not one of yes, no, maybe")
        out.append(Question(task, pmid, q, DECISIONS, DECISIONS.index(decision), context=" ".join(ctx),
                            explanation=_one_line(_str(obj, "LONG_ANSWER", where, optional=True))))
    return out


def _mmlu(path: str, task: str) -> list[Question]:
    _need(path)
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        start = 1
        for i, row in enumerate(reader):
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != 6:
                raise DataError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            if row[5].strip() not in LETTERS:
                raise DataError(f"{where}: answer {row[5]!r} is not one of the options A, B, C, D")
            if not row[0].strip():
                raise DataError(f"{where}: empty question")
            out.append(Question(task, str(i), row[0], LETTERS, LETTERS.index(row[5].strip()), tuple(row[1:5])))
    return out


# name -> (folder, scored file, demonstration file, reader)
_SPECS = {
    "medqa_4options": ("medqa_4options", "phrases_no_exclude_test.jsonl", "phrases_no_exclude_train.jsonl", _medqa),
    "medmcqa": ("medmcqa", "dev.json", "train.json", _medmcqa),
    "pubmedqa": ("pubmedqa", "test_set.json", "train_set.json", _pubmedqa),
}
for _s in MMLU_MEDICAL:
    _SPECS[f"mmlu_{_s}"] = ("mmlu", f"test/{_s}_test.csv", f"dev/{_s}_dev.csv", _mmlu)
GROUPS = {"mmlu_medical": [f"mmlu_{s}" for s in MMLU_MEDICAL]}
TASKS = ("medqa_4options", "medmcqa", "pubmedqa", "mmlu_medical", *(f"mmlu_{s}" for s in MMLU_MEDICAL))


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks: empty list")
    for t in names:
        if t not in TASKS:
            raise ValueError(f"--tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks: {spec!r} names a task twice")
    return names


def load_task(name: str, data_dir: str, demonstrations: bool = True) -> TaskData:
    """The scored questions of task ``name`` under ``data_dir``, and its demonstration pools
    unless ``demonstrations`` is False (zero-shot runs need no training file)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    questions, pools, files = [], {}, []
    for sub in GROUPS.get(name, [name]):
        folder, test, train, read = _SPECS[sub]
        test, train = os.path.join(data_dir, folder, test), os.path.join(data_dir, folder, train)
        qs = read(test, sub)
        if not qs:
            raise DataError(f"{test}: no questions")
        questions += qs
        files.append(test)
        if demonstrations:
            pools[sub] = read(train, sub)
            if not pools[sub]:
                raise DataError(f"{train}: no questions (the demonstrations of a few-shot prompt)")
            files.append(train)
    return TaskData(name, questions, pools, files)
