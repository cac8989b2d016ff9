"""The PEFT peers' candidate scoring for ``accuracy_multi_token.py``: a prompt-learning model (prompt tuning or
P-tuning) before the manual template, asked for a candidate of n tokens with n masks (masked LMs) or by the chain
rule after the template's words up to ``[Y]`` (causal LMs) — the scores the soft prompts' candidate ranking gives."""

from __future__ import annotations

import torch

from peft_softmix.causal_ranking import cache_argument, score_after_prompts
from peft_softmix.facts import Fact
from peft_softmix.objects import object_tokens


def fill(template: str, subject: str, mask_token: str, num_masks: int) -> str:
    return template.replace("[X]", subject).replace("[Y]", " ".join([mask_token] * num_masks))


class PeerScorer:
    """A PEFT prompt-learning model before the manual template, asked with n masks for an n-token object; log p(c|x)
    = sum_j log p(c_j|x) at the masks, as for the soft prompts."""

    def __init__(
        self,
        peft_model,
        tokenizer,
        template: str,
        num_virtual_tokens: int,
        batch_size: int,
        length_normalized: bool = False,
    ):
        self.model, self.tokenizer, self.template = peft_model, tokenizer, template
        self.shift, self.batch_size = num_virtual_tokens, batch_size  # PEFT's virtual tokens come first
        self.length_normalized = length_normalized

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def mask_log_probs(self, subjects: list[str], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L, V]`` log-probabilities at each subject's masks (L the most masks; past a row's own count the
        first mask repeats) and ``[B, L]`` whether that step is one of the row's masks."""
        tok = self.tokenizer
        texts = [fill(self.template, s, tok.mask_token, n) for s, n in zip(subjects, counts)]
        enc = tok(texts, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        logits = self.model(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
        ).logits
        L = max(counts)
        positions = torch.zeros(len(texts), L, dtype=torch.long)
        valid = torch.zeros(len(texts), L, dtype=torch.bool)
        for b, row in enumerate(enc["input_ids"]):
            masks = (row == tok.mask_token_id).nonzero().squeeze(1)
            if len(masks) != counts[b]:
                raise ValueError(f"The filled template {texts[b]!r} holds {len(masks)} masks, not {counts[b]}.")
            positions[b, : counts[b]] = masks
            positions[b, counts[b] :] = masks[0]
            valid[b, : counts[b]] = True
        picked = logits.gather(1, (positions + self.shift).to(device)[..., None].expand(-1, -1, logits.shape[-1]))
        return torch.log_softmax(picked.float(), dim=-1), valid.to(device)

    def loss(self, facts: list[Fact]) -> torch.Tensor:
        tokens = [object_tokens(self.tokenizer, f.object) for f in facts]
        log_probs, valid = self.mask_log_probs([f.subject for f in facts], [len(t) for t in tokens])
        labels = torch.zeros(valid.shape, dtype=torch.long)
        for b, ids in enumerate(tokens):
            labels[b, : len(ids)] = torch.tensor(ids)
        gold = log_probs.gather(2, labels.to(log_probs.device)[..., None]).squeeze(2)
        return -(gold * valid).sum(1).mean()

    @torch.no_grad()
    def scores(self, subjects: list[str], candidates: list[str]) -> torch.Tensor:
        tokens = [object_tokens(self.tokenizer, c) for c in candidates]
        out = torch.empty(len(subjects), len(candidates))
        for n in sorted({len(t) for t in tokens}):
            columns = [c for c, t in enumerate(tokens) if len(t) == n]
            ids = torch.tensor([tokens[c] for c in columns])  # [C_n, n]
            for start in range(0, len(subjects), self.batch_size):
                chunk = subjects[start : start + self.batch_size]
                log_probs, _ = self.mask_log_probs(chunk, [n] * len(chunk))  # [b, n, V]
                log_probs = log_probs.cpu()
                total = sum(log_probs[:, j].index_select(1, ids[:, j]) for j in range(n))
                out[start : start + len(chunk), columns] = total / n if self.length_normalized else total
        return out


class CausalPeerScorer(PeerScorer):
    """A PEFT prompt-learning model on a causal LM: its virtual tokens, then the manual template's words up to
    ``[Y]`` with the subject in; log p(c|x) = sum_j log p(c_j | prompt, c_<j), the chain rule the soft prompts'
    prefix scoring uses. Candidates continue each prompt's key/value cache through the library's
    `peft_softmix.causal_ranking.score_after_prompts`, as the soft prompts' ranking does."""

    def __init__(self, peft_model, tokenizer, template: str, *args, **kwargs):
        if "[Y]" not in template or template.index("[X]") > template.index("[Y]"):
            raise ValueError(f"A causal peer reads the template up to [Y], after [X]; {template!r} is not so.")
        super().__init__(peft_model, tokenizer, template, *args, **kwargs)
        self.prompt_template = template[: template.index("[Y]")].rstrip()
        self.base = peft_model.get_base_model()
        self.cache_name = cache_argument(peft_model)

    def _prompt_ids(self, subject: str) -> list[int]:
        return self.tokenizer(self.prompt_template.replace("[X]", subject))["input_ids"]

    def _forward(self, ids, roles, attention_mask, position_ids, cache=None):
        """A `peft_softmix.causal_ranking.CausalForward`: PEFT's virtual tokens at positions 0..P-1 and then ``ids``
        (at ``position_ids`` + P); a continuation (``cache``) finds the virtual tokens in the cache."""
        B, P = ids.shape[0], self.shift
        device = next(self.base.parameters()).device
        ids, position_ids = ids.to(device), position_ids.to(device)
        attention = torch.cat([torch.ones(B, P, dtype=torch.long, device=device), attention_mask.to(device)], dim=1)
        if cache is not None:
            return self.base(
                input_ids=ids, attention_mask=attention, position_ids=position_ids + P, use_cache=True,
                **{self.cache_name: cache},
            )  # fmt: skip
        prompts = self.model.get_prompt(batch_size=B).to(self.base.dtype)
        embeds = torch.cat([prompts, self.base.get_input_embeddings()(ids)], dim=1)
        positions = torch.cat([torch.arange(P, device=device).expand(B, P), position_ids + P], dim=1)
        return self.base(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True)

    def loss(self, facts: list[Fact]) -> torch.Tensor:
        rows = [(self._prompt_ids(f.subject), object_tokens(self.tokenizer, f.object, exact=True)) for f in facts]
        S = max(len(p) + len(o) for p, o in rows)
        ids = torch.zeros(len(rows), S, dtype=torch.long)
        attention = torch.zeros(len(rows), S, dtype=torch.long)
        targets = torch.zeros(len(rows), S, dtype=torch.bool)  # position s holds an object token
        for b, (prompt, obj) in enumerate(rows):
            ids[b, : len(prompt) + len(obj)] = torch.tensor(prompt + list(obj))
            attention[b, : len(prompt) + len(obj)] = 1
            targets[b, len(prompt) : len(prompt) + len(obj)] = True
        out = self._forward(ids, torch.full_like(ids, -1), attention, torch.arange(S).expand(len(rows), S))
        logits = out.logits[:, self.shift :]  # the virtual tokens' positions predict nothing of the object
        log_probs = logits[:, :-1].float().log_softmax(-1)  # position s predicts token s + 1
        gold = log_probs.gather(2, ids[:, 1:].to(log_probs.device)[..., None]).squeeze(2)
        return -(gold * targets[:, 1:].to(gold.device)).sum(1).mean()

    @torch.no_grad()
    def scores(self, subjects: list[str], candidates: list[str]) -> torch.Tensor:
        tokens = [object_tokens(self.tokenizer, c, exact=True) for c in candidates]
        lengths = torch.tensor([len(t) for t in tokens], dtype=torch.float)
        device = next(self.base.parameters()).device
        out = torch.empty(len(subjects), len(candidates))
        for start in range(0, len(subjects), self.batch_size):
            chunk = subjects[start : start + self.batch_size]
            # (token id, role): no template roles here, the peer's prompt is its virtual tokens
            prompts = [torch.tensor([(i, -1) for i in self._prompt_ids(s)]) for s in chunk]
            out[start : start + len(chunk)] = score_after_prompts(self._forward, prompts, tokens, device).cpu()
        return out / lengths if self.length_normalized else out
