"""Open answers of up to L tokens, without candidates: fill n masks for every length n = 1..L, X-FACTR style.

X-FACTR (Jiang et al., EMNLP 2020) decodes a masked LM's multi-token answers by filling a slot of n masks one way or
another and comparing the lengths. Here every (subject, length n) is a "job": its rows are the subject's templates
with n masks in ``[Y]`` (`peft_softmix.objects.encode_objects`); jobs of all lengths share each batch.

Strategies (``strategy=``):

- ``"independent"``: one forward pass; every mask gets its own argmax of the mixture at that mask.
- ``"left_to_right"``: fill the leftmost open mask with its argmax, run again with it filled, and so on (n passes).
- ``"confidence"``: fill the open mask whose best token is most probable, run again, and so on (n passes).

The mixture at a mask. With nothing filled, template k weighs pi_k: a token scores log sum_k pi_k p_k(t|x).
Once tokens y_A are filled, each template weighs its posterior under the model's own sequence score,
w_k ∝ pi_k prod_{j in A} p_k(y_j|x), where p_k(y_j|x) is read from the first pass (all masks open). That is exact
for the model's score, whose tokens are independent given the template (summing the open masks out gives 1), so
the templates that believed in the filled tokens choose the next one; the distribution they mix, p_k(t|x, y_A),
comes from the pass with y_A filled in. ``"independent"`` uses pi_k at every mask.

A small beam: at the first mask a job fills (the leftmost for ``"independent"`` and ``"left_to_right"``, the most
confident one for ``"confidence"``) it keeps the ``num_beams`` best tokens, and each then continues greedily.

Every decoded answer y of n tokens is then scored exactly with the model's sequence score, the one training,
`score_candidates` and `object_head` use: log p(y|x) = logsumexp_k(log pi_k + sum_j log p_k(y_j|x)), every p_k read
at its mask of the first pass. Answers of all lengths are ranked by it, or by log p(y|x) / n
(``length_normalized=True``): the raw score favours short answers, since every token multiplies in a probability.

Cost, per subject with K templates (one batched forward pass per step, for all subjects and all lengths of a chunk):

- ``"independent"``: 1 pass of K·L rows.
- ``"left_to_right"`` and ``"confidence"``: L passes: the first of K·L rows, then step s = 1..L-1 runs K·W·(L-s)
  rows (W = ``num_beams``), K·L + K·W·L(L-1)/2 rows in all.

The exact re-scoring gathers from the first pass and costs no pass. docs/decoding.md measures the three.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import QueryTooLongError
from .inputs import check_subjects
from .mixture import FactGroups, mix_rows
from .objects import encode_objects
from .tokenization import HARD

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "AnswerScores", "check_decoding_options", "decode_answers"]

STRATEGIES = ("independent", "left_to_right", "confidence")
DEFAULT_STRATEGY = "independent"


@dataclass
class AnswerScores:
    """One subject's answers (objects of any length) with their exact scores, best first.

    Args:
        tokens: each answer's token ids.
        log_probs: ``[A]`` log p(y|x) of each answer under the mixture.
        template_log_probs: ``[A, K]`` log p_k(y|x) of each answer under each template.
        log_weights: ``[K]`` the subject's log pi_k.
    """

    tokens: list[tuple[int, ...]]
    log_probs: torch.Tensor
    template_log_probs: torch.Tensor
    log_weights: torch.Tensor

    def ranked(self, length_normalized: bool = False) -> AnswerScores:
        """The same answers ordered by log p(y|x) (or log p(y|x) / n), best first (ties keep their order)."""
        scores = self.log_probs
        if length_normalized:
            scores = scores / torch.tensor([len(t) for t in self.tokens], device=scores.device, dtype=scores.dtype)
        order = torch.sort(scores, descending=True, stable=True).indices
        return AnswerScores(
            [self.tokens[i] for i in order.tolist()],
            self.log_probs[order],
            self.template_log_probs[order],
            self.log_weights,
        )


def check_decoding_options(max_tokens: Any, strategy: Any, num_beams: Any = 1) -> None:
    """``max_tokens`` and ``num_beams`` are whole numbers >= 1 and ``strategy`` is one of `STRATEGIES`."""
    for value, name in ((max_tokens, "max_tokens"), (num_beams, "num_beams")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown decoding strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")


@torch.inference_mode()
def decode_answers(
    model: Any,
    subjects: Sequence[str],
    max_tokens: int,
    strategy: str = DEFAULT_STRATEGY,
    num_beams: int = 3,
    length_normalized: bool = False,
    adapter_names: Sequence[str] | None = None,
    batch_size: int = 16,
) -> list[AnswerScores]:
    """Decode each subject's answers of 1..``max_tokens`` tokens through its adapter (the active one by default) of a
    `PeftModelForSoftMixture`: up to ``num_beams`` answers per length, ranked across lengths (see the module).

    ``batch_size`` subjects share a pass (``batch_size // num_beams`` with the filling strategies, whose passes run
    every beam). Raises `QueryTooLongError`, naming the model's limit, when ``max_tokens`` masks make a query too
    long.
    """
    check_subjects(subjects, "decode", allow_empty=True)
    check_decoding_options(max_tokens, strategy, num_beams)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    names = list(adapter_names) if adapter_names is not None else [model.active_adapter] * len(subjects)
    if len(names) != len(subjects):
        raise ValueError(f"decode got {len(subjects)} subject(s) and {len(names)} adapter name(s).")
    was_training = model.training
    model.eval()
    results: list[AnswerScores] = []
    try:
        # a filling pass runs every beam: batch_size bounds subjects x beams there, so memory does not grow with W
        step = batch_size if strategy == "independent" else max(1, batch_size // num_beams)
        for start in range(0, len(subjects), step):
            chunk = list(subjects[start : start + step])
            found = _decode_chunk(model, chunk, names[start : start + step], max_tokens, strategy, num_beams)
            results.extend(answers.ranked(length_normalized) for answers in found)
    finally:
        model.train(was_training)
    return results


def _decode_chunk(
    model: Any, subjects: list[str], names: list[str], L: int, strategy: str, num_beams: int
) -> list[AnswerScores]:
    device = model.embedding_device
    # job j = (subject b, length n), subject-major: jobs of subject b are j = b*L .. b*L + L-1
    job_subject = [b for b in range(len(subjects)) for _ in range(L)]
    job_length = torch.tensor([n for _ in subjects for n in range(1, L + 1)], device=device)
    job_names = [names[b] for b in job_subject]
    processors = [model.get_processor(name) for name in job_names]
    try:
        batch = encode_objects(
            processors, [subjects[b] for b in job_subject], num_masks=job_length.tolist(), device=device
        )
    except QueryTooLongError as error:
        raise QueryTooLongError(f"{error} Or ask for shorter answers (max_tokens={L} now).") from None
    batch.pop("encoded_for", None)
    sizes = tuple(p.num_templates for p in processors)
    groups = FactGroups(sizes, batch["fact_index"])
    first = model(**batch, adapter_names=job_names, return_template_log_probs=True)
    log_probs, prior = first.template_log_probs, first.log_weights  # [N, L, V], [N]
    V = log_probs.shape[-1]
    open_ = torch.arange(L, device=device)[None, :] < job_length[:, None]  # [J, L] the job's masks
    W = min(num_beams, V)

    # step 0, for every strategy: each job's mixture at its masks under pi_k, its branching mask and W first tokens
    mixed = mix_rows(log_probs, prior, groups)  # [J, L, V]
    best, best_token = mixed.max(dim=-1)  # [J, L]
    if strategy == "confidence":
        branch = best.masked_fill(~open_, float("-inf")).argmax(dim=1)
    else:
        branch = torch.zeros_like(job_length)
    J = job_length.shape[0]
    jobs = torch.arange(J, device=device)
    first_tokens = mixed[jobs, branch].topk(W, dim=-1).indices  # [J, W]
    hyp_job = jobs.repeat_interleave(W)  # hypothesis h = (job, beam), job-major
    filled = torch.full((J * W, L), -1, dtype=torch.long, device=device)
    if strategy == "independent":
        filled = torch.where(open_, best_token, -1).repeat_interleave(W, dim=0)
    filled[torch.arange(J * W, device=device), branch[hyp_job]] = first_tokens.reshape(-1)

    search = _Search(model, batch, log_probs, prior, sizes, hyp_job, open_[hyp_job], job_names, strategy)
    if strategy != "independent":
        for _ in range(1, L):
            active = ((filled < 0) & search.masks).any(dim=1).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            search.fill_one(filled, active)

    # exact scores of every hypothesis: sum_j log p_k(y_j|x) at the first pass, mixed with pi_k
    rows, row_hyp = search.rows_of(torch.arange(J * W, device=device))
    per_row = _filled_log_probs(log_probs, rows, filled[row_hyp])  # [R]
    hyp_sizes = tuple(sizes[j] for j in hyp_job.tolist())
    mixture = mix_rows(per_row, prior[rows], FactGroups(hyp_sizes, row_hyp))  # [H]
    out: list[AnswerScores] = []
    row_starts = [0, *torch.tensor(hyp_sizes).cumsum(0).tolist()]
    filled_list = filled.tolist()
    for b in range(len(subjects)):
        hyps = range(b * L * W, (b + 1) * L * W)
        K = sizes[b * L]
        tokens = [tuple(t for t in filled_list[h] if t >= 0) for h in hyps]
        template = torch.stack([per_row[row_starts[h] : row_starts[h] + K] for h in hyps])
        first_row = sum(sizes[: b * L])
        weights = prior[first_row : first_row + K]
        out.append(AnswerScores(tokens, mixture[hyps.start : hyps.stop], template, weights))
    return out


def _filled_log_probs(log_probs: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[R]`` sum over the filled masks j (token >= 0) of ``log_probs[rows, j, tokens[:, j]]``."""
    L = tokens.shape[1]
    picked = log_probs[rows[:, None], torch.arange(L, device=rows.device)[None, :], tokens.clamp(min=0)]
    return (picked * (tokens >= 0)).sum(dim=1)


