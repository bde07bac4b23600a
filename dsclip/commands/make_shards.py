"""`dsclip make-shards`: write WebDataset shards + manifest.json from a local source."""
import argparse
import logging

from dsclip.commands.common import add_log_level, guarded

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsclip make-shards",
                                description="Write WebDataset shards + manifest.json from a local source, for "
                                            "training or as a CLIP_benchmark data set.")
    p.add_argument("src", help="a .csv/.tsv file, an image folder (one subfolder per class), "
                   "'fashion-mnist' or 'openclipart' (Debian packages)")
    p.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and manifest.json "
                   "(--layout clip_benchmark: for SPLIT/N.tar and the set's text files)")
    p.add_argument("--layout", choices=["dsclip", "clip_benchmark"], default="dsclip",
                   help="dsclip: training shards; clip_benchmark: a benchmark set in CLIP_benchmark's layout, "
                        "classification for a labelled source, retrieval for a CSV")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, default=0, help="resize the shorter side to this; 0 keeps it")
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale images whose longer side is above this, once, at write time; 0 keeps them")
    p.add_argument("--split", help="split of fashion-mnist: train (default) or test; with --layout clip_benchmark "
                   "also the split folder written (default test, where evaluation looks)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg",
                   help="encoding of images that are encoded anew (default jpg); a JPEG, PNG or WebP source file that "
                        "needs no resizing is copied unchanged")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when encoding (default 95)")
    p.add_argument("--reencode", action="store_true", help="encode every image anew, even where its bytes could be copied")
    p.add_argument("--image-column", default="filepath", help="CSV column with image paths")
    p.add_argument("--caption-column", default="title", help="CSV column with captions")
    p.add_argument("--limit", type=int, default=0, help="write only the first N samples (0 = all)")
    add_log_level(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return guarded(args, lambda: make_shards(args))


def make_shards(args: argparse.Namespace) -> int:
    from dsclip.data.shard_writer import ImageEncoding, write_shards
    from dsclip.data.sources import FirstSamples, open_source

    source = open_source(args.src, split=args.split or "train", image_column=args.image_column,
                         caption_column=args.caption_column)
    if args.limit:
        source = FirstSamples(source, args.limit)
    encoding = ImageEncoding(image_size=args.image_size, max_side=args.max_side, image_format=args.format,
                             quality=args.quality, reencode=args.reencode)
    manifest = write_shards(source, args.out, per_shard=args.per_shard, encoding=encoding, layout=args.layout,
                            split=args.split or "test")
    log.info("wrote %d shards, %d samples, to %s", len(manifest["shards"]), manifest["total"], args.out)
    return 0
