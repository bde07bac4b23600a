"""The `dsclip` console script: `dsclip <command> [flags]`; each command is a module of its own."""
import importlib
import sys
from typing import Optional

COMMANDS = {  # name -> (module with main(argv), what it does)
    "train": ("dsclip.train", "fine-tune in this process (multi-rank: deepspeed dsclip/train.py ...)"),
    "eval": ("dsclip.commands.eval", "zero-shot / retrieval evaluation of a model (also under torchrun, ZeRO-3)"),
    "export": ("dsclip.commands.export", "merge a DeepSpeed checkpoint into an open_clip model folder"),
    "make-shards": ("dsclip.commands.make_shards", "write WebDataset shards from a CSV, image folder, fashion-mnist "
                    "or openclipart"),
    "wise-ft": ("dsclip.commands.wise_ft", "mix zero-shot and fine-tuned weights over alphas (WiSE-FT), evaluate, "
                "save the chosen mix"),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = [f"usage: dsclip {{{','.join(COMMANDS)}}} ..."]
        lines += [f"  {name:<12} {about}" for name, (_, about) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr)
        return 2
    # Import only the command that runs, and only what it needs.
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
