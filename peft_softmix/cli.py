"""The ``peft-softmix`` command line: ask a saved adapter, score it on a facts file, look inside it.

    peft-softmix ask ADAPTER "Dante Alighieri" [--top_k 5] [--max_tokens 3 [--strategy independent]]
                     [--candidates FILE] [--length_normalized] [--base MODEL] [--json]
    peft-softmix evaluate ADAPTER --facts test.jsonl [--common_vocab FILE] [--json]
    peft-softmix evaluate ADAPTER --facts test.jsonl --multi_token [--candidates FILE] [--json]
    peft-softmix inspect ADAPTER [--top_n 5] [--json]

A thin layer over the library: `PeftModel.from_pretrained` (whose loader treats the adapter as untrusted input, see
docs/reliability.md "Trust model"), `query`, `peft_softmix.evaluation` with the ``fact_retrieval`` metric, and
`peft_softmix.inspection`. ``ADAPTER`` is a folder or a Hub id. The base model is the one the adapter names, loaded
without remote code and from safetensors only; ``--base`` (a folder or Hub id) is the user's own choice of base and
is loaded as transformers would. Progress goes to stderr, results to stdout; bad input ends with a one-line
``Error:`` on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app", "main"]

# the library's default, repeated here so that `--help` needs no torch import (tests/test_decoding.py checks it)
DEFAULT_STRATEGY = "independent"

app = typer.Typer(
    name="peft-softmix",
    help="Ask, evaluate and inspect mixture-of-soft-prompts adapters (peft_softmix).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

# what a Hub id looks like: "name" or "owner/name" (a path that does not exist and looks otherwise is a typo'd folder)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CliError(Exception):
    """A problem with the command's input, reported as one line without a traceback."""


@contextmanager
def _reported() -> Iterator[None]:
    """Turn the library's input errors into ``Error: ...`` on stderr and exit status 1."""
    from .errors import AdapterLoadError, DataFormatError, QueryTooLongError, TemplateError

    try:
        yield
    except (CliError, AdapterLoadError, DataFormatError, QueryTooLongError, TemplateError) as problem:
        _fail(str(problem))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, OSError) as problem:
        _fail(f"{type(problem).__name__}: {problem}")


def _fail(message: str) -> None:
    err.print(f"[bold red]Error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


# -- loading ---------------------------------------------------------------------------------------------------


def _check_adapter_source(adapter: str) -> None:
    if os.path.exists(adapter):
        if not os.path.isdir(adapter):
            raise CliError(f"{adapter} is a file; ADAPTER is the folder that save_pretrained wrote (or a Hub id).")
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise CliError(
                f"{adapter} holds no adapter_config.json, so it is not a saved adapter; give the folder that "
                "save_pretrained wrote."
            )
    elif not _HUB_ID.match(adapter):
        raise CliError(f"Adapter folder {adapter} does not exist (and it is not a Hub id like 'owner/name').")


def load_adapter_model(
    adapter: str, base: str | None = None, tokenizer: str | None = None, device: str = "auto"
) -> Any:
    """The adapter on its base model, ready to query: the base named in the adapter's config unless ``base``.

    A base the adapter names is loaded with ``trust_remote_code=False`` and ``use_safetensors=True`` (the file chose
    it, so it may not make the loader unpickle anything); ``base`` and ``tokenizer`` are the user's choice.
    """
    import torch
    from peft import PeftModel

    from .base_models import load_language_model
    from .config import SoftMixtureConfig

    _check_adapter_source(adapter)
    options: dict[str, Any] = {"trust_remote_code": False}
    if base is None:
        try:
            config = SoftMixtureConfig.from_pretrained(adapter)
        except (OSError, ValueError) as problem:
            if os.path.isdir(adapter):
                raise
            raise CliError(
                f"{adapter} is not a local folder, and as a Hub id its adapter_config.json cannot be fetched "
                f"({problem}). Check the name, your connection and HF_HUB_OFFLINE."
            ) from None
        base = config.base_model_name_or_path
        if not base:
            raise CliError(f"The adapter {adapter} names no base model; pass --base MODEL (a folder or Hub id).")
        options["use_safetensors"] = True
        whose = f"named by {adapter}"
    else:
        whose = "given with --base"
    try:
        base_model = load_language_model(base, **options)  # a masked or a causal LM, as its config says
    except (OSError, ValueError) as problem:
        raise CliError(f"Cannot load the base model {base!r} {whose} ({problem}). Pass --base MODEL.") from None
    model = PeftModel.from_pretrained(base_model, adapter, tokenizer=tokenizer)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return model.to(torch.device(device)).eval()
    except (RuntimeError, AssertionError) as problem:
        raise CliError(f"Cannot use --device {device!r}: {problem}") from None


def _load(adapter: str, base: str | None, tokenizer: str | None, device: str) -> Any:
    with err.status(f"Loading {adapter} ..."):
        return load_adapter_model(adapter, base, tokenizer, device)


# -- options shared by the commands ----------------------------------------------------------------------------

AdapterArg = Annotated[str, typer.Argument(help="Adapter folder (written by save_pretrained) or Hub id.")]
BaseOpt = Annotated[
    str | None, typer.Option("--base", help="Base model folder or Hub id (default: the one the adapter names).")
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option("--tokenizer", help="Your consent to a tokenizer the adapter names other than the base model's."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="'cpu', 'cuda', 'cuda:1', ... or 'auto'.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
LengthNormalizedOpt = Annotated[
    bool,
    typer.Option("--length_normalized", "--length-normalized", help="Rank answers by log p(y|x) per token."),
]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# -- ask -------------------------------------------------------------------------------------------------------


@app.command()
def ask(
    adapter: AdapterArg,
    subjects: Annotated[list[str], typer.Argument(help='One or more subjects, e.g. "Dante Alighieri".')],
    top_k: Annotated[int, typer.Option("--top_k", "--top-k", min=1, help="How many answers per subject.")] = 5,
    max_tokens: Annotated[
        int, typer.Option("--max_tokens", "--max-tokens", help="Decode answers of up to this many tokens.")
    ] = 1,
    strategy: Annotated[
        str, typer.Option("--strategy", help="How to fill the masks: independent, left_to_right or confidence.")
    ] = DEFAULT_STRATEGY,
    candidates: Annotated[
        str | None,
        typer.Option("--candidates", help="Rank these objects (any length), one per line of a UTF-8 file."),
    ] = None,
    length_normalized: LengthNormalizedOpt = False,
    base: BaseOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The top answers for each subject, with each template's share of the answer's score."""
    with _reported():
        from .decoding import check_decoding_options
        from .objects import read_candidates

        check_decoding_options(max_tokens, strategy)  # before any model is loaded
        objects = read_candidates(candidates) if candidates is not None else None
        model = _load(adapter, base, tokenizer, device)
        results = model.query(
            list(subjects),
            top_k=top_k,
            max_tokens=max_tokens,
            strategy=strategy,
            candidates=objects,
            length_normalized=length_normalized,
        )
    if as_json:
        _print_json(results)
        return
    templates = model.processor.templates
    for item in results:
        table = Table(title=f"{item['subject']}  ({item['adapter']})", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("answer")
        table.add_column("score", justify="right")
        table.add_column("template shares (" + ", ".join(f"t{k}" for k in range(len(templates))) + ")")
        for rank, pred in enumerate(item["predictions"], start=1):
            shares = " ".join(f"{share:.2f}" for share in pred["template_shares"])
            table.add_row(str(rank), pred["token_str"], f"{pred['score']:.4f}", shares)
        out.print(table)
    out.print("\n".join(f"t{k}: {t}" for k, t in enumerate(templates)))


# -- evaluate --------------------------------------------------------------------------------------------------


@app.command()
def evaluate(
    adapter: AdapterArg,
    facts: Annotated[str, typer.Option("--facts", help="A .jsonl file of facts (sub_label/obj_label or sub/obj).")],
    common_vocab: Annotated[
        str | None,
        typer.Option("--common_vocab", "--common-vocab", help="Rank among these words only (LAMA's common vocab)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch_size", "--batch-size", min=1, help="Facts per batch.")] = 64,
    multi_token: Annotated[
        bool,
        typer.Option(
            "--multi_token", "--multi-token", help="Objects of any length: rank candidate objects (all facts)."
        ),
    ] = False,
    candidates: Annotated[
        str | None,
        typer.Option(help="With --multi_token: the candidate objects, one per line (default: the file's objects)."),
    ] = None,
    length_normalized: LengthNormalizedOpt = False,
    base: BaseOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """P@1, P@10 and MRR of the adapter on a facts file (the library's evaluation and fact_retrieval metric)."""
    with _reported():
        from .facts import load_facts

        if not multi_token and (candidates is not None or length_normalized):
            raise CliError("--candidates and --length_normalized rank objects of any length: add --multi_token.")
        if multi_token and common_vocab is not None:
            raise CliError("--common_vocab ranks single tokens; with --multi_token give --candidates FILE.")
        split = load_facts(facts)  # read first: a bad line is reported before any model is loaded
        model = _load(adapter, base, tokenizer, device)
        if multi_token:
            from .candidate_evaluation import evaluate_facts_among_candidates

            result = evaluate_facts_among_candidates(
                model, split, candidates, batch_size, length_normalized, progress=True
            )
        else:
            from .file_evaluation import evaluate_facts

            result = evaluate_facts(model, split, common_vocab, batch_size, progress=True)
        result = {"adapter": adapter, "facts_file": facts, **result}
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"{adapter} on {facts}", title_justify="left")
    if multi_token:
        table.add_column("facts whose object is")
    for name in ("P@1", "P@10", "MRR", "facts"):
        table.add_column(name, justify="right")
    groups = {"all": "any length", "single_token": "one token", "multi_token": "several tokens"}
    for key, label in groups.items() if multi_token else [("all", "")]:
        s = result if key == "all" else result[key]
        cells = [f"{s['p@1']:.4f}", f"{s['p@10']:.4f}", f"{s['mrr']:.4f}", str(s["facts"])] if s else ["–"] * 3 + ["0"]
        table.add_row(*([label] if multi_token else []), *cells)
    out.print(table)
    if multi_token:
        how = "log p per token" if length_normalized else "log p"
        missing = result["gold_not_a_candidate"]
        out.print(
            f"ranked by {how} among {result['candidates']} candidates"
            + (f"; {missing} gold object(s) not among them, ranked last" if missing else "")
        )
    left_out = {why: n for why, n in result["left_out"].items() if n}
    if left_out:
        out.print("left out: " + ", ".join(f"{n} ({why.replace('_', ' ')})" for why, n in left_out.items()))


# -- inspect ---------------------------------------------------------------------------------------------------


@app.command()
def inspect(
    adapter: AdapterArg,
    top_n: Annotated[
        int, typer.Option("--top_n", "--top-n", min=1, help="Nearest vocabulary words per soft word.")
    ] = 5,
    base: BaseOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Mixture weights, and each soft word's nearest vocabulary words and distance from its starting token."""
    from .inspection import inspect_adapter

    with _reported():
        model = _load(adapter, base, tokenizer, device)
        report = inspect_adapter(model, top_n=top_n)
    if as_json:
        _print_json(report.to_dict())
        return
    out.print(f"[bold]{adapter}[/] on {report.base_model} (init: {report.init})", markup=True)
    weights = Table(title="Mixture weights", title_justify="left")
    weights.add_column("#", justify="right")
    weights.add_column("weight", justify="right")
    weights.add_column("template")
    for k, template in enumerate(report.templates):
        weights.add_row(str(k), f"{template.weight:.4f}", template.template)
    out.print(weights)
    for k, template in enumerate(report.templates):
        table = Table(title=f"t{k}: {template.template}", title_justify="left")
        table.add_column("soft word (start)")
        table.add_column("moved", justify="right")
        table.add_column("moved / |start|", justify="right")
        table.add_column("nearest vocabulary words (cosine)")
        deep = template.words and template.words[0].deep_offset_norm is not None
        if deep:
            table.add_column("deep offsets", justify="right")
        for word in template.words:
            nearest = ", ".join(f"{token} {cos:.2f}" for token, cos in word.nearest)
            row = [word.token, f"{word.moved:.4f}", f"{word.relative_move:.3f}", nearest]
            if deep:
                row.append(f"{word.deep_offset_norm:.4f}")
            table.add_row(*row)
        out.print(table)


def main() -> None:
    """The ``peft-softmix`` entry point."""
    import warnings

    from transformers.utils import logging as hf_logging

    # a command line prints its answer; the libraries' loading bars and deprecation notes would bury it
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    app()


if __name__ == "__main__":
    main()
