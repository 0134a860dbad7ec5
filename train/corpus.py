"""The bundled corpus: a deterministic generator of small medical-style text collections.

It stands in for Meditron's GAP-Replay mixture (clinical guidelines, PubMed abstracts, full
papers and general-domain replay) so that ``python -m train`` runs offline with no data.
Every document comes from templates filled by a seeded random generator: the same seed gives
byte-identical text on every machine. The text is synthetic and carries no medical advice.

    python -m train.corpus --out DIR     # writes DIR/<name>.jsonl, one {"text": ...} per line
"""
from __future__ import annotations

import argparse
import json
import os
import random

CONDITIONS = [
    ("type 2 diabetes", "metformin", 500, "mg", "twice daily", "HbA1c"),
    ("hypertension", "amlodipine", 5, "mg", "once daily", "blood pressure"),
    ("community-acquired pneumonia", "amoxicillin", 1000, "mg", "three times daily", "temperature"),
    ("atrial fibrillation", "apixaban", 5, "mg", "twice daily", "heart rate"),
    ("asthma", "budesonide", 200, "micrograms", "twice daily", "peak flow"),
    ("heart failure", "bisoprolol", 2.5, "mg", "once daily", "ejection fraction"),
    ("major depressive disorder", "sertraline", 50, "mg", "once daily", "PHQ-9 score"),
    ("hypothyroidism", "levothyroxine", 50, "micrograms", "once daily", "TSH"),
    ("gout", "allopurinol", 100, "mg", "once daily", "serum urate"),
    ("malaria", "artemether-lumefantrine", 80, "mg", "twice daily", "parasitaemia"),
    ("tuberculosis", "isoniazid", 300, "mg", "once daily", "sputum culture"),
    ("migraine", "sumatriptan", 50, "mg", "at onset", "headache days"),
    ("osteoporosis", "alendronate", 70, "mg", "once weekly", "bone density"),
    ("chronic kidney disease", "dapagliflozin", 10, "mg", "once daily", "eGFR"),
    ("iron deficiency anaemia", "ferrous sulfate", 200, "mg", "once daily", "haemoglobin"),
    ("hyperlipidaemia", "atorvastatin", 20, "mg", "once daily", "LDL cholesterol"),
]
POPULATIONS = ["adults", "older adults", "children over 12 years", "pregnant women", "patients with renal impairment",
               "outpatients", "hospitalised patients", "people living in low-resource settings"]
GRADES = ["strong recommendation, high-quality evidence", "strong recommendation, moderate-quality evidence",
          "conditional recommendation, low-quality evidence", "good practice point"]
DESIGNS = ["randomised controlled trial", "prospective cohort study", "retrospective cohort study",
           "systematic review and meta-analysis", "cross-sectional study", "case-control study"]
COUNTRIES = ["Switzerland", "Kenya", "India", "Brazil", "Canada", "Vietnam", "Nigeria", "Peru", "Norway", "Ghana"]
TOPICS = [
    ("river", "carries water from high ground to the sea", "shapes the valleys it passes through"),
    ("library", "keeps books and records for a community", "lends them to anyone who asks"),
    ("bridge", "joins two banks of a river", "must carry its own weight and the traffic"),
    ("forest", "covers a large area with trees", "stores carbon and shelters animals"),
    ("printing press", "made copies of text cheaply", "spread new ideas across Europe"),
    ("volcano", "is an opening in the crust of a planet", "releases lava, ash and gases"),
    ("orchestra", "is a large group of musicians", "is led by a conductor"),
    ("lighthouse", "warns ships away from danger", "shows a light that can be seen from far away"),
]


def _dose(r: random.Random, base) -> str:
    v = base * r.choice([0.5, 1, 1, 1, 2])
    return f"{v:g}"


