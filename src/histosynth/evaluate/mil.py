"""DISC's slide-level grading model (Sec. 2.4): multiple-instance learning on frozen tile features, real + synthetic.

A *bag* is one slide (a region of a region store, or one generated tile set): N tile features ``(N, C)`` and a
multi-hot target over K grades (DISC: the primary and the secondary Gleason grade, Sec. 2.4). The model pools the
N features (attention pooling) and a linear layer gives K logits, read through a **sigmoid** each (multi-label;
DISC replaces TransMIL's softmax by a sigmoid), trained with binary cross-entropy, ``L_slide`` (:func:`slide_loss`).

Architectures (:func:`build_mil_model`):

``attention`` (default): gated attention MIL, Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
    Learning", ICML 2018 (eq. 9), with one attention branch per grade (:class:`GatedAttentionMIL`). The default over
    TransMIL because it has less than half the parameters (181k vs 430k for 1280-d features and 4 grades;
    ``parameter_count`` in the results) and no tile-to-tile attention to fit: a region store or a generated set
    gives tens to hundreds of bags, not the thousands TransMIL was tuned on (on the planted-tile task of
    tests/test_mil.py it reaches AUROC 1 in 200 steps where TransMIL-lite needs far more bags and steps); its
    attention weights also say which tiles decided.
``transmil``: TransMIL-lite: TransMIL's class token and two transformer layers (Shao et al., NeurIPS 2021), without
    its Nyström attention and PPEG position encoding (bags here are small and have no tile grid).

Training (:func:`train_mil`) draws, at each step, one real bag and one synthetic bag (each in its own seeded
epoch-wise shuffle) and minimises DISC eq. 4, ``L_total = (1 - λ)·L_real_slide + λ·L_synthesized_slide``
(:func:`balanced_loss`); λ = 0 never draws or runs a synthetic bag. AdamW with Ilse et al.'s lr 5e-4 and weight
decay 1e-4. Features are standardised by the mean / std of the real training tiles (stored in the model).

Evaluation (:func:`auroc_per_class`): AUROC per class on real test bags (DISC Sec. 3), scikit-learn's
``roc_auc_score``; a class whose test targets are all 0 or all 1 has no AUROC (null, with a note) and is left out
of the macro mean. :func:`lambda_sweep` trains one model per λ (DISC sweeps λ in [0, 0.9]) and tabulates them.
Bags: :mod:`histosynth.evaluate.mil_bags`; the ``histosynth evaluate mil`` run and its plots:
:mod:`histosynth.evaluate.mil_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from histosynth.errors import HistosynthError

__all__ = ["ARCHITECTURES", "Bag", "GatedAttentionMIL", "TransMILLite", "build_mil_model", "slide_loss",
           "balanced_loss", "train_mil", "predict", "auroc_per_class", "lambda_sweep"]

ARCHITECTURES = ("attention", "transmil")


@dataclass
class Bag:
    """One slide for MIL.

    features:  float32 ``(N, C)``, N >= 1 tile features.
    labels:    float32 ``(K,)`` multi-hot target, values 0 or 1.
    source:    the slide / region / tile set it came from.
    synthetic: True for a generated tile set.
    split:     "train" / "test" when the store says so for all its tiles, else None.
    """

    features: np.ndarray
    labels: np.ndarray
    source: str
    synthetic: bool = False
    split: str | None = None

    def __post_init__(self):
        self.features = np.asarray(self.features, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        if self.features.ndim != 2 or self.features.shape[0] < 1:
            raise ValueError(f"bag {self.source}: features must be (N >= 1, C), got {self.features.shape}")
        if self.labels.ndim != 1 or not np.isin(self.labels, (0.0, 1.0)).all():
            raise ValueError(f"bag {self.source}: labels must be a multi-hot (K,) vector, got {self.labels}")


class _MIL(nn.Module):
    """Shared by both architectures: the feature standardisation buffers and the (N, C) / (B, N, C) input rule."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    def set_standardisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def _inputs(self, x: torch.Tensor, mask: torch.Tensor | None):
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(0)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return (x - self.feature_mean) / self.feature_std, mask, single


