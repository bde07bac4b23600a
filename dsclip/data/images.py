"""Opening an image of untrusted data. PIL refuses an image only above twice its pixel limit and
merely warns between; a crafted file of a few KB can declare that many pixels and decode to
gigabytes. The size is read from the header before anything is decoded, and over the limit the
sample is skipped and counted as `too_large`."""
import warnings
from typing import BinaryIO, Union

from PIL import Image

MAX_PIXELS = 89_478_485  # PIL's own warning threshold (Image.MAX_IMAGE_PIXELS), here a hard limit


class ImageTooLarge(ValueError):
    """The image declares more than MAX_PIXELS pixels."""


def open_image(source: Union[str, BinaryIO]) -> Image.Image:
    """Image.open with the pixel count checked before decoding; use it as a context manager."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(str(e)) from None
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise ImageTooLarge(f"{image.width}x{image.height} pixels, above the limit of {MAX_PIXELS}")
    return image