def guideline(r: random.Random) -> str:
    cond, drug, dose, unit, freq, marker = r.choice(CONDITIONS)
    pop = r.choice(POPULATIONS)
    lines = [f"Recommendation {r.randint(1, 40)}: management of {cond} in {pop}."]
    lines.append(f"In {pop} with {cond}, {drug} {_dose(r, dose)} {unit} {freq} is recommended as first-line "
                 f"treatment ({r.choice(GRADES)}).")
    lines.append(f"Measure {marker} before starting treatment and again after {r.choice([2, 4, 6, 12])} weeks.")
    if r.random() < 0.6:
        lines.append(f"If {marker} does not improve, review adherence before changing the dose of {drug}.")
    if r.random() < 0.5:
        lines.append(f"Do not start {drug} in {r.choice(POPULATIONS)} without specialist advice.")
    lines.append(f"Refer to a specialist if {cond} is severe or the diagnosis is uncertain.")
    return " ".join(lines)


def abstract(r: random.Random) -> str:
    cond, drug, dose, unit, freq, marker = r.choice(CONDITIONS)
    n = r.randint(40, 4000)
    design = r.choice(DESIGNS)
    country = r.choice(COUNTRIES)
    effect = r.choice(["reduced", "did not change", "modestly improved", "significantly improved"])
    p = r.choice(["0.001", "0.01", "0.04", "0.21", "0.63"])
    return (f"Background: {cond} is common in {country} and its management varies. "
            f"Methods: we conducted a {design} of {n} {r.choice(POPULATIONS)} treated with {drug} "
            f"{_dose(r, dose)} {unit} {freq}. The primary outcome was change in {marker} at "
            f"{r.choice([3, 6, 12, 24])} months. "
            f"Results: {drug} {effect} {marker} compared with usual care (p = {p}). "
            f"Adverse events occurred in {r.randint(1, 30)}% of participants. "
            f"Conclusions: these findings {r.choice(['support', 'do not support', 'partly support'])} "
            f"the use of {drug} for {cond}.")


def paper(r: random.Random) -> str:
    cond, drug, dose, unit, freq, marker = r.choice(CONDITIONS)
    age = r.randint(18, 90)
    sex = r.choice(["man", "woman"])
    parts = [f"Case presentation. A {age}-year-old {sex} presented with a history of {cond}.",
             f"On examination the {marker} was abnormal and further tests were ordered.",
             f"Treatment with {drug} {_dose(r, dose)} {unit} {freq} was started.",
             f"After {r.randint(2, 20)} days the {marker} had {r.choice(['improved', 'returned to normal', 'not changed'])}.",
             f"Discussion. This case shows that {cond} can present in {r.choice(POPULATIONS)}.",
             f"Clinicians should consider {drug} early and monitor {marker} closely."]
    return " ".join(parts)


def replay(r: random.Random) -> str:
    name, what, why = r.choice(TOPICS)
    return (f"A {name} {what}. Over many years the {name} {why}. "
            f"People in {r.choice(COUNTRIES)} have written about the {name} for centuries, "
            f"and visitors still come to see a famous {name} every {r.choice(['spring', 'summer', 'autumn', 'winter'])}.")


GENERATORS = {"guidelines": guideline, "abstracts": abstract, "papers": paper, "replay": replay}
# Document counts per collection: about 0.8 MB of text in all.
SIZES = {"guidelines": 550, "abstracts": 450, "papers": 550, "replay": 400}


def documents(name: str, seed: int = 0, n: int | None = None) -> list[str]:
    """The documents of one bundled collection, identical for a given (name, seed)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown bundled collection {name!r}; choose one of {sorted(GENERATORS)}")
    r = random.Random(f"{name}:{seed}")
    return [GENERATORS[name](r) for _ in range(SIZES[name] if n is None else n)]


def write_jsonl(out_dir: str, seed: int = 0) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in GENERATORS:
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w") as f:
            for doc in documents(name, seed):
                f.write(json.dumps({"text": doc}) + "\n")
        paths.append(path)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the .jsonl files")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in write_jsonl(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
