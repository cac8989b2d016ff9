"""Offline test fixtures: tiny tokenizers of the three families and tiny random configs of every masked-LM type.

Nothing here touches the Hub. Each tokenizer is built in memory, saved to a folder and reloaded through
`AutoTokenizer`, the way a user's tokenizer reaches `SoftMixtureConfig(tokenizer_name_or_path=...)`. Its vocabulary
holds a fixed word list (every LAMA template word plus some subjects and objects) as whole words, and single
characters so that any ASCII subject still tokenises.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import (
    AlbertTokenizer,
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    RobertaTokenizer,
    XLMRobertaTokenizer,
)

# Every word of the 41 LAMA T-REx templates, and a few subjects/objects for the tests.
_WORD_LIST = """
    . , ' s The University a affiliated after aired and are at awarded border born by capital cities citizen
    communicate consists created developed died diplomatic educated field for founded has headquarter in is label
    language legal located maintains member music named native of official on original originally owned part
    participated party plays political position produced profession relations religion represented shares subclass
    term the to twin used was with work works written from city country lives Dante Florence Paris Rome Milan Italy
    France Berlin Germany London England Einstein Newton Kant Vienna Madrid Spain English French German Italian
    Latin physics philosophy poet painter jazz piano guitar Google Microsoft Apple Sony Honda Toyota Japan Tokyo
    """
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())
CHARACTERS: tuple[str, ...] = tuple(string.ascii_letters + string.digits + string.punctuation)

WORDPIECE = "wordpiece"
BPE = "bpe"
UNIGRAM = "unigram"


def wordpiece_tokenizer(target_dir: str | Path, words: tuple[str, ...] = WORDS) -> str:
    """A cased BERT-style WordPiece tokenizer (``[CLS] ... [SEP]``, ``[MASK]``); returns the saved folder."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = specials + list(dict.fromkeys([*words, *CHARACTERS, *("##" + c for c in CHARACTERS)]))
    tokenizer = BertTokenizer(vocab={piece: i for i, piece in enumerate(pieces)}, do_lower_case=False)
    return _save_and_check(tokenizer, Path(target_dir) / "wordpiece", "[MASK]")


def bpe_tokenizer(target_dir: str | Path, words: tuple[str, ...] = WORDS) -> str:
    """A RoBERTa-style byte-level BPE tokenizer (``<s> ... </s>``, ``<mask>`` that eats the space before it).

    Every word is one token after a space (``Ġword``); at the start of a text it is spelled out byte by byte. The
    merges only ever extend a ``Ġ``-prefix by one character, so they never compete and the result is exact.
    """
    vocab, merges = byte_level_vocabulary(["<s>", "<pad>", "</s>", "<unk>"], words)
    vocab["<mask>"] = len(vocab)
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, mask_token=mask)
    return _save_and_check(tokenizer, Path(target_dir) / "bpe", "<mask>")


