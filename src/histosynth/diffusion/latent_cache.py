"""What a latent-diffusion run computes once and keeps on disk (``RUN/cache/``, or the recipe's
``train.cache_dir``): the autoencoder latents of every training patch (and of its flips), and the text
embedding of every distinct caption.

On a CPU, encoding dominates a step otherwise; on a GPU it saves the first stage's share. Each file is
named by a key of what it depends on (the autoencoder's weights and config, the store's description and
manifest, the patches and flips; the text encoder's weights, ``max_tokens`` and the captions), so a
resumed run reuses it and a changed input never reads a stale one. Files are written under a temporary
name and renamed when complete; they are memory-mapped for reading. Because the names are content keys,
runs may share one cache directory (e.g. a text and a class model trained on the same latents).

Latents are cached before scaling: a VQ model's pre-quantization encoder output (what LDM diffuses), or
an AutoencoderKL's posterior mean and standard deviation (a fresh sample is drawn each step from the
step's generator).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from histosynth.errors import HistosynthError

CACHE = "cache"
NUM_FLIPS = 4  # identity, horizontal, vertical, both (PathLDM's random flips)


# ---------------------------------------------------------------------------------------------- autoencoders
def load_autoencoder(path: str | Path):
    """The frozen first stage: a diffusers VQModel / AutoencoderKL folder, an autoencoder run, or a CompVis / LDM
    checkpoint (converted by :func:`histosynth.models.autoencoders.load_autoencoder`)."""
    from histosynth.models.autoencoders import load_autoencoder as load

    vae, report = load(path)
    if report is not None:
        print("\n".join(report.summary()))
    vae.eval().requires_grad_(False)
    return vae


def is_vq(vae) -> bool:
    from diffusers import VQModel

    return isinstance(vae, VQModel)


@torch.no_grad()
def encode_stats(vae, images: torch.Tensor) -> torch.Tensor:
    """Unscaled latent statistics of images in [-1, 1]: VQ (B, C, h, w) pre-quantization; KL (B, 2C, h, w) mean ‖ std."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    if is_vq(vae):
        return vae.encode(images).latents.float()
    dist = vae.encode(images).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


def latents_from_stats(stats: torch.Tensor, vq: bool, generator: torch.Generator) -> torch.Tensor:
    """The latent of cached statistics: VQ as is; KL a sample mean + std·ε with ε from `generator` (CPU)."""
    if vq:
        return stats
    mean, std = stats.chunk(2, dim=1)
    return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)


def flip(images: torch.Tensor, k: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Flip variant k of each image (B, C, H, W): 0 none, 1 horizontal, 2 vertical, 3 both."""
    out = []
    for x, kk in zip(images, (int(v) for v in k)):
        if kk & 1:
            x = x.flip(-1)
        if kk & 2:
            x = x.flip(-2)
        out.append(x)
    return torch.stack(out)


def image_batch(store, indices: Sequence[int]) -> torch.Tensor:
    """Store patches as a float batch (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(store[i]["image"]) for i in indices])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- keys
def _hash_module(module: torch.nn.Module, h) -> None:
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def module_key(module) -> str:
    """sha256 of a diffusers model's config and weights: names caches of its outputs."""
    h = hashlib.sha256(json.dumps(dict(module.config), sort_keys=True, default=str).encode())
    _hash_module(module, h)
    return h.hexdigest()



def store_key(store) -> str:
    h = hashlib.sha256()
    for name in ("store.json", "manifest.jsonl"):
        h.update((Path(store.path) / name).read_bytes())
    return h.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _write_npy_atomically(final: Path, shape: tuple, fill: Callable[[np.ndarray], None], meta: dict) -> None:
    """Write a float32 .npy of ``shape`` filled by ``fill`` under a temporary name, then rename it to ``final``.

    The file's blocks are reserved before it is memory-mapped (``posix_fallocate``): on a full disk, writing into
    a sparse memory map would kill the process with SIGBUS; instead this is a DiskFullError naming ``final`` and
    its size. A failed write leaves no temporary file."""
    import errno

    from histosynth.errors import DiskFullError, is_disk_full

    def reserve(path: Path, size: int) -> None:  # ENOSPC now, not SIGBUS while filling
        if not hasattr(os, "posix_fallocate"):
            return
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise  # (a file system that cannot reserve blocks is written as before)
        finally:
            os.close(fd)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    size = 128 + int(np.prod(shape)) * 4  # about: the .npy header and the float32 data
    filling = False
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        size = arr.offset + arr.nbytes
        reserve(tmp, size)
        filling = True
        fill(arr)  # its errors are the encoder's, never the disk's (the blocks are reserved)
        filling = False
        arr.flush()
        del arr
        os.replace(tmp, final)
        final.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    except Exception as exc:
        full = not filling and is_disk_full(exc, final.parent, size)
        tmp.unlink(missing_ok=True)
        if not full:
            raise
        raise DiskFullError(final, "the latent cache", size) from None