class GatedAttentionMIL(_MIL):
    """Gated attention MIL (Ilse et al. 2018, eq. 9) with one attention branch per class:
    ``h_i = ReLU(W x_i)``, ``a_ik = softmax_i(w_kᵀ(tanh(V h_i) ⊙ sigm(U h_i)))``, ``z_k = Σ_i a_ik h_i``,
    ``logit_k = c_kᵀ z_k + b_k``.

    One branch per class (as CLAM's multi-branch head, Lu et al., Nat. Biomed. Eng. 2021) because the target is
    multi-label: a 3+4 slide's GG3 and GG4 evidence lie in different tiles, which one shared attention map would
    have to split between; on a planted-tile task (tests/test_mil.py) the shared map learns far slower. It adds only
    ``(attention_dim + 1)·(K - 1)`` weights. ``per_class=False`` is Ilse et al.'s single map with a linear K-way head.

    ``forward(x, mask=None)``: x float32 ``(N, C)`` (one bag) or ``(B, N, C)`` with mask bool ``(B, N)`` (True =
    a tile) → logits ``(K,)`` / ``(B, K)`` and attention weights ``(N, A)`` / ``(B, N, A)``, A = K branches (1 when
    not ``per_class``), each >= 0 and summing to 1 over a bag's tiles (0 on padding).
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128, attention_dim: int = 64, dropout: float = 0.0,
                 per_class: bool = True):
        super().__init__(in_dim)
        branches = num_classes if per_class else 1
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention_dim)
        self.attention_u = nn.Linear(hidden, attention_dim)
        self.attention_w = nn.Linear(attention_dim, branches)
        self.head = nn.Linear(hidden, num_classes)  # per class: row k reads branch k's pooled vector only

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask, single = self._inputs(x, mask)
        h = self.embed(x)  # (B, N, hidden)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))  # (B, N, A)
        weights = torch.softmax(scores.masked_fill(~mask[..., None], float("-inf")), dim=1)
        pooled = torch.einsum("bna,bnh->bah", weights, h)  # (B, A, hidden)
        if pooled.shape[1] == 1:
            logits = self.head(pooled[:, 0])
        else:
            logits = (pooled * self.head.weight).sum(-1) + self.head.bias
        return (logits[0], weights[0]) if single else (logits, weights)


class TransMILLite(_MIL):
    """TransMIL's class token + ``layers`` pre-norm transformer layers (Shao et al. 2021, without Nyström attention
    and PPEG). ``forward(x, mask=None)`` as :class:`GatedAttentionMIL`'s; its attention output is None."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 128, heads: int = 4, layers: int = 2,
                 dropout: float = 0.0):
        super().__init__(in_dim)
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask, single = self._inputs(x, mask)
        h = self.embed(x)
        h = torch.cat([self.class_token.expand(h.shape[0], -1, -1), h], dim=1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)  # True = padding
        logits = self.head(self.norm(self.encoder(h, src_key_padding_mask=pad)[:, 0]))
        return (logits[0], None) if single else (logits, None)


def build_mil_model(architecture: str, in_dim: int, num_classes: int) -> nn.Module:
    """``"attention"`` → :class:`GatedAttentionMIL`, ``"transmil"`` → :class:`TransMILLite` (HistosynthError
    naming --architecture otherwise)."""
    if architecture == "attention":
        return GatedAttentionMIL(in_dim, num_classes)
    if architecture == "transmil":
        return TransMILLite(in_dim, num_classes)
    raise HistosynthError(f"unknown --architecture {architecture!r}: one of {', '.join(ARCHITECTURES)}")


def slide_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DISC's ``L_slide`` (Sec. 2.4): binary cross-entropy of sigmoid outputs against a multi-hot target,
    ``-mean_k [y_k log σ(z_k) + (1 - y_k) log(1 - σ(z_k))]`` (the paper prints it without the minus sign).
    logits, targets: float ``(K,)`` or ``(B, K)``, targets in {0, 1}. Returns a scalar."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def balanced_loss(real: torch.Tensor | None, synthetic: torch.Tensor | None, balance: float) -> torch.Tensor:
    """DISC eq. 4: ``(1 - λ)·L_real + λ·L_synthesized``, λ = ``balance`` in [0, 1]; a term whose weight is 0 may be
    None (not computed)."""
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance λ must lie in [0, 1], got {balance}")
    total = None
    for weight, term in ((1.0 - balance, real), (balance, synthetic)):
        if weight > 0:
            if term is None:
                raise ValueError(f"the loss term with weight {weight} was not computed")
            total = weight * term if total is None else total + weight * term
    return total


class _Draws:
    """Bag indices in seeded epoch-wise shuffles (each bag once per epoch)."""

    def __init__(self, n: int, seed: Sequence[int]):
        self.n, self.rng, self.order = n, np.random.default_rng(list(seed)), []

    def next(self) -> int:
        if not self.order:
            self.order = list(self.rng.permutation(self.n))
        return int(self.order.pop())