def byte_level_vocabulary(
    specials: list[str], words: tuple[str, ...] = WORDS
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges in which every word is one ``Ġword`` token (see `bpe_tokenizer`)."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab: dict[str, int] = {}
    for piece in specials + sorted(ByteLevel.alphabet()):
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in (*CHARACTERS, *words):  # single characters first, so unknown words still start with 'Ġx'
        prefix = "Ġ"
        for char in word:
            if prefix + char not in vocab:
                vocab[prefix + char] = len(vocab)
                merges.append((prefix, char))
            prefix += char
    return vocab, merges


def unigram_tokenizer(target_dir: str | Path, words: tuple[str, ...] = WORDS, mask_token: str = "<mask>") -> str:
    """A SentencePiece/Unigram tokenizer with ``▁`` word starts.

    ``mask_token="<mask>"`` gives the XLM-R/CamemBERT layout (``<s> ... </s>``), ``"[MASK]"`` the ALBERT/DeBERTa-v2
    one (``[CLS] ... [SEP]``). Whole words score far above spelling them out, so known words are one token.
    """
    word_pieces = [("▁" + w, -1.0) for w in words]
    char_pieces = [("▁", -8.0)] + [(c, -10.0) for c in CHARACTERS] + [("▁" + c, -9.0) for c in CHARACTERS]
    if mask_token == "<mask>":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        vocab = [(s, 0.0) for s in specials] + _dedupe(word_pieces + char_pieces) + [("<mask>", 0.0)]
        tokenizer = XLMRobertaTokenizer(vocab=vocab)
        folder = "unigram"
    elif mask_token == "[MASK]":
        specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
        vocab = [(s, 0.0) for s in specials] + _dedupe(word_pieces + char_pieces)
        tokenizer = AlbertTokenizer(vocab=vocab, do_lower_case=False, keep_accents=True)
        folder = "unigram_bracket_mask"
    else:
        raise ValueError(f"mask_token must be '<mask>' or '[MASK]', got {mask_token!r}.")
    return _save_and_check(tokenizer, Path(target_dir) / folder, mask_token)


def _dedupe(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    seen: dict[str, float] = {}
    for piece, score in pieces:
        seen.setdefault(piece, score)
    return list(seen.items())


def _save_and_check(tokenizer, folder: Path, mask_token: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    reloaded = AutoTokenizer.from_pretrained(str(folder))
    # a fixture that silently lost its vocabulary would make every test downstream meaningless
    if reloaded.mask_token != mask_token or reloaded.mask_token_id is None or len(reloaded) < len(WORDS):
        raise RuntimeError(f"The test tokenizer saved in {folder} did not reload intact: {reloaded!r}")
    if reloaded.tokenize(" Florence") not in (["Florence"], ["ĠFlorence"], ["▁Florence"]):
        raise RuntimeError(f"The test tokenizer in {folder} splits 'Florence': {reloaded.tokenize(' Florence')}")
    return str(folder)


def build_tokenizers(target_dir: str | Path) -> dict[str, str]:
    """All four tokenizers under ``target_dir``: family name -> saved folder."""
    return {
        WORDPIECE: wordpiece_tokenizer(target_dir),
        BPE: bpe_tokenizer(target_dir),
        UNIGRAM: unigram_tokenizer(target_dir, mask_token="<mask>"),
        UNIGRAM + "_bracket": unigram_tokenizer(target_dir, mask_token="[MASK]"),
    }


# -- tiny random configs of every masked-LM type ---------------------------------------------------------------

# The tokenizer family each model type ships with (the shape of its vocabulary and special tokens).
_FAMILY_MEMBERS: dict[str, tuple[str, ...]] = {
    WORDPIECE: (
        *("bert", "convbert", "distilbert", "electra", "ernie", "funnel", "layoutlm", "megatron-bert"),
        *("mobilebert", "mpnet", "nomic_bert", "perceiver", "roc_bert", "roformer", "squeezebert", "tapas"),
        *("flaubert", "xlm", "esm", "esmc"),
    ),
    BPE: (
        *("roberta", "roberta-prelayernorm", "data2vec-text", "ibert", "longformer", "luke", "bart", "mvp"),
        *("deberta", "mra", "yoso", "modernbert", "eurobert", "ultrabert", "neomme", "modernvbert", "ultravbert"),
    ),
    UNIGRAM: ("xlm-roberta", "xlm-roberta-xl", "camembert", "mbart", "xmod", "gte", "jina_embeddings_v3"),
    UNIGRAM + "_bracket": ("albert", "deberta-v2", "big_bird", "fnet", "nystromformer", "rembert", "reformer"),
}
TOKENIZER_FAMILY: dict[str, str] = {
    model_type: family for family, members in _FAMILY_MEMBERS.items() for model_type in members
}

HIDDEN = 32
LAYERS = 2
HEADS = 2
FFN = 64
MAX_POSITIONS = 64

# Generic knobs under their various names; each is set only where the config has that attribute.
_GENERIC: dict[str, int] = {
    **dict.fromkeys(["hidden_size", "d_model", "dim", "emb_dim", "d_latents"], HIDDEN),
    **dict.fromkeys(["num_hidden_layers", "n_layers", "encoder_layers", "decoder_layers"], LAYERS),
    **dict.fromkeys(
        [
            "num_attention_heads",
            "n_heads",
            "n_head",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "num_key_value_heads",
            "num_self_attention_heads",
            "num_cross_attention_heads",
        ],
        HEADS,
    ),
    **dict.fromkeys(
        ["intermediate_size", "hidden_dim", "encoder_ffn_dim", "decoder_ffn_dim", "feed_forward_size"], FFN
    ),
    # factorised embeddings (ALBERT, ELECTRA, MobileBERT, RemBERT) narrower than the hidden states, as in checkpoints
    **dict.fromkeys(["embedding_size", "input_embedding_size", "output_embedding_size"], HIDDEN // 2),
    "pooler_hidden_size": HIDDEN,
    "head_dim": HIDDEN // HEADS,
    "d_head": HIDDEN // HEADS,
    "d_inner": FFN,
    "attention_head_size": HIDDEN // HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    "max_2d_position_embeddings": MAX_POSITIONS,
}

# Where the defaults are huge or the generic knobs leave the config inconsistent.
_OVERRIDES: dict[str, dict[str, Any]] = {
    # scaled embeddings (as in mBART checkpoints) check that soft words are scaled like the table's output
    **dict.fromkeys(["bart", "mbart", "mvp"], {"scale_embedding": True, "decoder_layers": LAYERS + 1}),
    "funnel": {"block_sizes": [1, 1], "block_repeats": [1, 1], "num_decoder_layers": 1},
    "squeezebert": {
        **dict.fromkeys(
            ["q_groups", "k_groups", "v_groups", "post_attention_groups", "intermediate_groups", "output_groups"], 1
        ),
        "embedding_size": HIDDEN,
    },
    "reformer": {
        "attn_layers": ["local", "local"],
        "axial_pos_shape": [8, 8],
        "axial_pos_embds_dim": [16, 16],
        "local_attn_chunk_length": 8,
        "is_decoder": False,
    },
    "xmod": {"languages": ["en_XX"], "default_language": "en_XX"},
    "mobilebert": {"intra_bottleneck_size": HIDDEN, "true_hidden_size": HIDDEN, "num_feedforward_networks": 1},
    "big_bird": {"attention_type": "original_full", "block_size": 4, "num_random_blocks": 1},
    "luke": {"entity_vocab_size": 8, "entity_emb_size": 16},
    "roc_bert": {
        "pronunciation_embed_dim": 16,
        "pronunciation_vocab_size": 8,
        "shape_embed_dim": 16,
        "shape_vocab_size": 8,
    },
    "longformer": {"attention_window": 4},
    # num_landmarks == segment_means_seq_len selects exact softmax attention, which takes any length
    "nystromformer": {"segment_means_seq_len": MAX_POSITIONS, "num_landmarks": MAX_POSITIONS, "conv_kernel_size": 3},
    "perceiver": {"num_latents": 8, "num_self_attends_per_block": 1, "qk_channels": HIDDEN, "v_channels": HIDDEN},
    "deberta": {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "max_relative_positions": 16},
    "deberta-v2": {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "position_buckets": 8},
    "mra": {"block_per_row": 2, "max_position_embeddings": 128},
    "yoso": {"max_position_embeddings": 128},
    "tapas": {"type_vocab_sizes": [3, 4, 4, 2, 4, 4, 4]},
}

# Attributes a config computes itself and refuses to be given.
_DERIVED: dict[str, tuple[str, ...]] = {"funnel": ("num_hidden_layers",)}


def tiny_config(
    model_type: str,
    vocab_size: int,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    **overrides: Any,
) -> PretrainedConfig:
    """A tiny random config (hidden 32, 2 layers) of ``model_type``, for a vocabulary of ``vocab_size`` tokens.

    Composite configs (a text model plus a vision tower) get tiny sub-configs too.
    """
    defaults = AutoConfig.for_model(model_type)
    special = {"vocab_size": vocab_size, "pad_token_id": pad_token_id}
    if bos_token_id is not None:
        special["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        special.update(eos_token_id=eos_token_id, decoder_start_token_id=eos_token_id)
    kwargs = _shrunk(defaults)
    kwargs.update(special)
    for name in ("text_config", "vision_config"):
        sub = getattr(defaults, name, None)
        if isinstance(sub, PretrainedConfig):
            sub_kwargs = {**sub.to_dict(), **_shrunk(sub), **(special if name == "text_config" else {})}
            if name == "vision_config":
                sub_kwargs.update(image_size=32, patch_size=8)
            kwargs[name] = sub_kwargs
    kwargs.update(_OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    for name in _DERIVED.get(model_type, ()):
        kwargs.pop(name, None)
    return AutoConfig.for_model(model_type, **kwargs)


def _shrunk(defaults: PretrainedConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {name: value for name, value in _GENERIC.items() if hasattr(defaults, name)}
    if getattr(defaults, "layer_types", None) is not None:
        kwargs["layer_types"] = ["full_attention"] * LAYERS
    return kwargs


def tiny_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A random masked LM from ``config``, the same for the same seed, in eval mode.

    Some types initialise residual output projections to zero (NeoMME), which would make every token blind to the
    others; those all-zero matrices get small random values, so that a prompt's words matter.
    """
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)
    return model.eval()


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The special token ids of ``tokenizer``, as `tiny_config` keyword arguments."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
        "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }
