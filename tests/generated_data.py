"""Training data written in code, one writer per data kind dsclip reads: WebDataset shards with a
manifest, a CSV/TSV list of image files, and a folder of class subfolders. Images are small random
JPEGs seeded by sample id, captions name the id ('sample <id>'), so tests can tell samples apart."""
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int, first_id: int = 0, bad: dict | None = None,
                 captions: int = 1) -> str:
    """Shards of samples whose caption is 'sample <id>' (with captions > 1: that many lines 'sample <id>
    caption <j>'); bad maps id -> {'jpg': ..., 'txt': ...} overrides. Returns the brace pattern naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for i in range(per_shard):
                sid = first_id + s * per_shard + i
                text = f"sample {sid}" if captions == 1 else "\n".join(f"sample {sid} caption {j}" for j in range(captions))
                sample = {"__key__": f"{sid:08d}", "jpg": jpeg(sid), "txt": text}
                sample.update((bad or {}).get(sid, {}))
                w.write(sample)
        shards.append({"name": name, "samples": per_shard})
    (folder / "manifest.json").write_text(json.dumps({"shards": shards, "total": n_shards * per_shard}))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def write_pairs_csv(path: Path, n: int, image_column: str = "filepath", caption_column: str = "title",
                    separator: str = ",") -> Path:
    """A CSV (or TSV) of n image files beside it, paths relative to its folder, captions 'sample <id>'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{image_column}{separator}{caption_column}"]
    for i in range(n):
        (path.parent / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append(f"{i}.jpg{separator}sample {i}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_class_folders(root: Path, classes: list[str], per_class: int) -> Path:
    """root/<class>/<i>.jpg: the layout data.kind=folder reads, captions made from the class names."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(jpeg(c * per_class + i))
    return root
