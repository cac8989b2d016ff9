"""Run the soft-mixture checks on a tiny random model of every masked-LM (or causal-LM) type in transformers.

``--kind masked`` (the default) runs the end-to-end check of every `AutoModelForMaskedLM` type and writes
``docs/architectures.json``; ``--kind causal`` runs the architecture-level check of every `AutoModelForCausalLM`
type (tests/causal_architecture_check.py) and writes ``docs/architectures_causal.json``. Either then renders
``docs/supported-architectures.md`` from both files (the tables users read; never edit it by hand, rerun this
script):

    OMP_NUM_THREADS=1 python scripts/architecture_matrix.py [--kind causal] [--types bert roberta ...]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

ROOT = Path(__file__).resolve().parents[1]
# the tiny models and the end-to-end check are test helpers (tests/factories.py, tests/architecture_check.py)
sys.path.insert(0, str(ROOT / "tests"))

from architecture_check import PADDING_SENSITIVE, ArchitectureCheck, check_architecture  # noqa: E402
from causal_architecture_check import CausalArchitectureCheck, check_causal_architecture  # noqa: E402
from causal_factories import tiny_causal_config, tiny_causal_model  # noqa: E402
from factories import TOKENIZER_FAMILY, build_tokenizers, special_token_ids, tiny_config, tiny_model  # noqa: E402

from peft_softmix.architectures import unsupported_reason  # noqa: E402

# a type whose tiny model takes longer than this to build and check is reported as not checked
CAUSAL_TIME_LIMIT = 60
# a causal check failing here says nothing about soft prompts: the tiny model does not build or run by itself
NOT_CHECKED_STAGES = ("building the model", "frozen forward")


def model_factory(model_type: str, tokenizer_path: str):
    """A function returning the same tiny random masked LM of ``model_type`` on every call."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = tiny_config(model_type, len(tokenizer), **special_token_ids(tokenizer))

    return lambda: tiny_model(config)


def run_matrix(types: list[str], tokenizer_dir: str) -> dict[str, dict[str, ArchitectureCheck]]:
    tokenizers = build_tokenizers(tokenizer_dir)
    results: dict[str, dict[str, ArchitectureCheck]] = {}
    for model_type in types:
        tokenizer_path = tokenizers[TOKENIZER_FAMILY[model_type]]
        make = model_factory(model_type, tokenizer_path)
        results[model_type] = {
            "shallow": check_architecture(make, tokenizer_path, deep=False),
            "deep": check_architecture(make, tokenizer_path, deep=True),
        }
        for depth, check in results[model_type].items():
            status = "ok" if check.ok else ("unsupported" if check.unsupported else f"FAIL at {check.stage}")
            print(f"{model_type:22s} {depth:8s} {status:40s} {check.seconds:6.2f}s {check.error or ''}"[:400])
    return results


def _outcome(check: ArchitectureCheck) -> dict:
    # no timings and no float noise in the files, so that regenerating them on an unchanged tree changes nothing
    outcome = check.to_dict()
    outcome.pop("seconds")
    for name in ("init_gap", "unpadded_gap", "reload_gap"):
        if outcome.get(name) is not None:
            outcome[name] = float(f"{outcome[name]:.1e}")
    return outcome


def _cell(outcome: dict) -> str:
    if outcome["ok"]:
        return "yes"
    if outcome["unsupported"]:
        return "no (unsupported)"
    return f"no (fails at {outcome['stage']})"


def _notes(model_type: str, outcomes: dict[str, dict]) -> str:
    notes = []
    for outcome in outcomes.values():
        if not outcome["ok"] and outcome["error"]:
            # the error names the class and type already; keep the reason only
            notes.append(outcome["error"].split(": ", 1)[-1])
            break
    gap = outcomes["shallow"].get("unpadded_gap")
    if model_type in PADDING_SENSITIVE and gap is not None:
        notes.append(
            f"Batched queries differ from one-at-a-time ones (by up to {gap:.1e} in log-probability here): "
            f"{PADDING_SENSITIVE[model_type]}"
        )
    return " ".join(notes).replace("|", "\\|").replace("\n", " ")


def write_docs(results: dict[str, dict[str, ArchitectureCheck]], docs: Path) -> None:
    shallow = sum(r["shallow"].ok for r in results.values())
    deep = sum(r["deep"].ok for r in results.values())
    payload = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "counts": {"types": len(results), "shallow_ok": shallow, "deep_ok": deep},
        "architectures": {
            name: {
                "model_class": MODEL_FOR_MASKED_LM_MAPPING_NAMES[name],
                "tokenizer_family": TOKENIZER_FAMILY[name],
                "shallow": _outcome(checks["shallow"]),
                "deep": _outcome(checks["deep"]),
            }
            for name, checks in results.items()
        },
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "architectures.json").write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    render_docs(docs)


