"""Speed of a mixture of soft prompts against the frozen model it wraps, a K-template loop and PEFT prompt tuning.

Every case runs in the same process and the cases of a group are timed round-robin (one call of each case per
repeat), so that load from other processes falls on all of them alike: the *ratios* are what this measures. Each
figure is the median over ``--repeats`` timed calls after ``--warmup`` untimed steps, per step: a call runs steps
back to back, as a training loop does, until it lasts ``--min_call_ms`` (150 ms on a GPU, where a step can take
15 ms and the host queues the next step's kernels while the GPU finishes the last; 0 on a CPU, one step per call).
The summary also gives every ratio by minimum wall time and by median process CPU time, steadier on a shared
machine.

Groups:

- ``train``: one training step (forward, backward, Adam step) on 32 facts, for the soft mixture with K = 1, 5, 10
  templates, shallow and deep; the same tokens through the bare frozen model (forward and backward to
  ``inputs_embeds``, with the same mask-only LM head: the floor); a naive mixture that runs one forward per template;
  PEFT's own ``PROMPT_TUNING`` on the same model and batch size; and the levers (LM head at mask positions only,
  bf16 autocast through Accelerate with the adapter kept in fp32, the frozen model without dropout).
- ``eval``: facts per second ranking the gold object over the full vocabulary and over LAMA's common vocabulary,
  with the levers (inference mode, mask-only head, dynamic padding, length-sorted batches) and ``query()``.
- ``trex``: whole-pipeline evaluation (tokenising every query afresh, one adapter per relation, K = 5) on the probe
  LM of ``examples/probe_lm`` (or a random model of its shape), projected to the 34,039 facts of the T-REx test
  split; ``--full_trex_eval`` runs all of it instead.

Run::

    python benchmarks/speed.py --bf16                            # CPU, preset cpu-small
    python benchmarks/speed.py --device cuda --preset bert-base --repeats 5 --bf16

On a CPU shared with other processes, ``OMP_NUM_THREADS=1`` gives far steadier figures: two threads that spin at
every barrier lose whole time slices whenever one of them is descheduled.

The model weights are random (no pretrained LM is available offline): only shapes matter for speed. The last line
printed is one JSON object with every ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from peft import PromptTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizerFast  # type: ignore[attr-defined]  # noqa: E402

import peft_softmix  # noqa: E402, F401  (registers SOFT_MIXTURE with PEFT)
from peft_softmix import PeftModelForSoftMixture, SoftMixtureConfig, SoftMixtureModel  # noqa: E402
from peft_softmix.architectures import find_backbone  # noqa: E402
from peft_softmix.base_models import load_language_model  # noqa: E402
from peft_softmix.denormals import flush_denormals  # noqa: E402
from peft_softmix.hooks import SoftPositions, deep_prompt_hooks, gather_mask_positions  # noqa: E402
from peft_softmix.objects import object_tokens  # noqa: E402
from peft_softmix.peft_model import mix_templates  # noqa: E402
from peft_softmix.tokenization import object_token_id  # noqa: E402

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_PROBE_LM = REPO_ROOT / "examples" / "probe_lm"
DEFAULT_CAUSAL_LM = REPO_ROOT / "examples" / "probe_lm_causal"
TREX_TEST_FACTS = 34_039
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# (layers, hidden, heads, intermediate, vocab); vocab 28,996 is bert-base-cased's.
PRESETS = {
    "cpu-small": (4, 256, 4, 1024, 28_996),
    "bert-base": (12, 768, 12, 3072, 28_996),
    "probe": (2, 128, 2, 512, 16_600),
    "tiny": (2, 64, 2, 128, 8_000),
}


# --------------------------------------------------------------------------------------------------- data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def relation_facts(data_dir: Path, relation: str, split: str) -> list[tuple[str, str]]:
    rows = read_jsonl(data_dir / "trex" / relation / f"{split}.jsonl")
    return [
        (row.get("sub_label") or row.get("sub") or "", row.get("obj_label") or row.get("obj") or "") for row in rows
    ]


@functools.cache
def template_rows(path: Path) -> tuple[dict[str, Any], ...]:
    """A template file's rows, read once per process (the T-REx runs ask for 41 relations' templates)."""
    return tuple(read_jsonl(path))


def relation_templates(data_dir: Path, relation: str, k: int) -> list[str]:
    """The LAMA manual template, then LPAQA mined and paraphrased ones, without repeats: the first ``k``."""
    seen: dict[str, None] = {}
    for name in ("lama", "lpaqa_mined", "lpaqa_paraphrase"):
        for row in template_rows(data_dir / "templates" / f"{name}.jsonl"):
            template = row["template"]
            if row["relation"] == relation and template.count("[X]") == 1 and template.count("[Y]") == 1:
                seen.setdefault(" ".join(template.split()), None)
    templates = list(seen)[:k]
    if len(templates) < k:
        raise SystemExit(f"Relation {relation} has only {len(templates)} templates; pick another with --relation.")
    return templates


def build_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> Path:
    """A cased WordPiece tokenizer of exactly ``vocab_size`` tokens that covers ``texts`` (words, else pieces)."""
    chars = sorted({c for text in texts for c in text if not c.isspace()})
    words = Counter(word for text in texts for word in text.split())
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)):
        vocab.setdefault(token, len(vocab))
    for word, _ in words.most_common():
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    for i in range(vocab_size - len(vocab)):
        vocab[f"[unused{i}]"] = len(vocab)
    BertTokenizerFast(vocab=vocab, do_lower_case=False).save_pretrained(out_dir)
    return out_dir


def random_mlm(preset: str, device: torch.device, max_positions: int = 128) -> BertForMaskedLM:
    layers, hidden, heads, intermediate, vocab = PRESETS[preset]
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    torch.nn.Module.to(model, device)  # transformers types .to() as taking a dtype only
    return model


def shallow_and_deep(
    base: BertForMaskedLM, data_dir: Path, preset: str, k: int, device: torch.device, shuffle_seed: int | None = None
) -> tuple[Any, dict[str, dict[str, torch.Tensor]], dict[str, torch.optim.Optimizer]]:
    """``base`` with a shallow and a deep adapter of K P19 templates, each with a batch of 32 training facts (in file
    order, or shuffled by ``shuffle_seed``) and an Adam optimizer (fused on CUDA): the cases of `profile_step.py` and
    `deep_offsets.py`."""
    templates = relation_templates(data_dir, "P19", k)
    facts = [f for f in relation_facts(data_dir, "P19", "train") if f[0] and f[1]]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(facts)
    texts = (
        [s for s, _ in facts] + [o for _, o in facts] + [t.replace("[X]", " ").replace("[Y]", " ") for t in templates]
    )
    tokenizer_dir = build_tokenizer(texts, PRESETS[preset][4], Path(tempfile.mkdtemp()) / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    facts = [f for f in facts if object_token_id(tokenizer, f[1]) is not None][:32]
    pm: Any = None
    for name, deep in (("shallow", False), ("deep", True)):
        config = SoftMixtureConfig(templates=templates, tokenizer_name_or_path=str(tokenizer_dir), deep=deep)
        if pm is None:
            pm = get_peft_model(base, config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
    pm.to(device).train()
    batches, optimizers = {}, {}
    for name in ("shallow", "deep"):
        pm.set_adapter(name)
        batches[name] = pm.encode([s for s, _ in facts], [o for _, o in facts], device=device)
        params = [p for p in pm.prompt_encoder[name].parameters() if p.requires_grad]
        optimizers[name] = torch.optim.Adam(params, lr=1e-3, fused=device.type == "cuda")
    return pm, batches, optimizers


def bare_step(
    pm: Any,
    batch: dict[str, torch.Tensor],
    gather: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[], None]:
    """The frozen model on a mixture batch's tokens: forward (under ``autocast``; with the mask-only head unless
    ``gather`` is False), NLL at the masks, backward to the input embeddings: the floor a mixture step is compared
    with."""
    base = pm.base_model
    # the batch's rows are the filled hard templates, as the base model takes them
    ids, attention, masks = batch["input_ids"], batch["attention_mask"], batch["mask_positions"]
    labels = batch["labels"].index_select(0, batch["fact_index"])
    rows = torch.arange(ids.shape[0], device=ids.device)
    embeddings, backbone = pm.word_embeddings, cast(torch.nn.Module, find_backbone(base))

    def step() -> None:
        embeds = embeddings(ids).detach().requires_grad_()
        with autocast():
            head = gather_mask_positions(backbone, masks) if gather else contextlib.nullcontext()
            with head:
                logits = base(inputs_embeds=embeds, attention_mask=attention).logits
        logits = logits[:, 0] if gather else logits[rows, masks]
        (-torch.log_softmax(logits.float(), -1).gather(1, labels[:, None]).mean()).backward()

    return step


def template_grid(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``[N, T]`` rows of a one-adapter batch viewed as ``[B, K, T]`` (``[B, K]`` for the mask positions)."""
    B = int(batch["fact_index"][-1]) + 1
    K = batch["input_ids"].shape[0] // B
    keys = ("input_ids", "attention_mask", "roles", "mask_positions")
    return {key: batch[key].view(B, K, *batch[key].shape[1:]) for key in keys}


