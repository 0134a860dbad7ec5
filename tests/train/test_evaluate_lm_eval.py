"""The lm-evaluation-harness adapter against lm-eval's own Hugging Face backend, offline, on the
same exported tiny checkpoint and a tokenizer built here."""
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from eval_fixtures import tiny_model  # noqa: E402

from lm_eval.api.instance import Instance  # noqa: E402

from model import Llama  # noqa: E402
from train.evaluate.lm_eval_adapter import MeditronLM  # noqa: E402

TEXT = ("The patient presented with chest pain and shortness of breath. The answer is: A. "
        "Aspirin inhibits cyclooxygenase; heparin activates antithrombin. Does treatment reduce risk? yes no maybe. ")


def build_tokenizer(path):
    """A small BPE tokenizer.json with Llama-like specials, trained on TEXT, and the config files
    transformers needs to load it offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", '
                '"unk_token": "<unk>", "model_max_length": 96}')
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    n = build_tokenizer(path)
    tiny_model(vocab=n + 7, max_seq_len=96).save_hf(path)  # a vocab larger than the tokenizer's, as Llama pads it
    return str(path)


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LL_ARGS = [
    ("Question: chest pain?\nThe answer is:", " A"),
    ("Question: chest pain?\nThe answer is:", " B"),
    ("Question: chest pain?\nThe answer is: ", "heparin activates antithrombin"),  # trailing space moves
    ("", "Aspirin inhibits cyclooxygenase"),                                      # empty context: BOS only
    ("Does treatment reduce risk?", " maybe"),
    (TEXT * 3, " yes"),                                                           # longer than the context: cut left
]


def test_loglikelihoods_equal_lm_eval_hf_backend(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=checkpoint, device="cpu", dtype="float32", batch_size=3, max_length=96)
    ours = MeditronLM(checkpoint=checkpoint, device="cpu", dtype="float32", batch_tokens=200)
    ref = hf.loglikelihood(_requests("loglikelihood", LL_ARGS), disable_tqdm=True)
    got = ours.loglikelihood(_requests("loglikelihood", LL_ARGS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(got, ref):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (got, ref)
        assert ga == gb

    texts = [(TEXT,), (TEXT * 4,), ("short text",)]  # one, several and one short rolling window(s)
    ref = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (got, ref)


@pytest.mark.skipif(not hasattr(Llama, "generate"), reason="needs Llama.generate (KV-cache generation)")
def test_generate_until_equals_lm_eval_hf_backend_greedy(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=checkpoint, device="cpu", dtype="float32", batch_size=2, max_length=96)
    ours = MeditronLM(checkpoint=checkpoint, device="cpu", dtype="float32", batch_size=2)
    args = [("Question: chest pain?\nThe answer is:", {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}),
            ("Aspirin", {"until": ["."], "max_gen_toks": 8}),
            ("The patient presented with", {"until": ["\n\n"], "max_gen_toks": 10, "temperature": 0.0})]
    assert ours.generate_until(_requests("generate_until", args), disable_tqdm=True) == \
        hf.generate_until(_requests("generate_until", args), disable_tqdm=True)


def test_registered_under_meditron_and_bad_generation_args(checkpoint):
    from lm_eval.api.registry import get_model

    assert get_model("meditron") is MeditronLM
    lm = MeditronLM.create_from_arg_string(f"checkpoint={checkpoint},dtype=float32,batch_tokens=64", {"batch_size": 4})
    assert lm.batch_size == 4 and lm.batch_tokens == 64
    with pytest.raises(ValueError, match="top_k"):
        lm.generate_until(_requests("generate_until", [("x", {"until": ["\n"], "top_k": 5})]), disable_tqdm=True)
    with pytest.raises(ValueError, match="checkpoint"):
        MeditronLM()


def write_local_tasks(tmp_path, n=3):
    """docs/evaluate.md's recipe: YAML files that include lm-eval's own task definitions and only
    replace the data source with local JSON lines in the Hugging Face copies' schemas."""
    import json

    lm_tasks = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    records = {
        "pubmedqa": [{"QUESTION": f"Q{i}?", "CONTEXTS": ["c1", "c2"], "final_decision": ("yes", "no", "maybe")[i % 3],
                      "LONG_ANSWER": "", "LABELS": [], "MESHES": [], "YEAR": "2000"} for i in range(n)],
        "anatomy": [{"question": f"Q{i}?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": i % 4}
                    for i in range(n)],
    }
    (tmp_path / "tasks").mkdir()
    for name, yaml in (("pubmedqa", "pubmedqa/pubmedqa.yaml"), ("anatomy", "mmlu/default/mmlu_anatomy.yaml")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[name]))
        files = ", ".join(f"{s}: {path}" for s in ("train", "validation", "test", "dev"))
        (tmp_path / "tasks" / f"{name}_local.yaml").write_text(
            f"include: {lm_tasks}/{yaml}\ntask: {name}_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files: {{{files}}}\n")
    return str(tmp_path / "tasks")


def test_lm_eval_tasks_from_local_files(tmp_path, monkeypatch):
    """lm-eval's own tasks from local files, evaluated with model="meditron" by name."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    hf = tmp_path / "hf"
    tiny_model().save_hf(hf)
    tasks = write_local_tasks(tmp_path)
    import train.evaluate.lm_eval_adapter  # noqa: F401  (registers "meditron")

    res = lm_eval.simple_evaluate(model="meditron", model_args=f"checkpoint={hf},tokenizer=byte,dtype=float32",
                                  tasks=["pubmedqa_local", "anatomy_local"], num_fewshot=1,
                                  task_manager=TaskManager(include_path=tasks, include_defaults=False))
    assert res["config"]["model"] == "meditron"
    for name in ("pubmedqa_local", "anatomy_local"):
        assert 0 <= res["results"][name]["acc,none"] <= 1
    assert res["n-samples"]["anatomy_local"]["effective"] == 3


@pytest.mark.distributed
def test_adapter_under_torchrun_equals_one_process(tmp_path):
    """lm-eval shares the documents among 2 processes (gloo); the results equal one process's."""
    import json
    import subprocess
    import sys

    hf = tmp_path / "hf"
    tiny_model().save_hf(hf)
    tasks = write_local_tasks(tmp_path, n=5)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "tests", "train", "lm_eval_runs.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for cmd, out in (([sys.executable], "one.json"),
                     ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"], "two.json")):
        proc = subprocess.run([*cmd, script, str(hf), tasks, str(tmp_path / out)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.load(open(tmp_path / f)) for f in ("one.json", "two.json"))
    assert len(one["samples"]) == 5 and one == two
    assert os.path.exists(tmp_path / "two.json.rank1")  # rank 1 ran as rank 1 of 2, not as a second copy