def _tile_moments(bags: Sequence[Bag]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over all tiles of ``bags``, accumulated in float64 bag by bag."""
    n, total, squares = 0, 0.0, 0.0
    for b in bags:
        f = b.features.astype(np.float64)
        n, total, squares = n + len(f), total + f.sum(0), squares + (f * f).sum(0)
    mean = total / n
    return mean, np.sqrt(np.maximum(squares / n - mean * mean, 0.0))


def train_mil(real: Sequence[Bag], synthetic: Sequence[Bag] = (), *, balance: float = 0.0,
              architecture: str = "attention", steps: int = 1000, lr: float = 5e-4, weight_decay: float = 1e-4,
              seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
              desc: str | None = None) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train one MIL model with DISC eq. 4 (see the module docstring); returns it (eval mode, on ``device``) and the
    per-step log ``{step, loss, real, synthetic}`` (a term not computed is NaN).

    Raises:
        HistosynthError: no real bags while λ < 1, no synthetic bags while λ > 0 (naming --synthetic), bags of
            different feature widths or label counts.
    """
    from tqdm.auto import tqdm

    if balance < 1 and not real:
        raise HistosynthError("no real training bags (--real)")
    if balance > 0 and not synthetic:
        raise HistosynthError(f"balance λ = {balance:g} needs synthetic bags (--synthetic FOLDER)")
    used = [*real, *(synthetic if balance > 0 else ())]
    if len({(b.features.shape[1], b.labels.shape[0]) for b in used}) != 1:
        raise HistosynthError("the bags differ in feature width or number of labels (one encoder, one label set)")
    in_dim, num_classes = used[0].features.shape[1], used[0].labels.shape[0]
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_mil_model(architecture, in_dim, num_classes)
        model.set_standardisation(*_tile_moments(real or synthetic))
        model.to(dev).train()
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

        def tensors(bags):
            return [(torch.from_numpy(b.features).to(dev), torch.from_numpy(b.labels).to(dev)) for b in bags]

        real_t, synth_t = tensors(real), tensors(synthetic) if balance > 0 else []
        real_draws, synth_draws = _Draws(len(real_t), (seed, 0)), _Draws(len(synth_t), (seed, 1))
        log = []
        bar = tqdm(range(1, steps + 1), desc=desc or f"MIL λ={balance:g}", unit="step", disable=not progress)
        for step in bar:
            terms = {"real": None, "synthetic": None}
            if balance < 1:
                x, y = real_t[real_draws.next()]
                terms["real"] = slide_loss(model(x)[0], y)
            if balance > 0:
                x, y = synth_t[synth_draws.next()]
                terms["synthetic"] = slide_loss(model(x)[0], y)
            loss = balanced_loss(terms["real"], terms["synthetic"], balance)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            row = {"step": step, "loss": float(loss.detach())}
            row.update({k: float("nan") if v is None else float(v.detach()) for k, v in terms.items()})
            log.append(row)
            if step % 50 == 0 or step == steps:
                bar.set_postfix(loss=f"{np.mean([r['loss'] for r in log[-50:]]):.4f}")
    return model.eval(), log


def predict(model: nn.Module, bags: Sequence[Bag], device: str | torch.device = "cpu") -> np.ndarray:
    """Sigmoid probabilities, float64 ``(B, K)`` in [0, 1], one row per bag."""
    model.eval()
    with torch.no_grad():
        rows = [torch.sigmoid(model(torch.from_numpy(b.features).to(device))[0]).double().cpu().numpy() for b in bags]
    return np.stack(rows) if rows else np.zeros((0, 0))


def auroc_per_class(targets: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """AUROC per class (scikit-learn ``roc_auc_score``) and their macro mean; targets ``(B, K)`` in {0, 1}, scores
    ``(B, K)`` any real. A class whose targets are all 0 or all 1 is None with a note, out of the macro mean (None
    when no class has one). Returns ``{"per_class", "macro", "positives", "notes"}``."""
    from sklearn.metrics import roc_auc_score

    targets, scores = np.asarray(targets), np.asarray(scores, dtype=np.float64)
    per_class, notes = {}, []
    for k, name in enumerate(class_names):
        column = targets[:, k]
        if len(np.unique(column)) < 2:
            per_class[name] = None
            notes.append(f"{name}: all {len(column)} test bags are {'positive' if column.all() else 'negative'}, "
                         "AUROC undefined")
        else:
            per_class[name] = float(roc_auc_score(column, scores[:, k]))
    defined = [v for v in per_class.values() if v is not None]
    return {"per_class": per_class, "macro": float(np.mean(defined)) if defined else None,
            "positives": {n: int(targets[:, k].sum()) for k, n in enumerate(class_names)}, "notes": notes}


def lambda_sweep(real_train: Sequence[Bag], synthetic: Sequence[Bag], test: Sequence[Bag], balances: Sequence[float],
                 class_names: Sequence[str], **train_options) -> tuple[list[dict[str, Any]], dict[float, list[dict]]]:
    """One model per λ in ``balances`` (same seed and data order), each scored by :func:`auroc_per_class` on the
    real ``test`` bags. Returns the table rows ``{balance, auroc, macro_auroc, positives, notes, final_loss}`` and
    the loss logs by λ. ``train_options``: those of :func:`train_mil`."""
    rows, logs = [], {}
    targets = np.stack([b.labels for b in test])
    for lam in balances:
        model, log = train_mil(real_train, synthetic, balance=float(lam), **train_options)
        scores = predict(model, test, train_options.get("device", "cpu"))
        metrics = auroc_per_class(targets, scores, class_names)
        tail = [r["loss"] for r in log[-max(1, len(log) // 20):]]
        rows.append({"balance": float(lam), "auroc": metrics["per_class"], "macro_auroc": metrics["macro"],
                     "positives": metrics["positives"], "notes": metrics["notes"],
                     "final_loss": float(np.mean(tail)) if tail else None})
        logs[float(lam)] = log
    return rows, logs
