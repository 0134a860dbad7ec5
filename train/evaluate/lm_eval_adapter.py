"""Our Llama as an lm-evaluation-harness model, registered as "meditron".

    python -m train.evaluate.lm_eval_adapter run --model meditron \\
        --model_args checkpoint=hf/,dtype=bfloat16 --tasks multimedqa --batch_size 32

runs lm-eval's own command line with the adapter registered (lm-eval has no plugin discovery, so
the module must be imported first; from Python: ``import train.evaluate.lm_eval_adapter`` and then
``lm_eval.simple_evaluate(model="meditron", ...)``). Requests are tokenized as lm-eval's Hugging
Face backend tokenizes them (a BOS first, the context/continuation split of ``TemplateLM``), so
the log-likelihoods are the ones that backend computes on the same weights. Log-likelihood
requests are packed several per forward (``--model_args batch_tokens=N``); generation uses the
model's KV cache. Under torchrun, lm-eval shares the documents among the processes.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import meditron_kernels as mk

from ..process_group import init_process_group
from .scoring import generate, loglikelihood_tokens, plan_batches

_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "seed"}


def _generation_args(kwargs: dict, eos: str) -> tuple[list[str], int, float, float, int | None]:
    """lm-eval's generation kwargs -> (stop strings, max new tokens, temperature, top_p, seed).
    Greedy unless do_sample is true (or absent with a positive temperature), as lm-eval's HF backend."""
    unknown = set(kwargs) - _GEN_KEYS
    if unknown:
        raise ValueError(f"meditron generate_until: unsupported generation arguments {sorted(unknown)}; "
                         f"supported: {sorted(_GEN_KEYS)}")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    if eos and eos not in until:
        until.append(eos)
    max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256)))
    temperature = float(kwargs.get("temperature", 0.0))
    if not kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    seed = kwargs.get("seed")
    return until, max_new, temperature, float(kwargs.get("top_p", 1.0)), None if seed is None else int(seed)


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@register_model("meditron")
class MeditronLM(TemplateLM):
    """model_args: checkpoint (HF directory or training run), tokenizer (default: the checkpoint's),
    device, dtype, backend (meditron_kernels backend), batch_tokens (log-likelihood tokens per
    forward), batch_size (sequences per generate call), add_bos_token (default true: Llama-2 and
    the trainer's documents start with BOS), seed (sampling seed)."""

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, device: str | None = None,
                 dtype: str | None = None, backend: str | None = None, batch_tokens: int = 8192,
                 batch_size: int | str = 16, max_batch_size: int | None = None, add_bos_token: bool = True,
                 seed: int = 0, model=None, tok=None):
        super().__init__()
        if (model is None) != (tok is None):
            raise ValueError("pass both model and tok, or a checkpoint")
        if model is None and checkpoint is None:
            raise ValueError("model_args needs checkpoint=DIR (an HF directory or a training run)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            init_process_group("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        if device is None or str(device).startswith("cuda"):  # lm-eval's command line passes a CUDA device
            if not torch.cuda.is_available():
                if device is not None:
                    warnings.warn(f"meditron: device {device!r} asked for but CUDA is unavailable; running on the CPU")
                device = "cpu"
            elif device in (None, "cuda"):
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self._device = torch.device(device)
        if model is None:
            from .load import load_model_and_tokenizer

            torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self._device.type == "cuda" else torch.float32)
            model, tok, _ = load_model_and_tokenizer(checkpoint, tokenizer, device=self._device, dtype=torch_dtype)
        self.model, self.tok = model.eval(), tok
        self.backend_name = backend
        self.batch_tokens = int(batch_tokens)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.add_bos_token = add_bos_token if isinstance(add_bos_token, bool) else str(add_bos_token).lower() == "true"
        self.seed = int(seed)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tok.fingerprint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return ([self.tok.bos_id] if bos else []) + self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------ distributed (lm-eval's data parallelism)
    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (logprob, is greedy)."""
        # longest first, so similar lengths share a forward; results go back to the request order
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        sizes = [min(len(requests[i][1]) + len(requests[i][2]), self.max_length + 1) for i in order]
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="meditron loglikelihood", disable=disable_tqdm or self.rank != 0)
        with mk.use_backend(self.backend_name):
            for batch in plan_batches(sizes, self.batch_tokens):
                idx = [order[j] for j in batch]
                for i, ans in zip(idx, loglikelihood_tokens(self.model, [(requests[i][1], requests[i][2]) for i in idx])):
                    out[i] = ans
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
                bar.update(len(idx))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of the log-likelihoods of every token of each text, in disjoint windows of the context."""
        windows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations (KV cache), cut at the first stop sequence."""
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="meditron generate_until", disable=disable_tqdm or self.rank != 0)
        eos = self.tok.decode([self.eot_token_id])
        with mk.use_backend(self.backend_name):
            for idx in groups.values():
                until, max_new, temperature, top_p, seed = _generation_args(dict(requests[idx[0]].args[1]), eos)
                ctx_len = self.max_length - max_new
                if ctx_len < 1:
                    raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in max_length {self.max_length}")
                for b, batch in enumerate(plan_batches([1] * len(idx), self.batch_size)):
                    ids = [self.tok_encode(requests[idx[j]].args[0])[-ctx_len:] for j in batch]
                    conts = generate(self.model, ids, max_new_tokens=max_new, temperature=temperature,
                                     top_p=top_p, stop_ids=(self.eot_token_id,),
                                     seed=(self.seed if seed is None else seed) + b)
                    for j, c in zip(batch, conts):
                        i = idx[j]
                        text = _cut(self.tok.decode(c), until)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        bar.close()
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