# --------------------------------------------------------------------------------------------------- timing


@dataclass
class Case:
    """One timed unit of work, ``run``. ``setup`` puts the shared model in the case's state (active adapter, train or
    eval mode), untimed, before every timed call; a call may run ``run`` several times."""

    name: str
    run: Callable[[], Any]
    facts: int
    tokens: int = 0
    setup: Callable[[], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_call(step_s: float, min_call_s: float) -> int:
    """How many steps one timed call runs so that it lasts at least ``min_call_s`` (one when no minimum is set)."""
    if min_call_s <= 0 or step_s <= 0:
        return 1
    return max(1, math.ceil(min_call_s / step_s))


def time_round_robin(
    cases: list[Case], repeats: int, warmup: int, device: torch.device, min_call_s: float = 0.0
) -> None:
    """Warm every case up, then time one call of each case per repeat, in turn.

    A call runs the case's step back to back as many times as makes it last ``min_call_s`` (measured on one more
    step after the warm-up) and records the time per step.
    """
    for case in cases:
        for _ in range(warmup):
            if case.setup:
                case.setup()
            case.run()
        case.info["steps_per_call"] = 1
        if min_call_s > 0:
            # one more untimed step sizes the calls: the first steps of a case carry allocation and kernel selection
            if case.setup:
                case.setup()
            synchronize(device)
            start = time.perf_counter()
            case.run()
            synchronize(device)
            case.info["steps_per_call"] = steps_per_call(time.perf_counter() - start, min_call_s)
    for _ in range(repeats):
        for case in cases:
            steps = case.info["steps_per_call"]
            if case.setup:
                case.setup()
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps):
                case.run()
            synchronize(device)
            case.times.append((time.perf_counter() - start) / steps)
            case.cpu_times.append((time.process_time() - cpu_start) / steps)


def report(group: str, cases: list[Case], printed: dict[str, Case]) -> None:
    print(f"\n== {group} ==")
    print(
        f"{'case':40s} {'median ms':>10s} {'min ms':>9s} {'cpu ms':>9s} {'facts/s':>9s} {'steps/s':>8s} {'tokens':>7s}"
    )
    for case in cases:
        median = case.median_s
        print(
            f"{case.name:40s} {median * 1e3:10.1f} {min(case.times) * 1e3:9.1f} "
            f"{statistics.median(case.cpu_times) * 1e3:9.1f} {case.facts / median:9.1f} {1 / median:8.2f} "
            f"{case.tokens:7d}"
        )
    for case in cases:
        line = {
            "group": group,
            "case": case.name,
            "median_ms": round(case.median_s * 1e3, 3),
            "min_ms": round(min(case.times) * 1e3, 3),
            "times_ms": [round(t * 1e3, 3) for t in case.times],
            "median_process_cpu_ms": round(statistics.median(case.cpu_times) * 1e3, 3),
            "steps_per_s": round(1 / case.median_s, 3),
            "facts_per_s": round(case.facts / case.median_s, 2),
            "facts": case.facts,
            "tokens": case.tokens,
            **case.info,
        }
        print(json.dumps(line))
        printed[case.name] = case


