"""The PEFT peers' candidate scoring for ``accuracy_multi_token.py``: a prompt-learning model (prompt tuning or
P-tuning) before the manual template, asked for a candidate of n tokens with n masks (masked LMs) or by the chain
rule after the template's words up to ``[Y]`` (causal LMs) — the scores the soft prompts' candidate ranking gives."""

from __future__ import annotations

import copy

import torch

from peft_softmix.causal_ranking import cache_argument, cache_of
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
    prefix scoring uses. Candidates continue each prompt's key/value cache, as the library's ranking does."""

    def __init__(self, peft_model, tokenizer, template: str, *args, **kwargs):
        if "[Y]" not in template or template.index("[X]") > template.index("[Y]"):
            raise ValueError(f"A causal peer reads the template up to [Y], after [X]; {template!r} is not so.")
        super().__init__(peft_model, tokenizer, template, *args, **kwargs)
        self.prompt_template = template[: template.index("[Y]")].rstrip()
        self.base = peft_model.get_base_model()
        self.cache_name = cache_argument(peft_model)

    def _prompt_ids(self, subject: str) -> list[int]:
        return self.tokenizer(self.prompt_template.replace("[X]", subject))["input_ids"]

    def _forward(self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, **kwargs):
        """The base model on PEFT's virtual tokens (positions 0..P-1) and then ``ids`` (at ``positions`` + P)."""
        B, P = ids.shape[0], self.shift
        device = next(self.base.parameters()).device
        prompts = self.model.get_prompt(batch_size=B).to(self.base.dtype)
        embeds = torch.cat([prompts, self.base.get_input_embeddings()(ids.to(device))], dim=1)
        attention = torch.cat([torch.ones(B, P, dtype=torch.long), attention], dim=1).to(device)
        positions = torch.cat([torch.arange(P).expand(B, P), positions + P], dim=1).to(device)
        return self.base(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, **kwargs)

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
        logits = self._forward(ids, attention, torch.arange(S).expand(len(rows), S)).logits[:, self.shift :]
        log_probs = logits[:, :-1].float().log_softmax(-1)  # position s predicts token s + 1
        gold = log_probs.gather(2, ids[:, 1:].to(log_probs.device)[..., None]).squeeze(2)
        return -(gold * targets[:, 1:].to(gold.device)).sum(1).mean()

    @torch.no_grad()
    def scores(self, subjects: list[str], candidates: list[str]) -> torch.Tensor:
        tokens = [object_tokens(self.tokenizer, c, exact=True) for c in candidates]
        out = torch.empty(len(subjects), len(candidates))
        for start in range(0, len(subjects), self.batch_size):
            chunk = subjects[start : start + self.batch_size]
            out[start : start + len(chunk)] = self._score_chunk(chunk, tokens)
        return out

    def _score_chunk(self, subjects: list[str], tokens: list[tuple[int, ...]]) -> torch.Tensor:
        prompts = [self._prompt_ids(s) for s in subjects]
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, P, dtype=torch.long)  # padded on the left, so that candidates start together
        attention = torch.zeros(B, P, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, P - len(prompt) :] = torch.tensor(prompt)
            attention[b, P - len(prompt) :] = 1
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        out = self._forward(ids, attention, positions, use_cache=True)
        cache, first = cache_of(out), out.logits[:, -1].float().log_softmax(-1).cpu()  # [B, V]
        lengths = attention.sum(1)
        scores = torch.empty(B, len(tokens))
        by_length: dict[int, list[int]] = {}
        for c, ids_c in enumerate(tokens):
            by_length.setdefault(len(ids_c), []).append(c)
        for n, columns in sorted(by_length.items()):
            candidate_ids = torch.tensor([tokens[c] for c in columns])  # [C_n, n]
            total = first.index_select(1, candidate_ids[:, 0])  # [B, C_n]
            step = max(1, 4096 // B)  # candidates per continuation pass
            for c0 in range(0, len(columns) if n > 1 else 0, step):
                part = candidate_ids[c0 : c0 + step]
                C = part.shape[0]
                expanded = copy.deepcopy(cache)
                expanded.batch_repeat_interleave(C)
                more = torch.cat([attention.repeat_interleave(C, 0), torch.ones(B * C, n, dtype=torch.long)], 1)
                where = lengths.repeat_interleave(C)[:, None] + torch.arange(n) + self.shift
                device = next(self.base.parameters()).device
                logits = self.base(
                    input_ids=part.repeat(B, 1).to(device),
                    attention_mask=torch.cat([torch.ones(B * C, self.shift, dtype=torch.long), more], 1).to(device),
                    position_ids=where.to(device),
                    use_cache=True,
                    **{self.cache_name: expanded},
                ).logits
                follow = logits[:, :-1].float().log_softmax(-1).cpu()  # token j predicts token j + 1
                gathered = follow.gather(2, part.repeat(B, 1)[:, 1:, None]).squeeze(2).sum(1)
                total[:, c0 : c0 + C] += gathered.view(B, C)
            scores[:, columns] = total / n if self.length_normalized else total
        return scores