@dataclass
class _Search:
    """The decoding of one chunk: its first pass (all masks open) and each hypothesis' job (subject, length)."""

    model: Any
    batch: dict[str, Any]  # the first pass's rows, K per job
    log_probs: torch.Tensor  # [N, L, V] of the first pass
    prior: torch.Tensor  # [N] log pi_k of each row
    sizes: tuple[int, ...]  # K of each job
    hyp_job: torch.Tensor  # [H] the job of each hypothesis
    masks: torch.Tensor  # [H, L] the masks each hypothesis' length has
    job_names: list[str]
    strategy: str

    def rows_of(self, hyps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-pass rows of each hypothesis of ``hyps`` (its job's K rows), and each row's place in ``hyps``."""
        device = hyps.device
        starts = torch.tensor([0, *self.sizes], device=device).cumsum(0)[:-1]
        jobs = self.hyp_job[hyps]
        counts = torch.tensor(self.sizes, device=device)[jobs]
        row_hyp = torch.arange(hyps.shape[0], device=device).repeat_interleave(counts)
        before = (counts.cumsum(0) - counts).repeat_interleave(counts)
        return starts[jobs].repeat_interleave(counts) + torch.arange(
            int(counts.sum()), device=device
        ) - before, row_hyp

    def fill_one(self, filled: torch.Tensor, active: torch.Tensor) -> None:
        """One pass for the ``active`` hypotheses with their tokens so far written in; each fills one more of its
        masks, in ``filled`` (``[H, L]``, -1 where open)."""
        rows, row_hyp = self.rows_of(active)
        tokens = filled[active][row_hyp]  # [R, L]
        batch = self.batch
        targets = batch["target_positions"][rows]
        input_ids, roles = batch["input_ids"][rows].clone(), batch["roles"][rows].clone()
        r, j = (tokens >= 0).nonzero(as_tuple=True)
        input_ids[r, targets[r, j]] = tokens[r, j]
        roles[r, targets[r, j]] = HARD  # a filled mask is a word of the text, as the subject's are
        sub = {
            "input_ids": input_ids,
            "attention_mask": batch["attention_mask"][rows],
            "roles": roles,
            "mask_positions": batch["mask_positions"][rows],
            "fact_index": row_hyp,
            "target_positions": targets,
        }
        jobs = self.hyp_job[active].tolist()
        out = self.model(**sub, adapter_names=[self.job_names[j] for j in jobs], return_template_log_probs=True)
        # each template's posterior given the filled tokens, under the model's sequence score (first pass)
        posterior = self.prior[rows] + _filled_log_probs(self.log_probs, rows, tokens)
        groups = FactGroups(tuple(self.sizes[j] for j in jobs), row_hyp)
        best, best_token = mix_rows(out.template_log_probs, posterior, groups).max(dim=-1)  # [H, L]
        still_open = (filled[active] < 0) & self.masks[active]
        if self.strategy == "left_to_right":
            where = still_open.int().argmax(dim=1)  # the leftmost open mask
        else:
            where = best.masked_fill(~still_open, float("-inf")).argmax(dim=1)
        filled[active, where] = best_token.gather(1, where[:, None]).squeeze(1)
