"""Stain normalisation: histosynth's Macenko / Vahadane against maintained implementations, on real tissue.

    pip install --target /tmp/stainpkgs --no-deps torchstain tiatoolbox opencv-python-headless
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/stainpkgs python benchmarks/stain.py [--ours-module OLD_STAIN_PY]

Compared (each skipped when it cannot be imported):

* ``ours-macenko``, ``ours-vahadane``: ``histosynth.data.stain`` (or the file given by ``--ours-module``, e.g. an
  older version from ``git show``, to measure a change);
* ``torchstain-np``, ``torchstain-torch``: torchstain's Macenko (numpy and torch back ends; it has no Vahadane);
* ``tia-macenko``, ``tia-vahadane``: TIAToolbox's ``tools.stainnorm``. The full tiatoolbox install pulls in a
  whole-slide stack (dask, zarr, shapely, pandas, an annotation store, torch); installed with ``--no-deps`` its two
  stain modules are loaded from the installed files, with the three helpers they use (``contrast_enhancer``,
  ``get_luminosity_tissue_mask``, ``load_stain_matrix``) taken from tiatoolbox's own ``utils/misc.py`` source.

Measured, on the bundled HGSC region (``src/histosynth/assets/hgsc``), CoNSeP patches and the issue's case inputs
(``../shared/data``, ``../shared/cases``, used when present):

1. stain vectors fitted on the same targets (H and E unit OD vectors, angle between H and E, angle to ours);
2. recovery with a known answer: a real image recoloured in optical density by a "lab" matrix, normalised back
   with the original as target; mean absolute error to the original (uint8 levels) on tissue and on glass;
3. agreement: each implementation's output against ours, the same target (HGSC) and sources (CoNSeP);
4. nearly blank regions: glass (244.5 grey) with a few % of faint tissue; the glass after normalisation;
5. single-stain targets (eosin-only / hematoxylin-only): accepted or refused, the angle between the fitted stains;
6. time: fit on a 512 px target, transform of the 1500 px HGSC region;
7. ``stain_spread`` (ours, when the module has it), the hue range that decides whether a target shows two stains:
   on real H&E targets against single-stain images (clean, with pixel noise, with noise and JPEG at quality 75).
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import logging
import sys
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HGSC = ROOT / "src" / "histosynth" / "assets" / "hgsc" / "hgsc_nest.jpg"
LABS = {  # OD mixing matrices: a pixel's OD row x becomes x @ M (a different stain batch / scanner)
    "lab-A": np.array([[1.25, 0.10, 0.0], [0.05, 0.75, 0.10], [0.0, 0.10, 1.30]]),  # bluer H, paler E
    "lab-B": np.array([[0.80, 0.0, 0.05], [0.10, 1.30, 0.0], [0.05, 0.0, 0.85]]),  # paler H, stronger E
}


def load(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def recolour(rgb: np.ndarray, mix: np.ndarray) -> np.ndarray:
    od = -np.log(np.maximum(rgb.astype(float), 1) / 255)
    return np.clip(np.rint(255 * np.exp(-od @ mix)), 0, 255).astype(np.uint8)


def single_stain(rgb: np.ndarray, keep: int) -> np.ndarray:
    """Colour deconvolution (Ruifrok H, E, DAB) keeping one stain: 0 hematoxylin-only, 1 eosin-only."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    only = np.zeros_like(hed)
    only[..., keep] = hed[..., keep]
    return np.clip(np.rint(hed2rgb(only) * 255), 0, 255).astype(np.uint8)


def noisy(rgb: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, rgb.shape)
    return np.clip(np.rint(rgb + noise), 0, 255).astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int = 75) -> np.ndarray:
    import io

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return load(buffer)


