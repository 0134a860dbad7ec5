"""python -m train.evaluate: loaders on small files in each benchmark's schema, prompts, both
scoring methods on a tiny model, answer extraction and majority vote, bad input, and torchrun
sharding equal to one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from eval_fixtures import medmcqa_record, medqa_record, tiny_model, write_data, write_jsonl

from model import Llama
from train.evaluate import prompts as P
from train.evaluate.__main__ import main
from train.evaluate.runner import Settings, score_task
from train.evaluate.scoring import extract_answer, last_logprobs, loglikelihood_tokens, majority_vote
from train.evaluate.tasks import DataError, load_task, parse_tasks
from model.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_GENERATE = hasattr(Llama, "generate")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), n_test=4, n_train=5)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_model().save_hf(path)
    return str(path)


# ----------------------------------------------------------------------------------- loaders
def test_loaders_read_each_public_schema(data):
    medqa = load_task("medqa_4options", data)
    q = medqa.questions[1]
    assert (len(medqa.questions), len(medqa.pools["medqa_4options"])) == (4, 5)
    assert q.labels == ("A", "B", "C", "D") and q.gold == medqa_record(1)["answer_idx"]
    assert q.options[q.answer] == medqa_record(1)["answer"]

    mc = load_task("medmcqa", data).questions
    assert [x.gold for x in mc] == ["ABCD"[medmcqa_record(i)["cop"] - 1] for i in range(4)]  # cop counts from 1
    assert mc[0].id == "id-0000" and mc[0].explanation == "Because of reason 0."

    pq = load_task("pubmedqa", data).questions
    assert [x.gold for x in pq] == ["yes", "no", "maybe", "yes"] and pq[0].id == "20000000"
    assert pq[0].context == "Background sentence 0. Results sentence 0." and not pq[0].options

    mmlu = load_task("mmlu_medical", data)
    assert len(mmlu.questions) == 18 and sorted(mmlu.pools) == sorted(f"mmlu_{s}" for s in (
        "anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
        "professional_medicine"))
    assert load_task("mmlu_anatomy", data).questions[0].gold == "B"
    # zero-shot runs need no training files
    assert load_task("pubmedqa", data, demonstrations=False).pools == {}


def _edit_line(path, n, fn):
    lines = open(path).read().splitlines()
    lines[n - 1] = fn(lines[n - 1])
    open(path, "w").write("\n".join(lines) + "\n")


@pytest.mark.parametrize("case", ["medqa_key", "medmcqa_key", "medmcqa_zero", "pubmedqa_key", "mmlu_key",
                                  "bad_json", "missing_field", "mmlu_columns"])
def test_malformed_files_name_file_and_line(tmp_path, case):
    root = write_data(tmp_path)
    task, path, line, match = {
        "medqa_key": ("medqa_4options", "medqa_4options/phrases_no_exclude_test.jsonl", 3, "answer_idx 'E'"),
        "medmcqa_key": ("medmcqa", "medmcqa/dev.json", 2, "cop 5 is not one of the options"),
        "medmcqa_zero": ("medmcqa", "medmcqa/train.json", 4, "add 1"),
        "pubmedqa_key": ("pubmedqa", "pubmedqa/test_set.json", None, "final_decision 'perhaps'"),
        "mmlu_key": ("mmlu_medical", "mmlu/test/college_medicine_test.csv", 2, "answer 'E'"),
        "bad_json": ("medmcqa", "medmcqa/dev.json", 3, "not valid JSON"),
        "missing_field": ("medmcqa", "medmcqa/dev.json", 1, "'opc'"),
        "mmlu_columns": ("mmlu_anatomy", "mmlu/dev/anatomy_dev.csv", 4, "6 columns"),
    }[case]
    full = os.path.join(root, path)
    if case == "medqa_key":
        _edit_line(full, line, lambda s: s.replace('"answer_idx": "C"', '"answer_idx": "E"'))
    elif case == "medmcqa_key":
        _edit_line(full, line, lambda s: s.replace('"cop": 2', '"cop": 5'))
    elif case == "medmcqa_zero":
        _edit_line(full, line, lambda s: s.replace('"cop": 4', '"cop": 0'))
    elif case == "pubmedqa_key":
        text = open(full).read()
        i = text.index('"final_decision": "no"')
        line = text.count("\n", 0, text.index('"20000001"')) + 1  # the record's own line
        open(full, "w").write(text[:i] + '"final_decision": "perhaps"' + text[i + 22:])
    elif case == "mmlu_key":
        _edit_line(full, line, lambda s: s[:-1] + "E")
    elif case == "bad_json":
        _edit_line(full, line, lambda s: s[:-5])
    elif case == "missing_field":
        _edit_line(full, line, lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "opc"}))
    elif case == "mmlu_columns":
        _edit_line(full, line, lambda s: s + ",extra")
    with pytest.raises(DataError, match=match) as e:
        load_task(task, root)
    assert f"{full}:{line}" in str(e.value)


def test_wrong_shapes_say_what_they_are(tmp_path):
    root = write_data(tmp_path)
    medqa = os.path.join(root, "medqa_4options", "phrases_no_exclude_test.jsonl")
    _edit_line(medqa, 2, lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "answer_idx"}))
    with pytest.raises(DataError, match=f"{medqa}:2: field 'answer_idx' missing"):
        load_task("medqa_4options", root)

    pubmedqa = os.path.join(root, "pubmedqa", "test_set.json")
    records = list(json.load(open(pubmedqa)).values())
    json.dump(records, open(pubmedqa, "w"))  # valid JSON, but a list instead of {PMID: record}
    with pytest.raises(DataError, match="valid JSON, but one JSON array; expected one JSON object") as e:
        load_task("pubmedqa", root)
    assert "not valid JSON" not in str(e.value)

    medmcqa = os.path.join(root, "medmcqa", "dev.json")
    records = [json.loads(line) for line in open(medmcqa)]
    json.dump(records, open(medmcqa, "w"), indent=1)  # one JSON array, not JSON lines
    with pytest.raises(DataError, match="valid JSON, but one JSON array rather than JSON lines"):
        load_task("medmcqa", root)


def test_empty_demonstration_file_is_named(tmp_path):
    root = write_data(tmp_path)
    train = os.path.join(root, "medmcqa", "train.json")
    open(train, "w").close()
    with pytest.raises(DataError, match=f"{train}: no questions"):
        load_task("medmcqa", root)
    assert load_task("medmcqa", root, demonstrations=False).questions  # zero-shot does not read it


def test_missing_file_and_unknown_task(tmp_path, data):
    with pytest.raises(DataError, match="medmcqa/dev.json: file not found"):
        load_task("medmcqa", str(tmp_path))
    with pytest.raises(ValueError, match="unknown task 'medqa'"):
        parse_tasks("medmcqa,medqa")


# ----------------------------------------------------------------------------------- prompts
def test_prompts_demonstrations_and_seeds(data):
    d = load_task("medmcqa", data)
    q, pool = d.questions[0], d.pools["medmcqa"]
    demos = P.choose_demonstrations(pool, 3, seed=1234)
    assert demos == P.choose_demonstrations(pool, 3, seed=1234)
    assert any(P.choose_demonstrations(pool, 3, seed=s) != demos for s in (432, 32))
    text = P.build_prompt(q, demos)
    blocks = text.split("\n\n")
    assert len(blocks) == 4 and all(b.endswith(f"The answer is: {x.gold}") for b, x in zip(blocks, demos))
    assert blocks[-1] == ("Question: Drug of choice in made-up condition number 0 is\nOptions:\nA. aspirin\n"
                          "B. insulin\nC. heparin\nD. morphine\nThe answer is:")
    cot = P.choose_demonstrations(pool, 3, seed=1, chain_of_thought=True)  # only those with an explanation
    assert all(x.explanation for x in cot)
    assert P.build_prompt(q, cot, chain_of_thought=True).endswith("Explanation:")
    with pytest.raises(ValueError, match="--shots 4 is larger than the 3 demonstrations with an explanation"):
        P.choose_demonstrations(pool, 4, seed=1, chain_of_thought=True)
    pq = load_task("pubmedqa", data).questions[0]
    assert P.build_prompt(pq, []).startswith("Context: Background") and P.continuations(pq) == [" yes", " no", " maybe"]


# ----------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text, want", [
    ("The answer is: B", "B"), ("the answer is (c).", "C"), ("The answer is (B)", "B"), ("answer is d", "D"),
    (" B\nQuestion: next", "B"), ("(A).", "A"), ("c", "C"),
    ("Because X. The answer is: A. Hmm, no: the answer is: D", "D"),   # the last conclusion counts
    ("The answer is: heparin", "C"),                                   # an option's text
    ("A 45-year-old man", None), ("I do not know", None), ("The answer is: E", None), ("", None),
])
def test_extract_answer_letters(text, want):
    assert extract_answer(text, ("A", "B", "C", "D"), ("aspirin", "insulin", "heparin", "morphine")) == want


@pytest.mark.parametrize("text, want", [(" yes", "yes"), ("The answer is: Maybe", "maybe"), ("NO.", "no"),
                                        ("The answer is no, because", "no"), ("Yesterday", None), ("nothing", None)])
def test_extract_answer_decisions(text, want):
    assert extract_answer(text, ("yes", "no", "maybe")) == want


@pytest.mark.parametrize("answers, want", [(["A", "B", "B"], "B"), (["B", "A", "A", "B"], "B"), ([None, "C", None], "C"),
                                           ([None, None], None), ([], None), (["A", None, "D", "D", "A", None], "A")])
def test_majority_vote(answers, want):
    assert majority_vote(answers) == want


# ----------------------------------------------------------------------------------- log-likelihood
def test_packed_loglikelihoods_equal_one_sequence_at_a_time():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 258, (n,), generator=g).tolist()  # noqa: E731
    ctx_a, ctx_b = rand(37), rand(61)
    requests = [(ctx_a, [7]), (ctx_a, [9]), (ctx_a, [7, 3, 5]), (ctx_b, rand(4)), (ctx_b[:20], [11])]
    calls = []
    orig = model.hidden_states
    model.hidden_states = lambda *a, **k: calls.append(a[0].shape) or orig(*a, **k)
    got = loglikelihood_tokens(model, requests)
    # one forward; the two one-token options of ctx_a share their sequence
    assert len(calls) == 1 and calls[0] == (1, 37 + 39 + 64 + 20)
    model.hidden_states = orig
    with torch.no_grad():
        for (ctx, cont), (lp, greedy) in zip(requests, got):
            full = torch.tensor([ctx + cont])
            logp = model(full)[0, :-1].float().log_softmax(-1)[-len(cont):]
            want = logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
            assert abs(lp - want) <= 1e-5 * abs(want)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    # a continuation that is the greedy one
    with torch.no_grad():
        best = int(model(torch.tensor([ctx_b]))[0, -1].argmax())
    assert loglikelihood_tokens(model, [(ctx_b, [best])])[0][1] is True
    with pytest.raises(ValueError, match="max_seq_len"):
        last_logprobs(model, [[1] * 3000], [1])


def test_loglikelihood_scoring_batches_several_questions_per_forward(data):
    model, tok = tiny_model(), ByteTokenizer()
    d = load_task("medqa_4options", data)
    calls = []
    orig = model.hidden_states
    model.hidden_states = lambda *a, **k: calls.append(1) or orig(*a, **k)
    summary, rows = score_task(model, tok, d, Settings(shots=2, seeds=(1, 2)), progress=False)
    assert len(calls) == 2  # one forward per seed for the 4 questions and their 16 options
    assert summary["n_questions"] == 4 and len(rows) == 8 and summary["method"] == "loglikelihood"
    for r in rows:
        lls = r["loglikelihoods"]
        assert r["prediction"] == max(lls, key=lls.get) and r["correct"] == (r["prediction"] == r["gold"])
    # the scores are the model's: recompute one question alone, unpacked
    q = d.questions[2]
    text = P.build_prompt(q, P.choose_demonstrations(d.pools[q.task], 2, seed=2))
    with torch.no_grad():
        ids = [tok.bos_id] + tok.encode(text + " ")  # " A" is two bytes: the space, then the letter
        logp = model(torch.tensor([ids]))[0, -2:].log_softmax(-1)
    row = next(r for r in rows if r["seed"] == 2 and r["id"] == f"medqa_4options/{q.id}")
    for label in "ABCD":
        want = (logp[0, ord(" ")] + logp[1, ord(label)]).item()
        assert abs(row["loglikelihoods"][label] - want) <= 1e-5 * abs(want)


# ----------------------------------------------------------------------------------- generation
class ScriptedModel(torch.nn.Module):
    """A model whose generate returns fixed texts: the generation path without the KV cache."""

    def __init__(self, texts, tok):
        super().__init__()
        self.cfg = tiny_model().cfg
        self.texts, self.tok, self.calls = texts, tok, []

    def generate(self, prompts, max_new_tokens, temperature, top_p, stop_ids, seed):
        self.calls.append(dict(n=len(prompts), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
        return [self.tok.encode(self.texts[i % len(self.texts)]) + [self.tok.eos_id] for i in range(len(prompts))]


def test_generation_scoring_extracts_and_votes(data):
    tok = ByteTokenizer()
    d = load_task("pubmedqa", data)  # gold: yes, no, maybe, yes
    model = ScriptedModel([" no, since X.\n\nContext: next", "The answer is: yes", "The answer is: no"], tok)
    s = Settings(shots=1, seeds=(5,), method="generate", samples=3, chain_of_thought=True, temperature=0.8,
                 batch_sequences=6)
    summary, rows = score_task(model, tok, d, s, progress=False)
    assert [r["answers"] for r in rows] == [["no", "yes", "no"]] * 4 and [r["prediction"] for r in rows] == ["no"] * 4
    assert rows[0]["generations"][0] == " no, since X."  # cut at the blank line
    assert summary["accuracy"] == 0.25 and summary["chain_of_thought"] is True  # PubMedQA has explanations
    assert "majority of 3 samples, temperature 0.8" in summary["method"]
    # 2 questions x 3 samples per call, 256 new tokens with chain of thought, a seed per batch
    assert [c["n"] for c in model.calls] == [6, 6] and model.calls[0]["max_new_tokens"] == 256
    assert model.calls[0]["seed"] != model.calls[1]["seed"]

    greedy = ScriptedModel(["no answer here"], tok)
    summary, rows = score_task(greedy, tok, d, Settings(method="generate"), progress=False)
    assert summary["no_answer"] == 4 and summary["accuracy"] == 0 and greedy.calls[0]["temperature"] == 0


@pytest.mark.skipif(not HAS_GENERATE, reason="needs Llama.generate (KV-cache generation)")
def test_greedy_generation_scoring_equals_recomputed_greedy_decoding(data):
    model, tok = tiny_model(), ByteTokenizer()
    d = load_task("medmcqa", data)
    _, rows = score_task(model, tok, d, Settings(shots=1, method="generate", max_new_tokens=6), progress=False)
    demos = P.choose_demonstrations(d.pools["medmcqa"], 1, seed=1234)
    for q, r in zip(d.questions, rows):
        ids = [tok.bos_id] + tok.encode(P.build_prompt(q, demos))
        out = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
        text = tok.decode(out).split("\n\n")[0]
        assert r["generations"] == [text] and r["prediction"] == extract_answer(text, q.labels, q.options)


# ----------------------------------------------------------------------------------- command line
def test_cli_hf_checkpoint_writes_results_predictions_and_table(data, hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--checkpoint", hf_dir, "--tokenizer", "byte", "--tasks", "pubmedqa,mmlu_medical",
                 "--data-dir", data, "--shots", "1", "--seeds", "1234,432", "--out", str(out), "--no-progress"]) == 0
    res = json.load(open(out / "results.json"))
    for name, n in (("pubmedqa", 4), ("mmlu_medical", 18)):
        r = res["tasks"][name]
        assert r["n_questions"] == n and r["shots"] == 1 and r["seeds"] == [1234, 432]
        assert r["method"] == "loglikelihood" and 0 <= r["accuracy"] <= 1 and r["stderr"] >= 0
        assert r["questions_per_s"] > 0
    assert len(res["tasks"]["mmlu_medical"]["subtasks"]) == 6
    rows = [json.loads(x) for x in open(out / "predictions.jsonl")]
    assert len(rows) == 2 * (4 + 18)
    assert {"id", "prediction", "gold", "correct", "seed"} <= set(rows[0])
    pq = [r for r in rows if r["task"] == "pubmedqa"]
    assert abs(res["tasks"]["pubmedqa"]["accuracy"] - sum(r["correct"] for r in pq) / len(pq)) < 1e-12
    table = capsys.readouterr().out
    assert "mmlu_medical" in table and "mmlu_anatomy" in table and "±" in table


def test_table_columns_align_for_every_method():
    from train.evaluate.__main__ import table

    def res(method, subtasks=None):
        r = dict(method=method, shots=3, n_questions=1273, accuracy=0.5, stderr=0.01)
        if subtasks:
            r["subtasks"] = {s: dict(n_questions=7, accuracy=0.25, stderr=0.1) for s in subtasks}
        return r

    lines = table({"medqa_4options": res("loglikelihood"),
                   "pubmedqa": res("self-consistency (majority of 5 samples, temperature 0.8)"),
                   "mmlu_medical": res("generation (greedy)", ["mmlu_professional_medicine_with_a_long_name"])
                   }).splitlines()
    body = [x for x in lines if "±" in x]
    assert len(body) == 4 and "self-consistency" in lines[3]
    for col in ("±", "."):  # the accuracy column, and its decimal point
        assert len({x.index(col) for x in body}) == 1, "\n".join(lines)
    assert len({x.rindex(" ", 0, x.index("±") - 8) for x in body}) == 1  # the n column ends in one place
    assert lines[0].index("accuracy") == body[0].index("±") - 7


def test_cli_training_run_uses_its_tokenizer(data, tmp_path, capsys):
    from train.config import Config
    from train.trainer import run

    cfg = Config()
    cfg.out_dir = str(tmp_path / "run")
    cfg.training.steps, cfg.training.micro_batch, cfg.training.global_batch, cfg.training.seq_len = 1, 1, 1, 32
    cfg.eval.interval = 0
    run(cfg, progress=False)
    assert main(["--checkpoint", cfg.out_dir, "--tasks", "mmlu_anatomy", "--data-dir", data,
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert res["model"]["tokenizer"] == "byte" and res["model"]["checkpoint"].endswith("step_00000001")
    assert res["tasks"]["mmlu_anatomy"]["n_questions"] == 3


def test_cli_exported_hf_dir_brings_its_tokenizer(data, tmp_path):
    from train.config import Config
    from train.export import main as export_main
    from train.trainer import run

    cfg = Config()
    cfg.out_dir = str(tmp_path / "run")
    cfg.training.steps, cfg.training.micro_batch, cfg.training.global_batch, cfg.training.seq_len = 1, 1, 1, 32
    cfg.eval.interval = 0
    run(cfg, progress=False)
    assert export_main(["--checkpoint", cfg.out_dir, "--out", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    for ckpt, out in ((cfg.out_dir, "a"), (str(tmp_path / "hf"), "b")):
        assert main(["--checkpoint", ckpt, "--tasks", "mmlu_anatomy", "--data-dir", data, "--shots", "2",
                     "--out", str(tmp_path / out), "--no-progress"]) == 0
    a, b = ([json.loads(x) for x in open(tmp_path / d / "predictions.jsonl")] for d in "ab")
    for x, y in zip(a, b):  # the same model and tokenizer either way
        assert x["prediction"] == y["prediction"]
        assert all(abs(x["loglikelihoods"][k] - y["loglikelihoods"][k]) <= 1e-4 for k in "ABCD")


@pytest.mark.parametrize("args, message", [
    (["--tasks", "medqa"], "unknown task 'medqa'"),
    (["--tasks", "medmcqa", "--shots", "6"], "--shots 6 is larger than the 5 demonstrations in medmcqa/medmcqa"),
    (["--tasks", "mmlu_medical", "--shots", "6"], "larger than the 5 demonstrations in mmlu_medical/mmlu_anatomy"),
    (["--tasks", "pubmedqa", "--data-dir", "/nonexistent"], "--data-dir '/nonexistent': no such directory"),
    (["--tasks", "pubmedqa", "--sc-cot", "5", "--temperature", "0"], "identical greedy answers"),
    (["--tasks", "pubmedqa", "--checkpoint", "/nonexistent"], "no such directory"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message, data, hf_dir, tmp_path, capsys):
    base = {"--checkpoint": hf_dir, "--tokenizer": "byte", "--data-dir": data, "--out": str(tmp_path)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    assert main([x for kv in base.items() for x in kv] + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cli_missing_file_exits_2(tmp_path, hf_dir, capsys):
    root = write_data(tmp_path / "d")
    os.remove(os.path.join(root, "mmlu", "test", "medical_genetics_test.csv"))
    assert main(["--checkpoint", hf_dir, "--tokenizer", "byte", "--tasks", "mmlu_medical", "--data-dir", root,
                 "--out", str(tmp_path / "o")]) == 2
    assert "medical_genetics_test.csv: file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- torchrun
@pytest.mark.distributed
@pytest.mark.parametrize("method", [
    [],
    pytest.param(["--sc-cot", "3", "--max-new-tokens", "4"],
                 marks=pytest.mark.skipif(not HAS_GENERATE, reason="needs Llama.generate (KV-cache generation)")),
], ids=["loglikelihood", "sc-cot"])
def test_torchrun_sharding_equals_one_process(method, tmp_path, hf_dir):
    data = write_data(tmp_path / "data", n_test=4, n_train=5)
    write_jsonl(os.path.join(data, "medmcqa", "dev.json"), [medmcqa_record(i) for i in range(7)])  # uneven shares
    common = ["-m", "train.evaluate", "--checkpoint", hf_dir, "--tokenizer", "byte", "--tasks", "medmcqa,pubmedqa",
              "--data-dir", data, "--shots", "1", "--seeds", "3,4", "--batch-tokens", "600",
              "--batch-sequences", "6", "--no-progress", *method]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same CPU kernels in both runs
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert open(tmp_path / "one" / "predictions.jsonl").read() == open(tmp_path / "two" / "predictions.jsonl").read()
    r1, r2 = (json.load(open(tmp_path / d / "results.json")) for d in ("one", "two"))
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    for r in (r1, r2):
        for t in r["tasks"].values():
            t.pop("seconds"), t.pop("questions_per_s")
    assert r1["tasks"] == r2["tasks"] and r1["tasks"]["medmcqa"]["n_questions"] == 7
