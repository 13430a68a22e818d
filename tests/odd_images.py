"""Every kind of image file a real dataset holds, good and bad, written on the fly."""

import os

import numpy as np
from PIL import Image


def write_odd_images(directory, seed=0):
    """Writes the files; returns ({name: path} of decodable ones, {name: path} of broken ones)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    good = {}

    def save(name, image, **kwargs):
        path = os.path.join(directory, name)
        image.save(path, **kwargs)
        good[name] = path

    save("rgb.jpg", Image.fromarray(rgb))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    save("grey.jpg", Image.fromarray(rgb[..., 0]))
    save("rgb.png", Image.fromarray(rgb))
    save("grey16.png", Image.fromarray(rng.integers(0, 65536, (20, 30)).astype(np.uint16)))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    save("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
    save("animated.gif", Image.fromarray(rgb), save_all=True, append_images=[Image.fromarray(255 - rgb)])
    save("rgb.bmp", Image.fromarray(rgb))
    save("palette.bmp", Image.fromarray(rgb).convert("P"))
    save("rgb.webp", Image.fromarray(rgb))

    bad = {name: os.path.join(directory, name) for name in ("empty.jpg", "truncated.jpg", "truncated.png", "text.png")}
    open(bad["empty.jpg"], "wb").close()
    for name, source in (("truncated.jpg", "rgb.jpg"), ("truncated.png", "rgba.png")):
        with open(good[source], "rb") as file:
            data = file.read()
        with open(bad[name], "wb") as file:
            file.write(data[: len(data) // 2])
    with open(bad["text.png"], "w", encoding="utf-8") as file:
        file.write("not an image")
    return good, bad
