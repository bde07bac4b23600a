"""CSV/TSV and image-folder data sets: columns, relative paths, class-name captions, skip-and-count across workers."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dsclip.data.config import CsvConfig, FolderConfig
from dsclip.data.files import CsvDataset, FolderDataset

WIDTH = 48


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def char_tokens(captions: list[str]) -> torch.Tensor:
    """Stands in for a tokenizer: character codes, padded, so tests can read captions back."""
    return torch.tensor([[ord(c) for c in t.ljust(WIDTH)[:WIDTH]] for t in captions], dtype=torch.long)


def text(tokens: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in tokens).rstrip()


def save_png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(path)


def test_tsv_with_custom_columns_and_relative_paths(tmp_path):
    save_png(tmp_path / "imgs" / "a.png", 10)
    save_png(tmp_path / "imgs" / "b.png", 200)
    (tmp_path / "pairs.tsv").write_text("caption\tpath\n a red thing\timgs/a.png\na blue thing\timgs/b.png\n")
    ds = CsvDataset(CsvConfig(path=str(tmp_path / "pairs.tsv"), image_column="path", caption_column="caption"),
                    transform=to_tensor, tokenizer=char_tokens)
    image, tokens = ds[1]
    assert image.shape == (3, 8, 8) and float(image.mean()) == 200
    assert tokens.shape == (WIDTH,) and text(tokens) == "a blue thing"
    assert text(ds[0][1]) == "a red thing"


def test_bad_rows_are_replaced_and_counted_across_workers(tmp_path):
    for i in (0, 2, 5):
        save_png(tmp_path / f"{i}.png", i)
    (tmp_path / "3.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "6.png").write_bytes(b"")
    rows = ["filepath,title", "0.png,zero", "1.png,missing file", "2.png,two", "3.png,corrupt", "4.png,", "5.png,five", "6.png,empty file"]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    ds = CsvDataset(CsvConfig(path=str(tmp_path / "d.csv")), transform=to_tensor, tokenizer=char_tokens)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))  # one batch per worker
    captions = [text(t) for _, tokens in batches for t in tokens]
    # 1 -> 2; 3 -> (4 has no caption) -> 5; 4 -> 5; 6 -> wraps to 0
    assert captions == ["zero", "two", "two", "five", "five", "five", "zero"]
    assert ds.skipped() == {"missing_image": 1, "empty_image": 1, "bad_image": 1, "no_caption": 2, "too_large": 0}


def test_csv_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        CsvDataset(CsvConfig(path=str(tmp_path / "nope.csv")), transform=to_tensor, tokenizer=char_tokens)
    (tmp_path / "d.csv").write_text("image,text\nx.png,hi\n")
    with pytest.raises(ValueError, match=r"image_column='filepath' is not a column .* \['image', 'text'\]"):
        CsvDataset(CsvConfig(path=str(tmp_path / "d.csv")), transform=to_tensor, tokenizer=char_tokens)


def test_folder_captions_come_from_class_names_and_templates(tmp_path):
    save_png(tmp_path / "ankle_boot" / "x.png", 1)
    save_png(tmp_path / "ankle_boot" / "y.png", 2)
    save_png(tmp_path / "trouser" / "z.jpg", 3)
    (tmp_path / "trouser" / "notes.txt").write_text("not an image")
    cfg = FolderConfig(path=str(tmp_path), templates=["a photo of a {}.", "{}"])
    ds = FolderDataset(cfg, transform=to_tensor, tokenizer=char_tokens)
    assert ds.class_names == ["ankle boot", "trouser"] and len(ds) == 3
    assert [text(ds[i][1]) for i in range(3)] == ["a photo of a ankle boot.", "ankle boot", "a photo of a trouser."]
    ds.set_epoch(1)
    assert text(ds[0][1]) == "ankle boot"
    labelled = FolderDataset(cfg, transform=to_tensor, tokenizer=char_tokens, labels=True)
    assert [labelled[i][1] for i in range(3)] == [0, 0, 1]


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        FolderDataset(FolderConfig(path=str(tmp_path)), transform=to_tensor, tokenizer=char_tokens)
    with pytest.raises(ValueError, match="exactly one"):
        FolderConfig(path=str(tmp_path), templates=["no slot"]).validate()
