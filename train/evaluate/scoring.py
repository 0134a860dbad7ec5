"""Scoring: log-likelihoods from packed forwards, generation, answer extraction, majority vote.

Log-likelihood scoring packs the sequences of several questions into one forward
(``cu_seqlens``: attention stays inside each sequence, no padding), and sequences whose
inputs are identical are computed once: when every option is one token after a shared
prefix (" A", " B", ... in most tokenizers) a question costs one sequence, not one per option.
Only the positions that are scored go through the output head.
"""
from __future__ import annotations

import collections
import re

import torch


def encode_pair(encode, context: str, continuation: str, prefix: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, as lm-evaluation-harness splits them.

    The whole text is encoded at once and the continuation is what follows the context's tokens,
    so a tokenizer that merges across the boundary scores the same tokens a reader of the whole
    text would. Trailing spaces of the context move to the continuation. ``prefix`` (e.g. [BOS])
    starts the context."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = prefix + encode(context)
    whole = prefix + encode(context + continuation)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def last_logprobs(model, seqs: list[list[int]], n_last: list[int]) -> list[torch.Tensor]:
    """Next-token log-probabilities at the last ``n_last[i]`` positions of each sequence.

    seqs: token-id lists (each at most the model's max_seq_len); one packed forward for all.
    -> per sequence a float32 tensor (n_last[i], vocab)."""
    device = model.output.weight.device
    lens = [len(s) for s in seqs]
    if min(lens) < 1:
        raise ValueError("last_logprobs: empty sequence")
    if max(lens) > model.cfg.max_seq_len:
        raise ValueError(f"last_logprobs: a sequence of {max(lens)} tokens exceeds the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")
    tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)[None]
    ends = torch.tensor(lens).cumsum(0)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), ends]).to(device=device, dtype=torch.int32)
    h = model.hidden_states(tokens, cu_seqlens=cu, max_seqlen=max(lens))[0]  # (total, dim)
    rows = torch.cat([torch.arange(int(e) - n, int(e)) for e, n in zip(ends, n_last)]).to(device)
    logp = model.output(h[rows]).float().log_softmax(-1)  # (sum n_last, vocab)
    return list(logp.split(n_last))


def loglikelihood_tokens(model, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
    for each (context ids, continuation ids) request, in one packed forward.

    Inputs longer than the model's context are cut from the left, as lm-evaluation-harness does."""
    max_len = model.cfg.max_seq_len
    index: dict[tuple, int] = {}
    seqs, n_last, where = [], [], []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("loglikelihood_tokens: context and continuation must each have at least one token")
        if len(cont) > max_len:
            raise ValueError(f"loglikelihood_tokens: a continuation of {len(cont)} tokens exceeds the "
                             f"model's max_seq_len {max_len}")
        inp = tuple((ctx + cont)[-(max_len + 1):][:-1])
        k = index.setdefault(inp, len(seqs))
        if k == len(seqs):
            seqs.append(inp)
            n_last.append(len(cont))
        n_last[k] = max(n_last[k], len(cont))
        where.append(k)
    logps = last_logprobs(model, seqs, n_last)
    out = []
    for (_, cont), k in zip(requests, where):
        lp = logps[k][-len(cont):]
        target = torch.tensor(cont, device=lp.device)
        out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def plan_batches(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive items grouped so each group's total size stays within ``budget`` (an item
    larger than the budget goes alone). A function of the sizes only, so every process of a
    data-parallel run computes the same plan, and each batch the same numbers, as one process."""
    batches, cur, total = [], [], 0
    for i, s in enumerate(sizes):
        if cur and total + s > budget:
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += s
    if cur:
        batches.append(cur)
    return batches


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
             stop_ids: tuple[int, ...], seed: int) -> list[list[int]]:
    """Continuations of ``prompts`` by the model's KV-cache generation, stop ids removed."""
    if not hasattr(model, "generate"):
        raise NotImplementedError("generation needs Llama.generate (KV-cache decoding), which this build of "
                                  "the model does not have; use the log-likelihood method")
    outs = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          stop_ids=tuple(stop_ids), seed=seed)
    cleaned = []
    for ids in outs:
        ids = list(ids)
        for j, t in enumerate(ids):
            if t in stop_ids:
                ids = ids[:j]
                break
        cleaned.append(ids)
    return cleaned


# ----------------------------------------------------------------------------------- answers
_ANSWER_IS = re.compile(r"answer\s+is\b\s*:?\s*", re.IGNORECASE)


def _label_pattern(labels, strict: bool) -> re.Pattern:
    alts = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    # after "answer is" a label may be followed by anything but a letter or digit ("B.", "(B)",
    # "b,"); a bare label at the start must end there or before punctuation, so that the
    # article in "A 45-year-old ..." is not read as option A.
    end = r"(?=[.,;:)]|\s*$|\s*\n)" if strict else r"(?![A-Za-z0-9])"
    return re.compile(r"\(?(" + alts + r")\)?" + end, re.IGNORECASE)


def extract_answer(text: str, labels, options=()) -> str | None:
    """The answer a generation gives, as one of ``labels`` (canonical case), or None.

    The last "answer is" in the text decides: a label after it ("The answer is: B", "the answer
    is (b)", "The answer is yes") or the text of exactly one option. Without such a phrase, a
    bare label at the start of the text counts (" B", "(C).", "Yes,"), as written after a prompt
    that already ends in "The answer is:"."""
    canon = {x.lower(): x for x in labels}
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        rest = text[m.end():]
        hit = _label_pattern(labels, strict=False).match(rest)
        if hit:
            return canon[hit.group(1).lower()]
        said = rest.strip().rstrip(".").lower()
        named = [lab for lab, opt in zip(labels, options) if opt.strip().lower() and said.startswith(opt.strip().lower())]
        if len(named) == 1:
            return named[0]
    hit = _label_pattern(labels, strict=True).match(text.lstrip())
    return canon[hit.group(1).lower()] if hit else None


def majority_vote(answers) -> str | None:
    """The most frequent answer, None answers ignored; a tie goes to the tied answer that came
    first; None when no sample gave an answer."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)
