"""Export of a training run with its tokenizer, save/load of tokenizers, and python -m model.generate."""
import json
import os
import subprocess
import sys

import pytest
import torch

from model.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer, save_tokenizer

from tests.helpers import build_tokenizer_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = "Metformin 500 mg twice daily.\nHéllo wörld 😀 two  spaces\ttab "


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    text = [f"patient {i} takes {i % 7} tablets of drug {chr(97 + i % 26)} daily" for i in range(300)]
    return build_tokenizer_files(tmp_path_factory.mktemp("tok"), text, sp_vocab=300, bpe_vocab=300)


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "hf"])
def test_saved_tokenizer_loads_back_the_same(kind, tokenizer_files, tmp_path):
    tok = load_tokenizer("byte" if kind == "byte" else tokenizer_files[kind])
    written = save_tokenizer(tok, str(tmp_path))
    assert "tokenizer_config.json" in written
    again = load_tokenizer(str(tmp_path))
    assert type(again) is type(tok)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert again.decode(tok.encode(SAMPLE)) == tok.decode(tok.encode(SAMPLE))


def test_byte_tokenizer_json_is_the_byte_tokenizer_for_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(ByteTokenizer(), str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (256, 257, 258)
    ids = ByteTokenizer().encode(SAMPLE)
    assert hf(SAMPLE, add_special_tokens=False)["input_ids"] == ids
    assert hf.decode(ids + [257], skip_special_tokens=True) == SAMPLE
    # and through our HF path (the tokenizer.json alone)
    assert HFTokenizer(str(tmp_path / "tokenizer.json")).encode(SAMPLE) == ids


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "hf"])
def test_saved_tokenizer_in_transformers_adds_bos_as_training_does(kind, tokenizer_files, tmp_path):
    # training feeds BOS + encode(text): transformers' default call must give the same ids
    transformers = pytest.importorskip("transformers")
    if kind == "sentencepiece":
        pytest.importorskip("google.protobuf", reason="transformers reads a sentencepiece model through protobuf")
    tok = load_tokenizer("byte" if kind == "byte" else tokenizer_files[kind])
    save_tokenizer(tok, str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in (SAMPLE, "The patient", " leading space"):
        assert hf(text)["input_ids"] == [tok.bos_id] + tok.encode(text), text
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == tok.decode(tok.encode(text))
    assert load_tokenizer(str(tmp_path)).encode(SAMPLE) == tok.encode(SAMPLE)  # and ours reads it back the same


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from train.config import Config
    from train.trainer import run

    cfg = Config()
    cfg.out_dir = str(tmp_path_factory.mktemp("run"))
    cfg.training.steps = 1
    cfg.training.micro_batch = 2
    cfg.training.global_batch = 2
    cfg.training.seq_len = 32
    cfg.training.warmup_steps = 1
    cfg.checkpoint.interval = 1
    cfg.eval.interval = 0
    run(cfg, progress=False)
    return cfg.out_dir


def test_export_writes_the_tokenizer_and_its_special_ids(trained_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from train.export import main as export_main

    out = tmp_path / "hf"
    assert export_main(["--checkpoint", trained_run, "--out", str(out), "--dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (256, 257)  # the byte tokenizer's, not Llama-2's
    assert isinstance(load_tokenizer(str(out)), ByteTokenizer)
    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    assert hf.generation_config.eos_token_id == 257  # transformers' generate stops at this run's EOS
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == 257


def test_export_defaults_to_the_runs_parameter_dtype(trained_run, tmp_path, capsys):
    from safetensors import safe_open

    from train.export import main as export_main

    assert export_main(["--checkpoint", trained_run, "--out", str(tmp_path / "a")]) == 0  # a float32 run
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert "(float32)" in capsys.readouterr().out
    assert export_main(["--checkpoint", trained_run, "--out", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_parameter_dtype_follows_training_dtype(tmp_path):
    from model.checkpoint import parameter_dtype

    for training, want in (("float32", torch.float32), ("bfloat16", torch.float32),
                           ("bfloat16-params", torch.bfloat16)):
        (tmp_path / "meta.json").write_text(json.dumps({"step": 1, "config": {"training": {"dtype": training}}}))
        assert parameter_dtype(str(tmp_path)) == want


def test_export_with_a_sentencepiece_tokenizer(trained_run, tokenizer_files, tmp_path):
    from train.export import main as export_main

    out = tmp_path / "hf"
    assert export_main(["--checkpoint", trained_run, "--out", str(out), "--dtype", "float32",
                        "--tokenizer", tokenizer_files["sentencepiece"]]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert isinstance(load_tokenizer(str(out)), SentencePieceTokenizer)


def test_save_hf_without_a_tokenizer_guesses_no_ids(tmp_path):
    from model import Llama, LlamaConfig

    Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, ffn_dim=64, max_seq_len=16)).save_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    assert not (tmp_path / "generation_config.json").exists()


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "model.generate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))


def test_generate_cli_from_a_run_and_from_its_export(trained_run, tmp_path):
    from train.export import main as export_main

    assert export_main(["--checkpoint", trained_run, "--out", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    outs = []
    for ckpt in (trained_run, str(tmp_path / "hf")):
        r = _generate("--checkpoint", ckpt, "--prompt", "The patient", "--max-new-tokens", "8")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("The patient")
        outs.append(r.stdout)
    assert outs[0] == outs[1]  # the same weights and tokenizer either way, greedy


def test_generate_cli_user_errors(tmp_path, trained_run):
    r = _generate("--checkpoint", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = _generate("--checkpoint", str(tmp_path / "nonexistent"), "--prompt", "x")
    assert r.returncode == 2 and "no such directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _generate("--checkpoint", trained_run, "--prompt", "x", "--max-new-tokens", "0")
    assert r.returncode == 2 and "max_new_tokens" in r.stderr


def test_generate_cli_says_when_the_context_ends(trained_run):
    # the tiny preset holds 1024 tokens: BOS + 1020 bytes leave room for 3 of the 8 asked for
    r = _generate("--checkpoint", trained_run, "--prompt", "x" * 1020, "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "warning: prompts[0] has 1021 tokens: the context (max_seq_len=1024) leaves room for 3 of " \
           "max_new_tokens=8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