def render_docs(docs: Path) -> None:
    """Write docs/supported-architectures.md from docs/architectures.json and docs/architectures_causal.json."""
    lines = [
        "# Supported architectures",
        "",
        "<!-- Generated by scripts/architecture_matrix.py from docs/architectures.json and "
        "docs/architectures_causal.json; do not edit by hand. -->",
        "",
    ]
    masked_path, causal_path = docs / "architectures.json", docs / "architectures_causal.json"
    if masked_path.exists():
        lines += _masked_section(json.loads(masked_path.read_text(encoding="utf-8")))
    if causal_path.exists():
        lines += _causal_section(json.loads(causal_path.read_text(encoding="utf-8")))
    lines += [
        "Regenerate with `OMP_NUM_THREADS=1 python scripts/architecture_matrix.py` (masked LMs) and "
        "`OMP_NUM_THREADS=1 python scripts/architecture_matrix.py --kind causal` (causal LMs).",
        "",
    ]
    (docs / "supported-architectures.md").write_text("\n".join(lines), encoding="utf-8")


def _masked_section(payload: dict) -> list[str]:
    counts, table = payload["counts"], payload["architectures"]
    total, shallow, deep = counts["types"], counts["shallow_ok"], counts["deep_ok"]
    lines = [
        "## Masked LMs",
        "",
        f"Every masked-LM type that `AutoModelForMaskedLM` knows in transformers {payload['transformers_version']} "
        f"({total} types), checked end to end on a tiny random model with a tokenizer of its family: "
        "`get_peft_model`, the template-initialised mixture reproducing the hard prompts (to 1e-5), gradients "
        "reaching the soft words (and deep offsets), a training step, and save / `PeftModel.from_pretrained` "
        "giving identical predictions.",
        "",
        f"**Shallow prompts work on {shallow} of {total} types; deep prompts on {deep} of {total}.**",
        "",
        "| model_type | class | tokenizer family | shallow | deep | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in table.items():
        outcomes = {"shallow": entry["shallow"], "deep": entry["deep"]}
        lines.append(
            f"| `{name}` | `{entry['model_class']}` | {entry['tokenizer_family']} | "
            f"{_cell(entry['shallow'])} | {_cell(entry['deep'])} | {_notes(name, outcomes)} |"
        )
    return [*lines, ""]


# -- causal LMs ---------------------------------------------------------------------------------------------------


@contextmanager
def _time_limit(seconds: int):
    """Raise TimeoutError in the main thread once ``seconds`` have passed (some tiny configs are not tiny)."""

    def expire(signum, frame):
        raise TimeoutError(f"building and checking the tiny model took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_causal_matrix(types: list[str]) -> dict[str, dict]:
    """Each causal-LM type's entry of docs/architectures_causal.json."""
    entries: dict[str, dict] = {}
    for model_type in types:
        entry: dict = {"model_class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "checked": False}
        try:
            with _time_limit(CAUSAL_TIME_LIMIT):
                config = tiny_causal_config(model_type)
                check = check_causal_architecture(lambda config=config: tiny_causal_model(config))
        except Exception as err:  # the tiny config cannot be built here: the type is reported as not checked
            entry["not_checked"] = f"{type(err).__name__}: {err}".strip()[:300]
            check = None
        if check is not None and check.stage in NOT_CHECKED_STAGES:
            # the tiny random model does not build or run by itself here: nothing about the hooks was learnt
            entry["not_checked"], check = check.error, None
        if check is not None:
            entry["checked"] = True
            entry.update(_causal_outcome(check))
        # the library's own tables decide what a user is told; the check shows they are right
        entry["unsupported"] = unsupported_reason(model_type, deep=False, lm="causal")
        entry["deep_unsupported"] = unsupported_reason(model_type, deep=True, lm="causal")
        entries[model_type] = entry
        status = "not checked" if check is None else f"shallow {int(check.shallow)} deep {int(check.deep)}"
        note = entry.get("not_checked") or entry.get("error") or entry.get("cache_error") or ""
        print(f"{model_type:26s} {status:20s} cache {entry.get('cache')!s:8s} {note}"[:300], flush=True)
    return entries


def _causal_outcome(check: CausalArchitectureCheck) -> dict:
    # no timings and no float noise in the files, so that regenerating them on an unchanged tree changes nothing
    outcome = check.to_dict()
    outcome.pop("seconds")
    outcome["gaps"] = {name: float(f"{gap:.1e}") for name, gap in outcome["gaps"].items()}
    return outcome


def causal_counts(entries: dict[str, dict]) -> dict[str, int]:
    """Types supported shallow and deep: the check passes and the tables do not refuse them."""
    shallow = [e for e in entries.values() if e["checked"] and e["shallow"] and not e["unsupported"]]
    deep = [e for e in shallow if e["deep"] and not e["deep_unsupported"]]
    return {
        "types": len(entries),
        "shallow_ok": len(shallow),
        "deep_ok": len(deep),
        "cache_exact": sum(e["cache"] == "exact" for e in shallow),
        "not_checked": sum(not e["checked"] for e in entries.values()),
    }


def write_causal_docs(entries: dict[str, dict], docs: Path) -> None:
    payload = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "counts": causal_counts(entries),
        "architectures": entries,
    }
    docs.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    (docs / "architectures_causal.json").write_text(text, encoding="utf-8")
    render_docs(docs)


def _causal_cell(entry: dict, depth: str) -> str:
    if entry["unsupported"] or (depth == "deep" and entry["deep_unsupported"]):
        return "no (unsupported)"
    if not entry["checked"]:
        return "not checked"
    if entry[depth]:
        return "yes"
    return f"no (fails at {entry['stage']})"


def _causal_notes(entry: dict) -> str:
    notes = []
    reason = entry["unsupported"] or entry["deep_unsupported"]
    if reason:
        notes.append(reason.split(": ", 1)[-1])
    elif not entry["checked"]:
        notes.append(f"The tiny random model could not be built here: {entry['not_checked']}")
    elif entry["error"]:
        notes.append(f"Fails: {entry['error']}")
    if entry.get("cache_error"):
        notes.append(f"Cache: {entry['cache_error']}")
    return " ".join(notes).replace("|", "\\|").replace("\n", " ")


def _causal_section(payload: dict) -> list[str]:
    counts, table = payload["counts"], payload["architectures"]
    total = counts["types"]

    def share(n: int) -> str:
        return f"{n} of {total} types ({100 * n / total:.0f}%)"

    lines = [
        "## Causal LMs",
        "",
        f"Every causal-LM type that `AutoModelForCausalLM` knows in transformers {payload['transformers_version']} "
        f"({total} types), checked at the architecture level on a tiny random model (`tests/causal_architecture_"
        "check.py`): `model_kind` says causal; a soft word initialised from its token reproduces the frozen "
        "logits exactly; a soft word at position p leaves the logits before p unchanged (bitwise, or to float "
        "rounding for the few types that reduce over the whole sequence; `gaps` in the JSON), changes every "
        "position from p on and gets a gradient (shallow); zero deep offsets reproduce the frozen logits, and "
        "offsets at p in every layer call act causally and all get gradients (deep). The cache column says whether "
        "scoring the tokens after a prefix from the prefix's key/value cache (with the soft word and offsets in the "
        "prefix) gives the full forward's logits, to 1e-5.",
        "",
        f"**Soft words work on {share(counts['shallow_ok'])}; deep prompts on {share(counts['deep_ok'])}. The "
        f"cache path is exact on {counts['cache_exact']} of the {counts['shallow_ok']} shallow-supported types.**"
        + (f" {counts['not_checked']} types could not be built as tiny models here." if counts["not_checked"] else ""),
        "",
        "A causal LM is scored by the causal path ([Causal LMs](causal.md)): the object's own tokens by the chain "
        "rule after the filled prompt, never at a `[MASK]` position (which could not see the words after it). "
        "End to end, `tests/test_causal.py` checks on GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3, "
        "Phi, Phi3, OPT, GPT-NeoX, Falcon, Bloom and Mamba that a template-initialised adapter gives the frozen "
        "model's log-probabilities of the object, through `encode`/forward and through `score_candidates`. Types "
        "whose cache is not exact score candidates with one full pass each (`CAUSAL_CACHE_UNUSABLE`).",
        "",
        "| model_type | class | shallow | deep | cache | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in table.items():
        cache = entry.get("cache") or "-"
        lines.append(
            f"| `{name}` | `{entry['model_class']}` | {_causal_cell(entry, 'shallow')} | "
            f"{_causal_cell(entry, 'deep')} | {cache} | {_causal_notes(entry)} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["masked", "causal"], default="masked", help="which LM types to check")
    parser.add_argument("--types", nargs="*", help="model types to check (default: all types of the kind)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where to write the files")
    parser.add_argument("--no-write", action="store_true", help="print the outcomes only")
    args = parser.parse_args()
    mapping = MODEL_FOR_MASKED_LM_MAPPING_NAMES if args.kind == "masked" else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    types = args.types or (sorted(mapping) if args.kind == "causal" else list(mapping))
    unknown = [t for t in types if t not in mapping]
    if unknown:
        parser.error(f"not {args.kind}-LM model types: {unknown}; choose from {sorted(mapping)}")
    start = time.perf_counter()
    if args.kind == "causal":
        entries = run_causal_matrix(types)
        counts = causal_counts(entries)
        print(
            f"shallow {counts['shallow_ok']}/{counts['types']}, deep {counts['deep_ok']}/{counts['types']}, "
            f"cache exact {counts['cache_exact']}, {time.perf_counter() - start:.1f} s"
        )
        if not args.no_write and not args.types:
            write_causal_docs(entries, args.docs)
        return
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        results = run_matrix(types, tokenizer_dir)
    seconds = time.perf_counter() - start
    shallow = sum(r["shallow"].ok for r in results.values())
    deep = sum(r["deep"].ok for r in results.values())
    print(f"shallow {shallow}/{len(results)}, deep {deep}/{len(results)}, {seconds:.1f} s")
    if not args.no_write and not args.types:
        write_docs(results, args.docs)


if __name__ == "__main__":
    main()