def nearly_blank(tissue: np.ndarray, size: int = 256, fraction: float = 0.03, faint: float = 0.5,
                 grey: float = 244.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Glass at `grey` (noisy, as scanned) with a disc of faint real tissue: (image, glass mask)."""
    rng = np.random.default_rng(seed)
    glass = np.clip(np.rint(grey + rng.normal(0, 1.5, (size, size, 3))), 0, 255)
    yy, xx = np.mgrid[:size, :size]
    radius = np.sqrt(fraction * size * size / np.pi)
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2
    od = -np.log(np.maximum(tissue[:size, :size].astype(float), 1) / 255) * faint
    image = np.where(disc[..., None], glass * np.exp(-od), glass)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), ~disc


# --- the implementations, each as fit(target) -> transform(rgb) -> uint8 -----------------------------------


def load_ours(path: str | None):
    if path is None:
        from histosynth.data import stain
        return stain
    spec = importlib.util.spec_from_file_location("ours_stain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tiatoolbox():
    try:
        from tiatoolbox.tools import stainnorm  # a full install
        return stainnorm
    except Exception:
        pass
    spec = importlib.util.find_spec("tiatoolbox")  # a --no-deps install: load only the stain modules
    if spec is None:
        raise ImportError("tiatoolbox is not installed")
    import cv2
    from skimage import exposure

    root = Path(spec.submodule_search_locations[0])
    misc_src = (root / "utils" / "misc.py").read_text()
    wanted = {"contrast_enhancer", "get_luminosity_tissue_mask", "load_stain_matrix"}
    funcs = [n for n in ast.parse(misc_src).body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    misc = types.ModuleType("tiatoolbox.utils.misc")
    misc.__dict__.update(np=np, cv2=cv2, exposure=exposure, Path=Path)
    exec(compile(ast.fix_missing_locations(ast.Module(body=funcs, type_ignores=[])), str(root / "utils/misc.py"),
                 "exec"), misc.__dict__)
    misc.parse_cv2_interpolaton = misc.select_cv2_interpolation = None  # imported by transforms.py, unused here
    package = types.ModuleType("tiatoolbox")
    package.__path__ = [str(root)]
    package.logger = logging.getLogger("tiatoolbox")
    utils = types.ModuleType("tiatoolbox.utils")
    utils.__path__ = [str(root / "utils")]
    sys.modules.update({"tiatoolbox": package, "tiatoolbox.utils": utils, "tiatoolbox.utils.misc": misc})
    for name, rel in (("tiatoolbox.utils.exceptions", "utils/exceptions.py"),
                      ("tiatoolbox.utils.transforms", "utils/transforms.py"),
                      ("tiatoolbox.tools.stainextract", "tools/stainextract.py"),
                      ("tiatoolbox.tools.stainnorm", "tools/stainnorm.py")):
        module_spec = importlib.util.spec_from_file_location(name, root / rel)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    return sys.modules["tiatoolbox.tools.stainnorm"]


class Impl:
    """One implementation: fit(target) stores the state; transform(rgb) -> uint8; stains -> (2, 3) H, E rows."""

    def __init__(self, name, make):
        self.name, self.make = name, make

    def fit(self, target):
        self.state = self.make()
        self.state.fit(np.array(target))
        return self

    def transform(self, rgb):
        return self.state.transform(np.array(rgb))

    @property
    def stains(self):
        return self.state.stains()


def implementations(ours_path: str | None) -> list[Impl]:
    out = []
    ours = load_ours(ours_path)

    class Ours:
        def __init__(self, cls):
            self.n = cls()

        def fit(self, t):
            self.n.fit(t)

        def transform(self, x):
            return self.n.transform(x)

        def stains(self):
            return self.n.stain_matrix_.T

    out += [Impl("ours-macenko", lambda: Ours(ours.MacenkoNormalizer)),
            Impl("ours-vahadane", lambda: Ours(ours.VahadaneNormalizer))]
    try:
        import torch
        import torchstain

        class TorchstainNumpy:
            def __init__(self):
                self.n = torchstain.normalizers.MacenkoNormalizer(backend="numpy")

            def fit(self, t):
                self.n.fit(t)

            def transform(self, x):
                return self.n.normalize(I=x, stains=False)[0]

            def stains(self):
                return np.asarray(self.n.HERef).T

        class TorchstainTorch(TorchstainNumpy):
            def __init__(self):
                self.n = torchstain.normalizers.MacenkoNormalizer(backend="torch")

            def fit(self, t):
                self.n.fit(torch.from_numpy(t).permute(2, 0, 1).contiguous())

            def transform(self, x):
                out = self.n.normalize(I=torch.from_numpy(x).permute(2, 0, 1).contiguous(), stains=False)[0]
                return out.numpy().astype(np.uint8)

            def stains(self):
                return self.n.HERef.numpy().T

        out += [Impl("torchstain-np", TorchstainNumpy), Impl("torchstain-torch", TorchstainTorch)]
    except ImportError as exc:
        print(f"torchstain skipped: {exc}")
    try:
        tia = load_tiatoolbox()
        logging.getLogger("tiatoolbox").setLevel(logging.ERROR)

        class Tia:
            def __init__(self, cls):
                self.n = cls()

            def fit(self, t):
                self.n.fit(t)

            def transform(self, x):
                return self.n.transform(x)

            def stains(self):
                return self.n.stain_matrix_target

        out += [Impl("tia-macenko", lambda: Tia(tia.MacenkoNormalizer)),
                Impl("tia-vahadane", lambda: Tia(tia.VahadaneNormalizer))]
    except Exception as exc:
        print(f"tiatoolbox skipped: {exc!r}")
    return out


# --- measurements -----------------------------------------------------------------------------------------


def angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))))


def od_max(rgb) -> np.ndarray:
    return (-np.log(np.maximum(rgb.astype(float), 1) / 255)).max(axis=-1)


def attempt(fn):
    try:
        return fn(), None
    except Exception as exc:  # the libraries fail in their own ways: record it, go on
        return None, f"{type(exc).__name__}: {str(exc)[:60]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ours-module", default=None, help="a stain.py to use as 'ours' (default: the package's)")
    parser.add_argument("--consep", type=int, default=40, help="CoNSeP patches used (every k-th of all)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine_info import machine

    print(f"machine: {machine()}")
    impls = implementations(args.ours_module)
    hgsc = load(HGSC)
    crop = hgsc[300:812, 300:812]
    targets = {"hgsc-512": crop}
    cases = SHARED / "cases"
    if cases.is_dir():
        targets["case target_hgsc"] = load(cases / "stain-nearly-blank" / "target_hgsc.png")
        targets["case r1_tissue"] = load(cases / "stain-nearly-blank" / "r1_tissue.png")
    consep_paths = sorted(glob.glob(str(SHARED / "data" / "consep" / "*" / "images" / "*.jpg")))
    consep = [load(p) for p in consep_paths[:: max(1, len(consep_paths) // args.consep)][: args.consep]]
    print(f"{len(consep)} CoNSeP patches, HGSC {hgsc.shape[:2]}")

    print("\n## 1. stain vectors (H row, E row; unit OD) and angles")
    print("| target | implementation | H | E | H–E angle | H, E angle to ours (same method) |")
    print("|---|---|---|---|---|---|")
    fitted = {}
    for tname, target in targets.items():
        for impl in impls:
            _, err = attempt(lambda: impl.fit(target))
            if err:
                print(f"| {tname} | {impl.name} | {err} | | | |")
                continue
            s = np.asarray(impl.stains, float)
            s = s / np.linalg.norm(s, axis=1, keepdims=True)
            fitted[(tname, impl.name)] = s
            ref = fitted.get((tname, "ours-vahadane" if "vahadane" in impl.name else "ours-macenko"))
            rel = f"{angle(s[0], ref[0]):.1f}°, {angle(s[1], ref[1]):.1f}°" if ref is not None else ""
            fmt = lambda v: "(" + ", ".join(f"{x:.3f}" for x in v) + ")"  # noqa: E731
            print(f"| {tname} | {impl.name} | {fmt(s[0])} | {fmt(s[1])} | {angle(s[0], s[1]):.1f}° | {rel} |")

    print("\n## 2. recovery: recoloured by a lab matrix, normalised back to the original (MAE, uint8 levels)")
    sources = {"hgsc-1500": [hgsc], "consep": consep} if consep else {"hgsc-1500": [hgsc]}
    print("| images | lab | implementation | tissue MAE | glass MAE | mean-colour error | (recoloured, before) |")
    print("|---|---|---|---|---|---|---|")
    for sname, images in sources.items():
        for lab, mix in LABS.items():
            for impl in impls:
                errs, failures = [], 0
                for image in images:
                    moved = recolour(image, mix)
                    out, err = attempt(lambda: impl.fit(image).transform(moved))
                    if err:
                        failures += 1
                        continue
                    glass = od_max(image) < 0.15
                    d = np.abs(out.astype(float) - image)
                    b = np.abs(moved.astype(float) - image)
                    colour = np.linalg.norm(out.reshape(-1, 3).mean(0) - image.reshape(-1, 3).mean(0))
                    errs.append((d[~glass].mean(), d[glass].mean() if glass.any() else np.nan, colour,
                                 b[~glass].mean(), b[glass].mean() if glass.any() else np.nan))
                if not errs:
                    print(f"| {sname} | {lab} | {impl.name} | failed on all | | | |")
                    continue
                e = np.nanmean(np.array(errs, float), axis=0)
                fail = f" ({failures} failed)" if failures else ""
                print(f"| {sname} ({len(images)}) | {lab} | {impl.name}{fail} | {e[0]:.2f} | {e[1]:.2f} | {e[2]:.2f} | "
                      f"{e[3]:.2f} / {e[4]:.2f} |")

    if consep:
        print("\n## 3. agreement with ours: target HGSC 512 px, CoNSeP sources (MAE to ours, uint8 levels)")
        print("| implementation | vs ours-macenko | vs ours-vahadane | failures |")
        print("|---|---|---|---|")
        outputs = {}
        for impl in impls:
            impl.fit(crop)
            outs = [attempt(lambda: impl.transform(x))[0] for x in consep]
            outputs[impl.name] = outs
        for impl in impls:
            row = []
            for ref in ("ours-macenko", "ours-vahadane"):
                pairs = [(a, b) for a, b in zip(outputs[impl.name], outputs[ref]) if a is not None and b is not None]
                row.append(f"{np.mean([np.abs(a.astype(float) - b).mean() for a, b in pairs]):.2f}")
            print(f"| {impl.name} | {row[0]} | {row[1]} | {sum(o is None for o in outputs[impl.name])} |")

    print("\n## 4. nearly blank regions: glass mean before -> after (and max |change| of a glass pixel)")
    blanks = {"hgsc-built (3% faint tissue)": nearly_blank(crop)}
    if cases.is_dir():
        r3 = load(cases / "stain-nearly-blank" / "r3_sparse.png")
        blanks["case r3_sparse"] = (r3, od_max(r3) < 0.1)
    print("| region | target | implementation | glass before | glass after | max glass change | tissue mean after |")
    print("|---|---|---|---|---|---|---|")
    for bname, (image, glass) in blanks.items():
        for tname in [t for t in targets if t != "case target_hgsc"] + (["case target_hgsc"] if cases.is_dir() else []):
            for impl in impls:
                out, err = attempt(lambda: impl.fit(targets[tname]).transform(image))
                fmt = lambda v: "(" + ", ".join(f"{x:.1f}" for x in v) + ")"  # noqa: E731
                if err:
                    print(f"| {bname} | {tname} | {impl.name} | {fmt(image[glass].mean(0))} | {err} | | |")
                    continue
                change = np.abs(out[glass].astype(int) - image[glass]).max()
                print(f"| {bname} | {tname} | {impl.name} | {fmt(image[glass].mean(0))} | {fmt(out[glass].mean(0))} | "
                      f"{change} | {fmt(out[~glass].mean(0))} |")

    print("\n## 5. single-stain targets: accepted? (angle between the two fitted stains; red = 255 on tissue)")
    singles = {"hgsc eosin-only": single_stain(hgsc, 1), "hgsc hematoxylin-only": single_stain(hgsc, 0)}
    if cases.is_dir():
        singles["case target_eosin_only"] = load(cases / "stain-single-target" / "target_eosin_only.png")
        singles["case target_hematoxylin_only"] = load(cases / "stain-single-target" / "target_hematoxylin_only.png")
    probe = consep[0] if consep else crop
    print("| target | implementation | result | H–E angle | tissue pixels with red = 255 after |")
    print("|---|---|---|---|---|")
    for sname, target in singles.items():
        for impl in impls:
            _, err = attempt(lambda: impl.fit(target))
            if err:
                print(f"| {sname} | {impl.name} | refused: {err} | | |")
                continue
            s = np.asarray(impl.stains, float)
            out, err2 = attempt(lambda: impl.transform(probe))
            red = f"{np.mean(out[od_max(probe) >= 0.15][:, 0] == 255):.1%}" if out is not None else err2
            print(f"| {sname} | {impl.name} | accepted | {angle(s[0], s[1]):.1f}° | {red} |")

    print("\n## 6. time (s): fit on the 512 px HGSC crop; transform of the 1500 px HGSC region (best of 3)")
    print("| implementation | fit 512 px | transform 1500 px | Mpx/s |")
    print("|---|---|---|---|")
    for impl in impls:
        fits, trans = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            impl.fit(crop)
            fits.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            impl.transform(hgsc)
            trans.append(time.perf_counter() - t0)
        mpx = hgsc.shape[0] * hgsc.shape[1] / 1e6 / min(trans)
        print(f"| {impl.name} | {min(fits):.3f} | {min(trans):.3f} | {mpx:.2f} |")

    ours = load_ours(args.ours_module)
    if hasattr(ours, "stain_spread"):
        print(f"\n## 7. stain_spread (degrees; refused under {ours.MIN_STAIN_SPREAD})")
        real = {"hgsc-1500": hgsc, "hgsc-512": crop, **{f"hgsc tile {k}": hgsc[500 * k: 500 * k + 500, 1000:]
                                                        for k in range(3)}}
        real.update({k: v for k, v in targets.items() if k.startswith("case")})
        single = {k: v for k, v in singles.items() if k.startswith("case")}
        for name, image in [("hgsc-512", crop)] + [(f"consep {i}", x) for i, x in enumerate(consep[::8])]:
            for keep, stain_name in ((0, "H"), (1, "E")):
                only = single_stain(image, keep)
                single.update({f"{name} {stain_name}-only": only, f"{name} {stain_name}-only + noise 4":
                               noisy(only, 4), f"{name} {stain_name}-only + noise 2 + JPEG 75": jpeg(noisy(only, 2))})
        print("| kind | images | min | median | max | refused |")
        print("|---|---|---|---|---|---|")
        for kind, group in (("real H&E: HGSC region, tiles, case targets", real),
                            ("real H&E: CoNSeP patches", {i: x for i, x in enumerate(consep)}),
                            ("single stain: case targets", {k: v for k, v in single.items() if k.startswith("case")}),
                            ("single stain: clean (colour deconvolution)",
                             {k: v for k, v in single.items() if k.endswith("-only")}),
                            ("single stain: + noise sigma 4",
                             {k: v for k, v in single.items() if k.endswith("noise 4")}),
                            ("single stain: + noise 2 + JPEG 75", {k: v for k, v in single.items() if "JPEG" in k})):
            spreads = [ours.stain_spread(x) for x in group.values()]
            spreads = np.array([x for x in spreads if x is not None])
            refused = int(np.sum(spreads < ours.MIN_STAIN_SPREAD))
            print(f"| {kind} | {len(spreads)} | {spreads.min():.1f} | {np.median(spreads):.1f} | {spreads.max():.1f} | "
                  f"{refused} |")


if __name__ == "__main__":
    main()
