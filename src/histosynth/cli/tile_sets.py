"""`histosynth prepare tile-sets`: DISC's tile annotation masks and MIL tile sets (Sec. 2.2) from a region store's
shapes, written as a folder that `histosynth sample --regions` turns into tiles (and `evaluate mil` into bags)."""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.cli.common import overwrite_option, seed_option, user_errors
from histosynth.errors import HistosynthError

__all__ = ["tile_sets_cmd"]


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """[("GG4", "GG3"), ...] from "GG4+GG3,GG3+GG3" (PRIMARY+SECONDARY); errors name --pairs."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        primary, sep, secondary = part.partition("+")
        if not sep or not primary.strip() or not secondary.strip():
            raise HistosynthError(f"--pairs: {part!r} is not PRIMARY+SECONDARY (e.g. GG4+GG3)")
        pairs.append((primary.strip(), secondary.strip()))
    if not pairs:
        raise HistosynthError("--pairs: give at least one PRIMARY+SECONDARY pair")
    return pairs


@click.command("tile-sets")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--pairs", required=True,
              help="(primary, secondary) grade pairs, e.g. GG3+GG3,GG4+GG3,GG5+GG4,non-cancer+non-cancer; set s takes "
                   "pair s mod the number of pairs (list them in the proportions wanted).")
@click.option("--sets", "num_sets", default=10, show_default=True, type=click.IntRange(min=1), help="Tile sets (slides).")
@click.option("--size", default="20-100", show_default=True, help="Tiles per set: MIN-MAX, drawn uniformly (inclusive).")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "test", "all"]),
              help="The store split whose masks give the shapes.")
@click.option("--non-cancer", default=None, help="The non-cancer label (default: the store's label 0).")
@seed_option()
@click.option("--out", required=True, type=click.Path(path_type=Path))
@overwrite_option()
@user_errors
def tile_sets_cmd(store, pairs, num_sets, size, split, non_cancer, seed, out, overwrite):
    """Sample MIL tile sets of region masks from STORE's annotation shapes (DISC Sec. 2.2): each mask relabelled by
    label frequency, grades put on its shapes by random weights, the primary the majority of its set, a non-cancer
    primary all non-cancer. Writes OUT/classes.txt, OUT/masks/, OUT/sets.jsonl."""
    from histosynth.sampling.shape_bank import shape_bank
    from histosynth.sampling.tile_masks import sample_tile_sets, write_tile_sets

    lo, sep, hi = size.partition("-")
    try:
        bounds = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise HistosynthError(f"--size: {size!r} is not MIN-MAX (e.g. 20-100)") from None
    bank = shape_bank(store, None if split == "all" else split)
    sets = sample_tile_sets(bank, parse_pairs(pairs), num_sets, seed, bounds,
                            non_cancer=0 if non_cancer is None else non_cancer)
    write_tile_sets(out, sets, bank.class_names, overwrite=overwrite)
    tiles = sum(len(s) for s in sets)
    click.echo(f"wrote {out}: {len(sets)} tile sets, {tiles} masks")