# ---------------------------------------------------------------------------------------------- latents
def latent_cache(where: Path, vae, store, indices: Sequence[int], *, flips: bool, batch_size: int = 16,
                 build: bool = True, progress: bool = True, inputs: Callable = image_batch) -> np.memmap:
    """(N, F, C', h, w) float32 latent statistics of store patches `indices` (F = 4 flips or 1), memory-mapped.

    ``inputs(store, indices)`` gives the autoencoder's input batch (default: the images; HistoSmith's joint model
    takes image + distance map + mask). With ``build=False`` (the other processes of a multi-GPU run) the file
    must exist already."""
    nflips = NUM_FLIPS if flips else 1
    parts = ["latents", module_key(vae), store_key(store), list(map(int, indices)), nflips]
    if inputs is not image_batch:  # keys of image caches stay as they were
        parts.append(f"{inputs.__module__}.{inputs.__qualname__}")
    key = _key(*parts)
    final = Path(where) / f"latents-{key}.npy"
    if not final.is_file() and build:
        probe = encode_stats(vae, inputs(store, indices[:1]))
        shape = (len(indices), nflips, *probe.shape[1:])

        def fill(arr):
            from tqdm.auto import tqdm

            for s in tqdm(range(0, len(indices), batch_size), desc="encode latents", unit="batch", disable=not progress):
                idx = indices[s:s + batch_size]
                x = inputs(store, idx)  # read (and, for joint inputs, build) once for all flips
                for k in range(nflips):
                    arr[s:s + len(idx), k] = encode_stats(vae, flip(x, [k] * len(idx))).cpu().numpy()

        _write_npy_atomically(final, shape, fill, {"what": "latent statistics (unscaled)", "store": str(store.path),
                                                   "patches": len(indices), "flips": nflips, "vq": is_vq(vae)})
    if not final.is_file():
        raise HistosynthError("latent cache missing (the main process builds it)", final)
    return np.load(final, mmap_mode="r")


# ---------------------------------------------------------------------------------------------- text
def text_cache(where: Path, conditioner, captions: Sequence[str], *, batch_size: int = 32, build: bool = True,
               progress: bool = True) -> np.memmap:
    """(U + 1, T, D) float32 embeddings of the distinct `captions`, the last row the null condition (the empty
    caption), memory-mapped."""
    h = hashlib.sha256()
    _hash_module(conditioner.encoder, h)
    key = _key("text", h.hexdigest(), conditioner.kind, conditioner.max_tokens, list(captions))
    final = Path(where) / f"text-{key}.npy"
    if not final.is_file() and build:
        null = conditioner.null_condition(1).embeddings
        shape = (len(captions) + 1, *null.shape[1:])

        def fill(arr):
            from tqdm.auto import tqdm

            for s in tqdm(range(0, len(captions), batch_size), desc="encode captions", unit="batch",
                          disable=not progress):
                chunk = list(captions[s:s + batch_size])
                arr[s:s + len(chunk)] = conditioner.encode(chunk).embeddings.float().cpu().numpy()
            arr[len(captions)] = null[0].float().cpu().numpy()

        _write_npy_atomically(final, shape, fill, {"what": "text embeddings, last row = empty caption",
                                                   "captions": len(captions), "encoder": conditioner.source,
                                                   "max_tokens": conditioner.max_tokens})
    if not final.is_file():
        raise HistosynthError("text embedding cache missing (the main process builds it)", final)
    return np.load(final, mmap_mode="r")
