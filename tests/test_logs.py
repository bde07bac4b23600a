"""One output path: the `dsclip` logger shows INFO on rank 0 only, warnings on every rank, and
holds library chatter back unless the level is debug."""
import logging

import pytest

from dsclip.logs import prints_as_debug, setup_logging


@pytest.fixture(autouse=True)
def restore_logging():
    yield
    setup_logging("info", rank=0)


def test_rank_zero_shows_info_and_other_ranks_only_warnings(capsys):
    for rank in (0, 1):
        setup_logging("info", rank=rank)
        logging.getLogger("dsclip.model.pos_embed").info("resizing grid 7x7 -> 10x10")
        logging.getLogger("dsclip.training.loop").warning("a general metric dropped")
    out = capsys.readouterr().out.splitlines()
    assert out == ["[dsclip] resizing grid 7x7 -> 10x10", "[dsclip] WARNING: a general metric dropped",
                   "[dsclip rank 1] WARNING: a general metric dropped"]


def test_log_level_warning_hides_progress_and_debug_shows_library_info(capsys):
    setup_logging("warning", rank=0)
    logging.getLogger("dsclip.training.loop").info("step 10/100")
    logging.getLogger("open_clip").info("Loaded built-in model config")
    assert capsys.readouterr().out == ""
    setup_logging("debug", rank=0)
    logging.getLogger("open_clip").info("Loaded built-in model config")
    assert capsys.readouterr().out == "[dsclip] open_clip: Loaded built-in model config\n"


def test_deepspeed_cpu_notice_is_dropped_unless_debug():
    """A filter on DeepSpeed's logger (it keeps its own handler once imported, so this is the one hook)."""
    def passes(message: str) -> bool:
        record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None)
        return logging.getLogger("DeepSpeed").filter(record)

    notice = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    setup_logging("info", rank=0)
    assert not passes(notice) and passes("a real DeepSpeed warning")
    setup_logging("debug", rank=0)
    assert passes(notice)


def test_handler_is_installed_once_however_often_set_up():
    setup_logging("info", rank=0)
    setup_logging("info", rank=0)
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_StdoutHandler"]
    assert len(ours) == 1


def test_library_prints_become_debug_lines(capsys):
    setup_logging("info", rank=0)
    with prints_as_debug("DeepSpeed"):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert capsys.readouterr().out == ""
    setup_logging("debug", rank=0)
    with prints_as_debug("DeepSpeed"):
        print("built successfully")
    assert capsys.readouterr().out == "[dsclip] DeepSpeed: built successfully\n"