# --------------------------------------------------------------------------------------------------- cases


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.data_dir = Path(args.data_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix="softmix-speed-"))
        self.trex_model_cache: tuple[BertForMaskedLM, str, str] | None = None
        self.autocast: Callable[[], contextlib.AbstractContextManager] | None = None
        if args.bf16:
            from accelerate import Accelerator

            accelerator = Accelerator(mixed_precision="bf16", cpu=self.device.type == "cpu")
            self.autocast = accelerator.autocast

    def amp(self, bf16: bool) -> contextlib.AbstractContextManager:
        return self.autocast() if bf16 and self.autocast else contextlib.nullcontext()

    # -- training ---------------------------------------------------------------------------------------

    def train_cases(self) -> list[Case]:
        args, device = self.args, self.device
        relation = args.relation
        ks = sorted(set(args.ks))
        templates = relation_templates(self.data_dir, relation, max(ks))
        facts = [f for f in relation_facts(self.data_dir, relation, "train") if f[0] and f[1]]
        rng = random.Random(0)
        rng.shuffle(facts)
        texts = (
            [s for s, _ in facts]
            + [o for _, o in facts]
            + [t.replace("[X]", " ").replace("[Y]", " ") for t in templates]
        )
        self.train_tokenizer_dir = build_tokenizer(texts, PRESETS[args.preset][4], self.tmp / "tok-train")
        base = random_mlm(args.preset, device)
        objects = [o for _, o in facts]
        tokenizer = AutoTokenizer.from_pretrained(self.train_tokenizer_dir)
        # objects the tokenizer keeps whole, so that every fact in the batch has a label
        single = [f for f in facts if object_token_id(tokenizer, f[1]) is not None]
        batch_facts = (single or facts)[: args.batch_facts]
        subjects = [s for s, _ in batch_facts]
        objects = [o for _, o in batch_facts]
        print(
            f"train: relation {relation}, {len(batch_facts)} facts per batch, templates {templates[: max(ks)]}",
            flush=True,
        )

        pm: PeftModelForSoftMixture | None = None
        names = []
        for k in ks:
            for deep in (False, True):
                name = f"k{k}_{'deep' if deep else 'shallow'}"
                config = SoftMixtureConfig(
                    templates=templates[:k], tokenizer_name_or_path=str(self.train_tokenizer_dir), deep=deep
                )
                if pm is None:
                    pm = cast(PeftModelForSoftMixture, get_peft_model(base, config, adapter_name=name))
                else:
                    pm.add_adapter(name, config)
                names.append(name)
        assert isinstance(pm, PeftModelForSoftMixture)
        pm.to(device)
        embedding_table = cast(torch.nn.Embedding, pm.word_embeddings)
        pm.train()
        self.train_pm = pm
        print(f"mask-only LM head available (pm.mask_only_head): {pm.mask_only_head}", flush=True)

        batches: dict[str, dict[str, torch.Tensor]] = {}
        cases: list[Case] = []
        for name in names:
            pm.set_adapter(name)
            batches[name] = pm.encode(subjects, objects, device=device)
        optimizers = {
            name: torch.optim.Adam(
                [p for p in pm.prompt_encoder[name].parameters() if p.requires_grad],
                lr=1e-3,
                fused=device.type == "cuda",
            )
            for name in names
        }

        def tokens_of(batch: dict[str, torch.Tensor]) -> int:
            return int(batch["input_ids"].numel())

        def mixture_case(
            name: str,
            gather: bool = True,
            bf16: bool = False,
            dropout: bool = True,
            suffix: str = "",
            batch: dict[str, torch.Tensor] | None = None,
        ) -> Case:
            batch, optimizer = batch or batches[name], optimizers[name]
            gather_ok = pm.mask_only_head and gather

            def setup() -> None:
                pm.set_adapter(name)
                pm.mask_only_head = gather_ok
                pm.train()
                if not dropout:
                    base.eval()  # the frozen model without dropout; the adapter still trains

            def run() -> None:
                with self.amp(bf16):
                    out = pm(**batch, return_log_probs=False)  # as examples/train_trex.py's step
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return Case(f"mixture_{name}{suffix}", run, len(subjects), tokens_of(batch), setup)

        def bare_case(name: str, gather: bool = True, bf16: bool = False, suffix: str = "") -> Case:
            """The frozen model on exactly the mixture's tokens: forward, loss at the masks, backward to the input."""
            batch = batches[name]

            def setup() -> None:
                pm.train()

            run = bare_step(pm, batch, gather, lambda: self.amp(bf16))
            return Case(f"bare_{name.split('_')[0]}{suffix}", run, len(subjects), tokens_of(batch), setup)

        def kloop_case(name: str) -> Case:
            """The mixture computed one template at a time, each template padded only to its own length."""
            batch, optimizer = batches[name], optimizers[name]
            encoder = cast(SoftMixtureModel, pm.prompt_encoder[name])
            grid = template_grid(batch)
            B, K, _ = grid["input_ids"].shape
            backbone = cast(torch.nn.Module, find_backbone(base))
            pieces = []
            for k in range(K):
                length = int(grid["attention_mask"][:, k].sum(-1).max())
                piece = {key: grid[key][:, k, :length] for key in ("input_ids", "attention_mask", "roles")}
                piece["mask_positions"] = grid["mask_positions"][:, k]
                pieces.append(piece)
            labels = batch["labels"]

            def setup() -> None:
                pm.set_adapter(name)
                pm.train()

            def forward() -> torch.Tensor:
                """Each template's ``[B, V]`` log-probs, stacked to ``[B, K, V]``."""
                per_template = []
                for piece in pieces:
                    positions = SoftPositions.of(piece["roles"])
                    embeds = encoder(embedding_table(piece["input_ids"]), positions)
                    with contextlib.ExitStack() as stack:
                        if encoder.deep_offsets is not None:
                            stack.enter_context(
                                deep_prompt_hooks(pm.transformer_layers, encoder.deep_offsets, positions)
                            )
                        if gather_default:
                            stack.enter_context(gather_mask_positions(backbone, piece["mask_positions"]))
                        logits = base(inputs_embeds=embeds, attention_mask=piece["attention_mask"]).logits
                    logits = (
                        logits[:, 0]
                        if gather_default
                        else logits[torch.arange(B, device=device), piece["mask_positions"]]
                    )
                    per_template.append(torch.log_softmax(logits.float(), -1))
                return torch.stack(per_template, 1)

            def loss_of(per_template: torch.Tensor) -> torch.Tensor:
                # the gold's K log-probs mixed, as the batched loss does: the loop differs in the forwards only
                gold = per_template.gather(2, labels.view(B, 1, 1).expand(B, K, 1)).squeeze(2)
                return -mix_templates(gold, encoder.log_weights()).mean()

            def run() -> None:
                loss_of(forward()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            # the loop must compute the same mixture and loss as the batched forward
            pm.set_adapter(name)
            was_training = pm.training
            pm.eval()
            with torch.no_grad():
                per_template, batched = forward(), pm(**batch)
                mixed = mix_templates(per_template, encoder.log_weights())
                diff = (mixed - batched.log_probs).abs().max().item()
                diff = max(diff, (loss_of(per_template) - batched.loss).abs().item())
            pm.train(was_training)
            if diff > 1e-3:
                raise RuntimeError(f"K-loop and batched mixture disagree by {diff} for {name}")
            tokens = sum(int(piece["input_ids"].numel()) for piece in pieces)
            return Case(f"kloop_{name}", run, len(subjects), tokens, setup, {"max_abs_diff_vs_batched": diff})

        def prompt_tuning_case() -> Case:
            """PEFT PROMPT_TUNING: one soft prompt prepended to the first template's filled query, full LM head."""
            name = names[0]
            batch = batches[name]
            grid = template_grid(batch)
            n_virtual = max(1, sum(1 for r in grid["roles"][0, 0].tolist() if r >= 0))
            pt = get_peft_model(
                base,
                PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=n_virtual),
                adapter_name="peer",
            ).to(device)
            pt.train()
            optimizer = torch.optim.Adam(
                [p for p in pt.parameters() if p.requires_grad], lr=1e-3, fused=device.type == "cuda"
            )
            ids = grid["input_ids"][:, 0]
            attention = grid["attention_mask"][:, 0]
            masks = grid["mask_positions"][:, 0] + n_virtual
            labels = batch["labels"]
            rows = torch.arange(ids.shape[0], device=device)

            def run() -> None:
                logits = pt(input_ids=ids, attention_mask=attention).logits
                loss = -torch.log_softmax(logits[rows, masks].float(), -1).gather(1, labels[:, None]).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return Case(
                "peft_prompt_tuning",
                run,
                len(subjects),
                int(ids.numel()) + n_virtual * ids.shape[0],
                pt.train,
                {"num_virtual_tokens": n_virtual},
            )

        gather_default = pm.mask_only_head
        for k in ks:
            cases.append(bare_case(f"k{k}_shallow"))
            cases.append(mixture_case(f"k{k}_shallow"))
            cases.append(mixture_case(f"k{k}_deep"))
            if k > 1:
                cases.append(kloop_case(f"k{k}_shallow"))
        mid = f"k{5 if 5 in ks else ks[-1]}"
        cases.append(kloop_case(f"{mid}_deep"))
        if gather_default:  # the full head is dear on a CPU: this lever is timed at the smallest K
            cases.append(bare_case(f"k{ks[0]}_shallow", gather=False, suffix="_fullhead"))
            cases.append(mixture_case(f"k{ks[0]}_shallow", gather=False, suffix="_fullhead"))
        cases.append(mixture_case(f"{mid}_shallow", dropout=False, suffix="_no_dropout"))
        # length-bucketed training batches: 32 facts of similar length instead of 32 drawn at random
        pool = single or facts
        lengths = {s: len(tokenizer(s)["input_ids"]) for s, _ in pool}
        by_length = sorted(pool, key=lambda f: lengths[f[0]])
        start = max(0, len(by_length) // 2 - args.batch_facts // 2)
        bucket = by_length[start : start + args.batch_facts]
        pm.set_adapter(f"{mid}_shallow")
        bucket_batch = pm.encode([s for s, _ in bucket], [o for _, o in bucket], device=device)
        bucket_case = mixture_case(f"{mid}_shallow", suffix="_length_bucketed", batch=bucket_batch)
        bucket_case.info["real_tokens"] = int(bucket_batch["attention_mask"].sum())
        cases.append(bucket_case)
        self.train_padding = self.epoch_padding(pm, pool, lengths, args.batch_facts)
        if args.bf16:
            cases.append(bare_case(f"{mid}_shallow", bf16=True, suffix="_bf16"))
            cases.append(mixture_case(f"{mid}_shallow", bf16=True, suffix="_bf16"))
            cases.append(mixture_case(f"{mid}_deep", bf16=True, suffix="_bf16"))
        cases.append(prompt_tuning_case())

        # collating a batch (the query cache is warm): part of every real step, outside the timed steps above
        def encode_run() -> None:
            pm.encode(subjects, objects, device=device)

        encode_case = Case(
            f"encode_{mid}_warm_cache", encode_run, len(subjects), 0, lambda: pm.set_adapter(f"{mid}_shallow")
        )
        cases.append(encode_case)
        self.train_mid = mid
        for case in cases:
            case.info.setdefault("K", int(case.name.split("_k")[1].split("_")[0]) if "_k" in case.name else 1)
            if case.tokens and f"k{case.info['K']}_shallow" in batches:
                case.info.setdefault("real_tokens", int(batches[f"k{case.info['K']}_shallow"]["attention_mask"].sum()))
        return cases

    @staticmethod
    def epoch_padding(
        pm: PeftModelForSoftMixture, pool: list[tuple[str, str]], lengths: dict[str, int], size: int
    ) -> dict[str, float]:
        """Padded over real tokens for one epoch of the active adapter, random batches vs length-bucketed ones."""
        random_order = list(pool)
        random.Random(1).shuffle(random_order)
        # the usual bucket sampler: sort by length, cut into batches, shuffle the batches
        bucketed = sorted(pool, key=lambda f: lengths[f[0]])
        chunks = [bucketed[i : i + size] for i in range(0, len(bucketed), size)]
        random.Random(1).shuffle(chunks)
        result = {}
        for label, order in (("random", random_order), ("bucketed", [f for c in chunks for f in c])):
            padded = real = 0
            for i in range(0, len(order), size):
                batch = pm.encode([s for s, _ in order[i : i + size]])
                padded += batch["attention_mask"].numel()
                real += int(batch["attention_mask"].sum())
            result[label] = round(padded / real, 3)
        return result

    # -- evaluation -------------------------------------------------------------------------------------

    def eval_setup(self) -> tuple[PeftModelForSoftMixture, str, list[tuple[str, str]]]:
        """The evaluation groups' model, their K-template adapter (made active) and ``--eval_facts`` test facts."""
        args, pm = self.args, self.train_pm
        name = f"k{args.eval_k}_shallow"
        if name not in pm.peft_config:
            templates = relation_templates(self.data_dir, args.relation, args.eval_k)
            pm.add_adapter(
                name, SoftMixtureConfig(templates=templates, tokenizer_name_or_path=str(self.train_tokenizer_dir))
            )
        pm.set_adapter(name)
        facts = [f for f in relation_facts(self.data_dir, args.relation, "test") if f[0] and f[1]]
        return pm, name, (facts * (1 + args.eval_facts // max(1, len(facts))))[: args.eval_facts]

    def eval_cases(self) -> list[Case]:
        args, device = self.args, self.device
        pm, name, facts = self.eval_setup()
        tokenizer = pm.tokenizer
        subjects = [s for s, _ in facts]
        objects = [o for _, o in facts]
        vocab = (self.data_dir / "vocab" / "common_vocab_cased.txt").read_text(encoding="utf-8").split()
        ids = [tokenizer.convert_tokens_to_ids(w) for w in vocab]
        vocab_size = cast(torch.nn.Embedding, pm.word_embeddings).num_embeddings
        candidates = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        candidates[torch.tensor([i for i in ids if i != tokenizer.unk_token_id], device=device)] = True
        gather_default = pm.mask_only_head
        size = args.eval_batch_facts

        order_plain = list(range(len(facts)))
        lengths = [len(tokenizer(s)["input_ids"]) for s in subjects]
        order_sorted = sorted(order_plain, key=lambda i: lengths[i])
        pm.encode(subjects, objects)  # warm the query cache: the eval cases below time the model, not the tokenizer
        full_length = int(pm.encode(subjects)["input_ids"].shape[-1])

        def batches(order: list[int]) -> Iterator[tuple[list[str], list[str]]]:
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                yield [subjects[i] for i in chunk], [objects[i] for i in chunk]

        def evaluate(
            order: list[int],
            candidate_mask: torch.Tensor | None = None,
            grad_mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode,
            pad_to: int | None = None,
            bf16: bool = False,
        ) -> tuple[int, int]:
            hits = counted = 0
            with grad_mode(), self.amp(bf16):
                for chunk_subjects, chunk_objects in batches(order):
                    batch = pm.encode(chunk_subjects, chunk_objects, device=device)
                    if pad_to is not None:
                        batch = pad_batch(batch, pad_to, tokenizer.pad_token_id)
                    labels = batch.pop("labels")
                    log_probs = pm(**batch, candidate_mask=candidate_mask).log_probs
                    keep = labels >= 0
                    gold = log_probs[keep].gather(1, labels[keep, None])
                    ranks = (log_probs[keep] > gold).sum(1)
                    hits += int((ranks == 0).sum())
                    counted += int(keep.sum())
            return hits, counted

        def case(label: str, gather: bool = True, **kwargs: Any) -> Case:
            def setup() -> None:
                pm.set_adapter(name)
                pm.eval()
                pm.mask_only_head = gather_default and gather

            return Case(f"eval_{label}", lambda: evaluate(**kwargs), len(facts), 0, setup, {"K": args.eval_k})

        cases = [
            case("full_vocab_sorted", order=order_sorted),
            case("full_vocab_unsorted", order=order_plain),
            case("full_vocab_fixed_pad", order=order_plain, pad_to=full_length),
            case("common_vocab_sorted", order=order_sorted, candidate_mask=candidates),
            case("full_vocab_sorted_no_grad", order=order_sorted, grad_mode=torch.no_grad),
        ]
        if gather_default:
            cases.append(case("full_vocab_sorted_fullhead", gather=False, order=order_sorted))
        if args.bf16:
            cases.append(case("full_vocab_sorted_bf16", order=order_sorted, bf16=True))

        def query_setup() -> None:
            pm.set_adapter(name)
            pm.mask_only_head = gather_default

        cases.append(
            Case(
                "eval_query_api_top10",
                lambda: pm.query([subjects[i] for i in order_sorted], top_k=10, batch_size=size),
                len(facts),
                0,
                query_setup,
                {"K": args.eval_k},
            )
        )
        return cases

    # -- ranking candidate objects of any length (issue #17) ---------------------------------------------

    def candidate_cases(self) -> tuple[list[Case], dict[str, Any]]:
        """Facts per second ranking a relation's candidate objects (any length) against single-token evaluation over
        the vocabulary, on the same model, adapter and facts; and how the cost grows with the number of candidates."""
        args, device = self.args, self.device
        pm, name, facts = self.eval_setup()
        tokenizer = pm.tokenizer
        subjects = [s for s, _ in facts]
        # every distinct object of the relation that the tokenizer can write, of any length
        objects = [
            o for split in ("train", "dev", "test") for _, o in relation_facts(self.data_dir, args.relation, split)
        ]
        candidates = [o for o in dict.fromkeys(objects) if o and object_tokens(tokenizer, o)]
        lengths = Counter(len(object_tokens(tokenizer, c)) for c in candidates)
        size = args.eval_batch_facts
        pm.encode(subjects)  # warm the query cache, as in the eval group

        def single_token() -> None:
            with torch.inference_mode():
                for start in range(0, len(subjects), size):
                    pm(**pm.encode(subjects[start : start + size], device=device)).log_probs.argmax(-1)

        def ranked(chosen: list[str]) -> Callable[[], object]:
            return lambda: pm.score_candidates(subjects, chosen, batch_size=size)

        # the same distinct lengths with one candidate each: if the cost grows with lengths only, this costs as much
        one_per_length = list({len(object_tokens(tokenizer, c)): c for c in reversed(candidates)}.values())
        naive_candidates = one_per_length[:4]

        def naive() -> None:
            # one forward per candidate: the cost that grouping candidates by length avoids
            with torch.inference_mode():
                for candidate in naive_candidates:
                    for start in range(0, len(subjects), size):
                        chunk = subjects[start : start + size]
                        pm(**pm.encode(chunk, [candidate] * len(chunk), device=device, multi_token=True))

        def setup() -> None:
            pm.set_adapter(name)
            pm.eval()

        extra = {"K": args.eval_k}
        cases = [
            Case("cand_single_token_vocab", single_token, len(facts), 0, setup, extra),
            Case("cand_rank_one_per_length", ranked(one_per_length), len(facts), 0, setup, extra),
            Case("cand_rank_all", ranked(candidates), len(facts), 0, setup, extra),
            Case("cand_naive_loop", naive, len(facts), 0, setup, extra),
        ]
        naive_tokens = sum(len(object_tokens(tokenizer, c)) for c in naive_candidates)
        all_tokens = sum(len(object_tokens(tokenizer, c)) for c in candidates)
        info = {
            "candidates": len(candidates),
            "candidate_lengths": dict(sorted(lengths.items())),
            "naive_candidates": len(naive_candidates),
            # a naive loop's time grows with the candidates' tokens: the projection to all candidates
            "naive_to_all_scale": round(all_tokens / naive_tokens, 2),
        }
        return cases, info

    # -- causal LMs (issue #18) --------------------------------------------------------------------------

    def causal_cases(self) -> tuple[list[Case], dict[str, Any]]:
        """On a causal LM (``--causal_lm``, the causal probe LM by default): a training step of a K-template soft
        mixture against the bare frozen model on the same tokens, and candidate ranking from the prompts' key/value
        cache against a naive loop of one teacher-forced forward pass per candidate."""
        args, device = self.args, self.device
        base = load_language_model(args.causal_lm)
        torch.nn.Module.to(base, device)
        templates = relation_templates(self.data_dir, args.relation, args.eval_k)
        pm = cast(
            PeftModelForSoftMixture,
            get_peft_model(base, SoftMixtureConfig(templates=templates, tokenizer_name_or_path=args.causal_lm)),
        )
        facts = [f for f in relation_facts(self.data_dir, args.relation, "train") if f[0] and f[1]]
        facts = (facts * (1 + args.batch_facts // max(1, len(facts))))[: args.batch_facts]
        batch = pm.encode([s for s, _ in facts], [o for _, o in facts], device=device)
        optimizer = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
        frozen = pm.get_base_model()
        ids, attention = batch["input_ids"], batch["attention_mask"]
        where, targets = batch["target_positions"], batch["target_ids"]
        backbone = cast(torch.nn.Module, find_backbone(frozen))

        def mixture_step() -> None:
            loss = pm(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def bare() -> None:
            # the floor: the frozen model on the same tokens, the same head at the target positions, backward to
            # the input embeddings
            embeds = pm.word_embeddings(ids).detach().requires_grad_()
            with gather_mask_positions(backbone, where):
                logits = frozen(inputs_embeds=embeds, attention_mask=attention).logits
            valid = targets >= 0
            picked = torch.log_softmax(logits.float(), -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
            (-(picked * valid).sum() / len(facts)).backward()

        test = [f for f in relation_facts(self.data_dir, args.relation, "test") if f[0] and f[1]][: args.eval_facts]
        subjects = [s for s, _ in test]
        objects = [
            o for split in ("train", "dev", "test") for _, o in relation_facts(self.data_dir, args.relation, split)
        ]
        candidates = [o for o in dict.fromkeys(objects) if o and object_tokens(pm.tokenizer, o, exact=True)]
        candidates = candidates[: args.causal_candidates]

        def cached() -> None:
            pm.score_candidates(subjects, candidates, batch_size=args.eval_batch_facts)

        def naive() -> None:
            with torch.inference_mode():
                for candidate in candidates:
                    for start in range(0, len(subjects), args.eval_batch_facts):
                        chunk = subjects[start : start + args.eval_batch_facts]
                        pm(**pm.encode(chunk, [candidate] * len(chunk), device=device))

        def train_mode() -> None:
            pm.train()

        def eval_mode() -> None:
            pm.eval()

        K = args.eval_k
        cases = [
            Case("causal_mixture_step", mixture_step, len(facts), 0, train_mode, {"K": K}),
            Case("causal_bare_step", bare, len(facts), 0, train_mode, {"K": K}),
            Case("causal_rank_cached", cached, len(subjects), 0, eval_mode, {"K": K}),
            Case("causal_rank_naive_loop", naive, len(subjects), 0, eval_mode, {"K": K}),
        ]
        lengths = Counter(len(object_tokens(pm.tokenizer, c, exact=True)) for c in candidates)
        return cases, {
            "model": args.causal_lm,
            "candidates": len(candidates),
            "lengths": dict(sorted(lengths.items())),
        }

    # -- the whole T-REx test split ---------------------------------------------------------------------

    def trex_model(self) -> tuple[BertForMaskedLM, str, str]:
        probe = Path(self.args.probe_lm)
        if (probe / "config.json").is_file():
            model = BertForMaskedLM.from_pretrained(probe)
            torch.nn.Module.to(model, self.device)
            return model, str(probe), f"probe LM {probe}"
        texts = []
        for relation in sorted(p.name for p in (self.data_dir / "trex").iterdir() if p.is_dir()):
            for split in ("train", "test"):
                texts += [x for fact in relation_facts(self.data_dir, relation, split) for x in fact if x]
        tok_dir = build_tokenizer(texts, PRESETS["probe"][4], self.tmp / "tok-probe")
        return random_mlm("probe", self.device), str(tok_dir), "random model of the probe LM's shape"

    def test_facts(self, relation: str, per_relation: int | None) -> list[tuple[str, str]]:
        """A relation's T-REx test facts with a subject and an object, the first ``per_relation`` of them if given."""
        facts = [f for f in relation_facts(self.data_dir, relation, "test") if f[0] and f[1]]
        return facts if per_relation is None else facts[:per_relation]

    def with_relation_adapter(
        self, pm: PeftModelForSoftMixture | None, base: Any, relation: str, tok_dir: str
    ) -> PeftModelForSoftMixture:
        """``pm`` with an adapter named ``relation`` of the relation's first K templates (built on ``base`` if
        ``pm`` is None)."""
        config = SoftMixtureConfig(
            templates=relation_templates(self.data_dir, relation, self.args.eval_k), tokenizer_name_or_path=tok_dir
        )
        if pm is None:
            return cast(PeftModelForSoftMixture, get_peft_model(base, config, adapter_name=relation))
        pm.add_adapter(relation, config)
        return pm

    def trex_eval(self, relations: list[str], per_relation: int | None) -> dict[str, Any]:
        """Evaluate T-REx test facts, K templates per relation, from a cold query cache."""
        args, device = self.args, self.device
        assert self.trex_model_cache is not None, "call trex_model() first"
        base, tok_dir, what = self.trex_model_cache
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        pm: PeftModelForSoftMixture | None = None
        n_facts = hits = counted = too_long = 0
        setup_s = encode_s = 0.0
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for relation in relations:
            facts = self.test_facts(relation, per_relation)
            t0 = time.perf_counter()
            pm = self.with_relation_adapter(pm, base, relation, tok_dir)
            pm.set_adapter(relation)
            pm.eval()
            setup_s += time.perf_counter() - t0
            lengths = [len(s) for s, _ in facts]
            order = sorted(range(len(facts)), key=lambda i: lengths[i])
            with torch.inference_mode(), self.amp(args.bf16):
                for i in range(0, len(order), args.eval_batch_facts):
                    chunk = [facts[j] for j in order[i : i + args.eval_batch_facts]]
                    t1 = time.perf_counter()
                    limit = pm.max_query_length
                    if limit is not None:
                        # queries longer than the model's positions cannot be scored: skip those facts
                        fits = [n <= limit for n in pm.query_lengths([s for s, _ in chunk])]
                        too_long += fits.count(False)
                        chunk = [fact for fact, ok in zip(chunk, fits) if ok]
                        if not chunk:
                            continue
                    batch = pm.encode([s for s, _ in chunk], device=device)
                    # labels apart: a batch may hold no single-token object at all (encode refuses to label it)
                    labels = object_labels(pm, [o for _, o in chunk], device)
                    encode_s += time.perf_counter() - t1
                    log_probs = pm(**batch).log_probs
                    keep = labels >= 0
                    gold = log_probs[keep].gather(1, labels[keep, None])
                    hits += int(((log_probs[keep] > gold).sum(1) == 0).sum())
                    counted += int(keep.sum())
            n_facts += len(facts)
        synchronize(device)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        del tokenizer
        return {
            "facts": n_facts,
            "seconds": total,
            "process_cpu_s": cpu,
            "adapter_setup_s": setup_s,
            "skipped_longer_than_model": too_long,
            "encode_s": encode_s,
            "relations": len(relations),
            "model": what,
            "scored": counted,
            "p_at_1": hits / max(1, counted),
        }

    def trex_eval_mixed(self, relations: list[str], per_relation: int | None) -> dict[str, Any]:
        """The same facts as `trex_eval`, served the way a multi-relation service would: all adapters loaded, every
        relation's queries tokenised in one batch call, and the facts of all relations sorted by query length into
        mixed-adapter batches (``encode(..., adapter_names=...)``, one forward pass each)."""
        args, device = self.args, self.device
        assert self.trex_model_cache is not None, "call trex_model() first"
        base, tok_dir, what = self.trex_model_cache
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        pm: PeftModelForSoftMixture | None = None
        facts: list[tuple[str, str]] = []
        names: list[str] = []
        by_relation: dict[str, list[tuple[str, str]]] = {}
        for relation in relations:
            rel_facts = by_relation[relation] = self.test_facts(relation, per_relation)
            pm = self.with_relation_adapter(pm, base, relation, tok_dir)
            facts += rel_facts
            names += [relation] * len(rel_facts)
        assert pm is not None
        pm.eval()
        setup_s = time.perf_counter() - start
        t1 = time.perf_counter()
        lengths: list[int] = []
        gold_ids: list[int] = []  # each fact's object token id (-100: not one token)
        for relation, rel_facts in by_relation.items():  # one batch call of the tokenizer per relation, cached
            processor = pm.get_processor(relation)
            lengths += processor.query_lengths([s for s, _ in rel_facts])
            gold_ids += [-100 if t is None else t for t in processor.object_ids([o for _, o in rel_facts])]
        limit = pm.max_query_length
        fits = [i for i, n in enumerate(lengths) if limit is None or n <= limit]
        order = sorted(fits, key=lengths.__getitem__)
        encode_s = time.perf_counter() - t1
        hits = counted = 0
        with torch.inference_mode(), self.amp(args.bf16):
            for i in range(0, len(order), args.eval_batch_facts):
                chunk = order[i : i + args.eval_batch_facts]
                chunk_names = [names[j] for j in chunk]
                t2 = time.perf_counter()
                batch = pm.encode([facts[j][0] for j in chunk], device=device, adapter_names=chunk_names)
                labels = torch.tensor([gold_ids[j] for j in chunk], device=device)
                encode_s += time.perf_counter() - t2
                log_probs = pm(**batch, adapter_names=chunk_names).log_probs
                keep = labels >= 0
                gold = log_probs[keep].gather(1, labels[keep, None])
                hits += int(((log_probs[keep] > gold).sum(1) == 0).sum())
                counted += int(keep.sum())
        synchronize(device)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return {
            "facts": len(facts),
            "seconds": total,
            "process_cpu_s": cpu,
            "adapter_setup_s": setup_s,
            "skipped_longer_than_model": len(facts) - len(fits),
            "encode_s": encode_s,
            "relations": len(relations),
            "model": what,
            "scored": counted,
            "p_at_1": hits / max(1, counted),
        }


def object_labels(pm: PeftModelForSoftMixture, objects: list[str], device: torch.device, name: str | None = None):
    """Each object's token id (-100 when it is not one token) through an adapter's public processor."""
    ids = pm.get_processor(name).object_ids(objects)
    return torch.tensor([-100 if i is None else i for i in ids], device=device)


def pad_batch(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the [N, T] tensors of a batch to ``length`` positions (fixed padding, for comparison)."""
    out = dict(batch)
    extra = length - batch["input_ids"].shape[-1]
    if extra > 0:
        for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("roles", -1)):
            out[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
    return out


# --------------------------------------------------------------------------------------------------- main


def ratio(cases: dict[str, Case], numerator: str, denominator: str) -> float | None:
    if numerator in cases and denominator in cases:
        return round(cases[numerator].median_s / cases[denominator].median_s, 3)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small", help="Model shape for train/eval.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="Timed calls of every training case (3 on CPU, 5 on GPU).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed calls of every case first.")
    parser.add_argument(
        "--min_call_ms",
        type=float,
        help="Each timed call repeats a step until it lasts this long; times are per step (0 on CPU, 150 on GPU).",
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="Mixture sizes K to train.")
    parser.add_argument("--batch_facts", type=int, default=32, help="Facts per training batch.")
    parser.add_argument("--relation", default="P19", help="T-REx relation whose facts and templates are used.")
    parser.add_argument("--eval_k", type=int, default=5)
    parser.add_argument("--eval_facts", type=int, help="Facts per evaluation case (192 on CPU, 2048 on GPU).")
    parser.add_argument("--eval_batch_facts", type=int, help="Facts per evaluation batch (64 on CPU, 256 on GPU).")
    parser.add_argument("--eval_repeats", type=int, default=3, help="Timed calls of every evaluation case.")
    parser.add_argument("--trex_sample_relations", type=int, default=6, help="Relations sampled for the estimate.")
    parser.add_argument("--trex_sample_facts", type=int, default=200, help="Test facts per sampled relation.")
    parser.add_argument("--full_trex_eval", action="store_true", help="Evaluate the whole T-REx test split.")
    parser.add_argument("--bf16", action="store_true", help="Also time bf16 autocast (Accelerate) variants.")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "eval", "candidates", "causal", "trex"])
    parser.add_argument("--causal_lm", default=str(DEFAULT_CAUSAL_LM), help="The causal LM of the causal group.")
    parser.add_argument("--causal_candidates", type=int, default=40, help="Candidates the causal group ranks.")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--probe_lm", default=str(DEFAULT_PROBE_LM))
    parser.add_argument(
        "--keep_denormals",
        action="store_true",
        help="Time CPU training steps with denormal floats kept (the library's loop flushes them on a CPU).",
    )
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.repeats = args.repeats or (5 if on_gpu else 3)
    if args.min_call_ms is None:
        args.min_call_ms = 150.0 if on_gpu else 0.0
    args.eval_facts = args.eval_facts or (2048 if on_gpu else 192)
    args.eval_batch_facts = args.eval_batch_facts or (256 if on_gpu else 64)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not (Path(args.data_dir) / "trex").is_dir():
        raise SystemExit(
            f"No T-REx data under {args.data_dir}; pass --data_dir (the folder with trex/ and templates/)."
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch sees no GPU; use --device cpu.")
    torch.manual_seed(0)
    device = torch.device(args.device)
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    )
    print(
        f"torch {torch.__version__}, device {device} ({machine}), threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, preset {args.preset} {PRESETS[args.preset]}, "
        f"repeats {args.repeats} (eval {args.eval_repeats}), warmup {args.warmup}, min call {args.min_call_ms:g} ms, "
        f"bf16 {args.bf16}",
        flush=True,
    )
    bench = Bench(args)
    # training steps run as in the library's loop (RelationTrainer): denormals flushed on a CPU
    flush = device.type == "cpu" and not args.keep_denormals
    started = time.perf_counter()
    cases: dict[str, Case] = {}
    if "train" not in args.skip or "eval" not in args.skip:
        train = bench.train_cases()
        if "train" not in args.skip:
            with flush_denormals(flush):
                time_round_robin(train, args.repeats, args.warmup, device, args.min_call_ms / 1e3)
            report("train (one step on a batch of facts)", train, cases)
        if "eval" not in args.skip:
            evals = bench.eval_cases()
            time_round_robin(evals, args.eval_repeats, args.warmup, device, args.min_call_ms / 1e3)
            report(f"eval ({args.eval_facts} facts, {args.eval_batch_facts} per batch)", evals, cases)

    if "candidates" not in args.skip:
        if not hasattr(bench, "train_pm"):
            bench.train_cases()  # builds the model and tokenizer the evaluation groups share
        ranking, ranking_info = bench.candidate_cases()
        time_round_robin(ranking, args.eval_repeats, args.warmup, device, args.min_call_ms / 1e3)
        report(f"candidates ({args.eval_facts} facts, {ranking_info})", ranking, cases)

    if "causal" not in args.skip:
        causal, causal_info = bench.causal_cases()
        with flush_denormals(flush):
            time_round_robin(causal, args.repeats, args.warmup, device, args.min_call_ms / 1e3)
        report(f"causal ({causal_info})", causal, cases)

    summary: dict[str, Any] = {"device": str(device), "machine": machine, "preset": args.preset}
    by_min: dict[str, float] = {}
    by_cpu: dict[str, float] = {}

    def add(key: str, numerator: str, denominator: str) -> None:
        """Time ratio numerator / denominator by median wall time, and by minimum and by process CPU time."""
        if numerator not in cases or denominator not in cases:
            return
        top, bottom = cases[numerator], cases[denominator]
        summary[key] = round(top.median_s / bottom.median_s, 3)
        by_min[key] = round(min(top.times) / min(bottom.times), 3)
        by_cpu[key] = round(statistics.median(top.cpu_times) / statistics.median(bottom.cpu_times), 3)

    mid = getattr(bench, "train_mid", "k5")
    low = f"k{min(args.ks)}"
    add("mixture_step_over_bare", f"mixture_{mid}_shallow", f"bare_{mid}")
    add("batched_over_kloop_speedup", f"kloop_{mid}_shallow", f"mixture_{mid}_shallow")
    for k in args.ks:
        for kind in ("shallow", "deep"):
            add(f"mixture_step_over_bare_k{k}_{kind}", f"mixture_k{k}_{kind}", f"bare_k{k}")
        if k > 1:
            add(f"batched_over_kloop_speedup_k{k}_shallow", f"kloop_k{k}_shallow", f"mixture_k{k}_shallow")
    add(f"batched_over_kloop_speedup_{mid}_deep", f"kloop_{mid}_deep", f"mixture_{mid}_deep")
    add(f"mask_head_speedup_train_{low}", f"mixture_{low}_shallow_fullhead", f"mixture_{low}_shallow")
    add(f"bare_mask_head_speedup_{low}", f"bare_{low}_fullhead", f"bare_{low}")
    add("mixture_k1_over_peft_prompt_tuning", "mixture_k1_shallow", "peft_prompt_tuning")
    add(f"mixture_{mid}_over_peft_prompt_tuning", f"mixture_{mid}_shallow", "peft_prompt_tuning")
    add(f"no_dropout_speedup_train_{mid}", f"mixture_{mid}_shallow", f"mixture_{mid}_shallow_no_dropout")
    add(f"length_bucketed_speedup_train_{mid}", f"mixture_{mid}_shallow", f"mixture_{mid}_shallow_length_bucketed")
    if hasattr(bench, "train_padding"):
        summary[f"train_epoch_padded_over_real_tokens_{mid}_random_batches"] = bench.train_padding["random"]
        summary[f"train_epoch_padded_over_real_tokens_{mid}_bucketed_batches"] = bench.train_padding["bucketed"]
    add(f"encode_warm_over_step_{mid}", f"encode_{mid}_warm_cache", f"mixture_{mid}_shallow")
    add(f"bf16_speedup_train_{mid}_shallow", f"mixture_{mid}_shallow", f"mixture_{mid}_shallow_bf16")
    add(f"bf16_mixture_step_over_bare_{mid}", f"mixture_{mid}_shallow_bf16", f"bare_{mid}_bf16")
    add("bf16_speedup_eval", "eval_full_vocab_sorted", "eval_full_vocab_sorted_bf16")
    add("eval_common_over_full_vocab", "eval_common_vocab_sorted", "eval_full_vocab_sorted")
    add("eval_sorted_speedup", "eval_full_vocab_unsorted", "eval_full_vocab_sorted")
    add("eval_dynamic_pad_speedup", "eval_full_vocab_fixed_pad", "eval_full_vocab_unsorted")
    add("eval_inference_mode_over_no_grad_speedup", "eval_full_vocab_sorted_no_grad", "eval_full_vocab_sorted")
    add("eval_mask_head_speedup", "eval_full_vocab_sorted_fullhead", "eval_full_vocab_sorted")
    add("eval_query_api_over_eval", "eval_query_api_top10", "eval_full_vocab_sorted")
    for name in ("full_vocab", "common_vocab"):
        if f"eval_{name}_sorted" in cases:
            summary[f"eval_facts_per_s_{name}"] = round(args.eval_facts / cases[f"eval_{name}_sorted"].median_s, 1)
    if "candidates" not in args.skip:
        summary["candidates"] = ranking_info
        for case_name in ("cand_single_token_vocab", "cand_rank_all"):
            summary[f"{case_name}_facts_per_s"] = round(args.eval_facts / cases[case_name].median_s, 1)
        add("cand_rank_all_over_single_token_eval", "cand_rank_all", "cand_single_token_vocab")
        add("cand_rank_all_over_one_per_length", "cand_rank_all", "cand_rank_one_per_length")
        add("cand_naive_loop_over_rank_all", "cand_naive_loop", "cand_rank_all")
        if "cand_naive_loop_over_rank_all" in summary:
            projected = summary["cand_naive_loop_over_rank_all"] * ranking_info["naive_to_all_scale"]
            summary["cand_naive_loop_projected_to_all_over_rank_all"] = round(projected, 1)
    if "causal" not in args.skip:
        summary["causal"] = causal_info
        add("causal_mixture_step_over_bare", "causal_mixture_step", "causal_bare_step")
        add("causal_naive_loop_over_cached_ranking", "causal_rank_naive_loop", "causal_rank_cached")
    # on a shared machine a step that lost its core is slow by chance: the minimum and (with one thread) the
    # process CPU time are steadier estimates than the median wall time
    summary["ratios_by_min_wall_time"] = by_min
    summary["ratios_by_median_process_cpu_time"] = by_cpu
    if "trex" not in args.skip:
        bench.trex_model_cache = bench.trex_model()
        relations = sorted(p.name for p in (Path(args.data_dir) / "trex").iterdir() if p.is_dir())
        if args.full_trex_eval:
            # the per-relation loop and mixed-adapter batches, each from a cold query cache, in one process
            result = bench.trex_eval(relations, None)
            mixed = bench.trex_eval_mixed(relations, None)
            mixed["facts_per_s"] = round(mixed["facts"] / mixed["seconds"], 1)
            print(json.dumps({"group": "trex", "case": "trex_test_eval_mixed_adapters", "full": True, **mixed}))
            summary["trex_test_eval_mixed_adapters_s"] = round(mixed["seconds"], 1)
            summary["trex_test_eval_per_relation_s"] = round(result["seconds"], 1)
            minutes = result["seconds"] / 60
        else:
            picked = random.Random(0).sample(relations, min(args.trex_sample_relations, len(relations)))
            bench.trex_eval(picked[:1], 32)  # warm-up: first adapter, kernels
            result = bench.trex_eval(picked, args.trex_sample_facts)
            per_fact = (result["seconds"] - result["adapter_setup_s"]) / result["facts"]
            per_relation = result["adapter_setup_s"] / result["relations"]
            minutes = (TREX_TEST_FACTS * per_fact + len(relations) * per_relation) / 60
        result["facts_per_s"] = round(result["facts"] / result["seconds"], 1)
        print(f"\n== T-REx test evaluation (K={args.eval_k}, {result['model']}) ==")
        print(json.dumps({"group": "trex", "case": "trex_test_eval", "full": args.full_trex_eval, **result}))
        print(
            f"{result['facts']} facts of {result['relations']} relations in {result['seconds']:.1f} s "
            f"({result['facts_per_s']} facts/s, adapter setup {result['adapter_setup_s']:.1f} s): "
            f"{'measured' if args.full_trex_eval else 'projected'} {minutes:.1f} minutes for {TREX_TEST_FACTS:,} facts"
        )
        summary["trex_test_eval_minutes"] = round(minutes, 2)
        summary["trex_test_eval_measured"] = bool(args.full_trex_eval)
        summary["trex_eval_facts_per_s"] = result["facts_per_s"]
        summary["trex_eval_model"] = result["model"]

    summary["total_benchmark_s"] = round(time.perf_counter() - started, 1)
    summary = {k: v for k, v in summary.items() if v is not None}
    print()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
