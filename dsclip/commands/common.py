"""What every command shares: the error guard, logging flags, the default DeepSpeed config and
the weight flags."""
import argparse
import atexit
import gc
import sys
from pathlib import Path
from typing import Callable

from dsclip.errors import RankError, UserError
from dsclip.logs import LEVELS, process_rank, setup_logging

DEFAULT_DS_CONFIG = "ds_configs/zero3.json"
REPO_DS_CONFIG = Path(__file__).resolve().parents[2] / DEFAULT_DS_CONFIG


def default_ds_config() -> str:
    """ds_configs/zero3.json of the working directory, else the checkout dsclip runs from."""
    return DEFAULT_DS_CONFIG if Path(DEFAULT_DS_CONFIG).is_file() or not REPO_DS_CONFIG.is_file() \
        else str(REPO_DS_CONFIG)


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", "--log_level", dest="log_level", choices=list(LEVELS), default="info",
                        help="dsclip's messages at this level and above (rank 0; other ranks show warnings); "
                        "debug also shows DeepSpeed's and open_clip's own lines")


def add_ds_config(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        default=default_ds_config(), help=help_text)


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set optim.lr=1e-5 (repeatable)")


def add_launcher_rank(parser: argparse.ArgumentParser) -> None:
    """The DeepSpeed launcher passes --local_rank=N to every rank; the rank itself comes from RANK."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def add_trust_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow pickled weight files that can run "
                        "code when loaded (recipe key model.trust_checkpoint)")


def add_weight_flags(parser: argparse.ArgumentParser, pretrained_help: str) -> None:
    parser.add_argument("--pretrained", metavar="SOURCE", help=pretrained_help)
    parser.add_argument("--adapters", metavar="FOLDER", help="LoRA adapters trained on --pretrained (an export's "
                        "adapters/ folder; recipe key adapters.weights): merged into the weights, or trained on "
                        "with adapters.kind: lora")
    add_trust_checkpoint(parser)


def weight_overrides(args: argparse.Namespace) -> list[str]:
    """Recipe overrides for the shared weight flags (--pretrained and --adapters where the command has
    them, --trust-checkpoint)."""
    overrides = [f"{key}={value}" for key, value in (("model.pretrained", getattr(args, "pretrained", None)),
                                                     ("adapters.weights", getattr(args, "adapters", None))) if value]
    return overrides + (["model.trust_checkpoint=true"] if args.trust_checkpoint else [])


def guarded(args: argparse.Namespace, command: Callable[[], int]) -> int:
    """Set up logging, then run a command; a user error becomes one line on stderr (from rank 0,
    or from every rank for a RankError) and exit status 2."""
    setup_logging(args.log_level)
    # Interpreter shutdown runs the cyclic garbage collector over every object torch, transformers
    # and DeepSpeed made (3-4 s a process here, so a launcher notices a failed rank that much later)
    # for nothing: the process is ending. Exit handlers registered later than this one (W&B's,
    # DataLoader workers') run first; then every object is put out of the collector's reach. dsclip
    # closes its files explicitly, so none waits for a collection to be flushed.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        return command()
    except (UserError, FileNotFoundError) as e:
        if process_rank() == 0 or isinstance(e, RankError):
            print(f"dsclip: error: {e}", file=sys.stderr)
        return 2
