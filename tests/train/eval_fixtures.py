"""Small benchmark files in each public release's schema, written for the tests (made-up questions),
and a tiny model to score them."""
import csv
import json
import os

import torch

SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
            "professional_medicine")
_ORGANS = ["heart", "liver", "kidney", "lung", "spleen", "pancreas", "stomach", "thyroid", "brain", "skin"]
_DRUGS = ["aspirin", "insulin", "heparin", "morphine", "penicillin", "warfarin", "digoxin", "atropine"]


def _options(i):
    return [_ORGANS[(i + j) % len(_ORGANS)] for j in range(4)]


def medqa_record(i):
    opts = dict(zip("ABCD", _options(i)))
    idx = "ABCD"[i % 4]
    return {"question": f"A {30 + i}-year-old patient has pain in one organ, case {i}. Which organ is it?",
            "answer": opts[idx], "options": opts, "meta_info": "step1", "answer_idx": idx,
            "metamap_phrases": ["patient", "pain"]}


def medmcqa_record(i, explain=True):
    a, b, c, d = (_DRUGS[(i + j) % len(_DRUGS)] for j in range(4))
    return {"question": f"Drug of choice in made-up condition number {i} is", "exp": f"Because of reason {i}." if explain else None,
            "cop": i % 4 + 1, "opa": a, "opb": b, "opc": c, "opd": d, "subject_name": "Pharmacology",
            "topic_name": None, "id": f"id-{i:04d}", "choice_type": "single"}


def pubmedqa_record(i):
    return {"QUESTION": f"Does treatment {i} reduce the risk of condition {i % 3}?",
            "CONTEXTS": [f"Background sentence {i}.", f"Results sentence {i}."], "LABELS": ["BACKGROUND", "RESULTS"],
            "MESHES": ["Humans"], "YEAR": "2001", "reasoning_required_pred": "yes", "reasoning_free_pred": "yes",
            "final_decision": ("yes", "no", "maybe")[i % 3], "LONG_ANSWER": f"The trial number {i} says so."}


def mmlu_row(subject, i):
    return [f"In {subject}, which organ is linked to fact {i}?", *_options(i), "ABCD"[(i + 1) % 4]]


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_data(root, n_test=6, n_train=6):
    """Every task's files under root; returns root."""
    root = str(root)
    write_jsonl(f"{root}/medqa_4options/phrases_no_exclude_test.jsonl", [medqa_record(i) for i in range(n_test)])
    write_jsonl(f"{root}/medqa_4options/phrases_no_exclude_train.jsonl", [medqa_record(100 + i) for i in range(n_train)])
    write_jsonl(f"{root}/medmcqa/dev.json", [medmcqa_record(i) for i in range(n_test)])
    write_jsonl(f"{root}/medmcqa/train.json", [medmcqa_record(100 + i, explain=i % 2 == 0) for i in range(n_train)])
    os.makedirs(f"{root}/pubmedqa", exist_ok=True)
    for name, base, n in (("test_set.json", 0, n_test), ("train_set.json", 100, n_train)):
        with open(f"{root}/pubmedqa/{name}", "w") as f:
            json.dump({str(20000000 + base + i): pubmedqa_record(base + i) for i in range(n)}, f, indent=1)
    for split, n in (("test", 3), ("dev", 5)):
        os.makedirs(f"{root}/mmlu/{split}", exist_ok=True)
        for s in SUBJECTS:
            with open(f"{root}/mmlu/{split}/{s}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(mmlu_row(s, i + (0 if split == "test" else 50)) for i in range(n))
    return root


def tiny_model(vocab=258, seed=0, max_seq_len=2048):
    from model import Llama, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=128, max_seq_len=max_seq_len)
    return Llama(cfg).eval()
