"""Classification Accuracy Score (PathLDM Table 5): are generated images recognisable as their condition?

A classifier is trained on generated images with the labels they were *conditioned on* and tested on real
test patches with their true labels. Two references share the protocol: the same classifier trained on real
train patches, and on real train + generated. A CAS close to the real-trained accuracy means the generator
puts the class-defining content into its images.

Classifier: multinomial logistic regression (scikit-learn, standardised features, balanced class weights) on
frozen image features (``features``: ``effnet-lite0`` offline, ``inception``, or a local encoder such as a
pathology model; see :func:`histosynth.evaluate.features.load_feature_extractor`). A linear probe on a frozen
encoder keeps the score about the images rather than about how a CNN was fine-tuned, and runs on a CPU; it is
not the fine-tuned ResNet of PathLDM, so compare CAS values within this protocol only (it is written into the
result).

Labels (``label``):

* ``"dominant-type"`` — the most frequent nucleus type among the instances of the patch's label map
  (``"none"`` when it holds no nucleus): defined for real store patches and for mask-conditioned samples
  (their conditioning label maps) alike, so it works for NASDM / HistoSmith output.
* ``"field:NAME"`` — the value of ``NAME`` in each ``samples.jsonl`` row (e.g. a PathLDM class or
  tumor/TIL level) and, for real patches, in ``real_labels``: a JSONL file of ``{"store_index": i, NAME: ...}``.
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from histosynth.atomic import refuse_existing
from histosynth.errors import DataError, HistosynthError

__all__ = ["dominant_type", "classification_accuracy_score"]

NO_NUCLEUS = "none"


def dominant_type(inst_map: np.ndarray, type_map: np.ndarray, class_names: Sequence[str]) -> str:
    """Name of the commonest nucleus type among the instances (ties: the lower type id); "none" if no nucleus."""
    inst = np.asarray(inst_map).ravel()
    types = np.asarray(type_map).ravel()
    ids, first = np.unique(inst, return_index=True)
    inst_types = types[first[ids > 0]]
    inst_types = inst_types[(inst_types >= 1) & (inst_types <= len(class_names))]
    if inst_types.size == 0:
        return NO_NUCLEUS
    counts = np.bincount(inst_types, minlength=len(class_names) + 1)[1:]
    return str(class_names[int(counts.argmax())])


def _read_real_labels(path: Path, field: str) -> dict[int, str]:
    if not path.is_file():
        raise DataError("real labels file not found", path)
    labels = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            labels[int(row["store_index"])] = str(row[field])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"line {n} needs store_index and {field!r}: {exc}", path) from None
    return labels


def _features(extractor, images: list[np.ndarray], batch_size: int, device) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        same = all(im.shape == chunk[0].shape for im in chunk)
        groups = [chunk] if same else [[im] for im in chunk]
        for group in groups:
            batch = torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2).contiguous().to(device)
            with torch.inference_mode():
                out.append(extractor(batch).double().cpu().numpy())
    return np.concatenate(out)


def _fit_and_score(x_train, y_train, x_test, y_test, seed: int) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(y_train))
    if len(classes) < 2:
        raise HistosynthError(f"the training images carry a single label ({classes[0]!r}); a classifier needs two or more")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced", random_state=seed))
    clf.fit(x_train, y_train)
    pred = clf.predict(x_test)
    labels = sorted(set(y_test) | set(classes))
    cm = confusion_matrix(y_test, pred, labels=labels)
    recall = {lab: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else float("nan")) for i, lab in enumerate(labels)}
    return {
        "accuracy": float(np.mean(pred == np.asarray(y_test))),
        "balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
        "recall_per_class": recall,
        "train_counts": dict(Counter(y_train)),
        "unseen_test_classes": sorted(set(y_test) - set(classes)),
        "confusion": {"labels": labels, "matrix": cm.tolist()},
    }


def classification_accuracy_score(
    real_store: str | Path,
    synthetic: str | Path,
    out: str | Path | None = None,
    *,
    label: str = "dominant-type",
    real_labels: str | Path | None = None,
    features: str = "effnet-lite0",
    batch_size: int = 32,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """CAS of a sample directory against a labelled real store; see the module docstring.

    Returns (and writes to ``out``, a JSON file, when given) the accuracy / balanced accuracy / per-class recall on
    real test of classifiers trained on synthetic, real train, and real train + synthetic, with the protocol.
    """
    from histosynth.data.store import PatchStore
    from histosynth.evaluate.augment import SyntheticPairs
    from histosynth.evaluate.features import load_feature_extractor

    if out is not None:
        out = Path(out)
        refuse_existing(out, overwrite)
    store = PatchStore(real_store)
    names = tuple(store.class_names) if store.class_names else ()
    pairs = SyntheticPairs(synthetic, num_classes=len(names) or None)
    if label == "dominant-type":
        if not store.has_labels:
            raise DataError("label 'dominant-type' needs a store with nuclei labels", store.path)
        if pairs.class_names is not None and tuple(pairs.class_names) != names:
            raise DataError(f"the synthetic masks' classes {list(pairs.class_names)} differ from the real store's "
                            f"{list(names)}", pairs.root)

        def real_label(i: int) -> str:
            item = store[i]
            return dominant_type(item["inst_map"], item["type_map"], names)

        def synth_label(j: int) -> str:
            item = pairs[j]
            return dominant_type(item["inst_map"], item["type_map"], names)
    elif label.startswith("field:") and len(label) > 6:
        field = label[6:]
        if real_labels is None:
            raise HistosynthError(f"--label {label} needs --real-labels FILE (JSONL with store_index and {field!r})")
        missing = [j for j, r in enumerate(pairs.rows) if field not in r]
        if missing:
            raise DataError(f"{len(missing)} samples have no {field!r} (first: row {missing[0] + 1})",
                            pairs.root / "samples.jsonl")
        table = _read_real_labels(Path(real_labels), field)

        def real_label(i: int) -> str:
            if i not in table:
                raise DataError(f"no label for store index {i}", Path(real_labels))
            return table[i]

        def synth_label(j: int) -> str:
            return str(pairs.rows[j][field])
    else:
        raise HistosynthError(f"unknown --label {label!r}: use 'dominant-type' or 'field:NAME'")

    train_idx, test_idx = store.indices("train"), store.indices("test")
    if not train_idx or not test_idx:
        raise DataError("the real store needs both train and test patches", store.path)
    extractor = load_feature_extractor(features, device=device)

    def load_real(idx):
        return [np.asarray(store[i]["image"]) for i in idx], [real_label(i) for i in idx]

    x_real_train_img, y_real_train = load_real(train_idx)
    x_test_img, y_test = load_real(test_idx)
    synth_img = [pairs[j]["image"] for j in range(len(pairs))]
    y_synth = [synth_label(j) for j in range(len(pairs))]
    f_train = _features(extractor, x_real_train_img, batch_size, device)
    f_test = _features(extractor, x_test_img, batch_size, device)
    f_synth = _features(extractor, synth_img, batch_size, device)

    result: dict[str, Any] = {
        "cas (synthetic -> real test)": _fit_and_score(f_synth, y_synth, f_test, y_test, seed),
        "real train -> real test": _fit_and_score(f_train, y_real_train, f_test, y_test, seed),
        "real train + synthetic -> real test": _fit_and_score(
            np.concatenate([f_train, f_synth]), y_real_train + y_synth, f_test, y_test, seed),
        "n": {"synthetic": len(y_synth), "real_train": len(y_real_train), "real_test": len(y_test)},
        "protocol": {"label": label, "features": extractor.protocol,
                     "classifier": "StandardScaler + LogisticRegression(multinomial, class_weight=balanced)",
                     "real_store": str(store.path), "synthetic_dir": str(pairs.root), "seed": seed},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, out)
    return result
