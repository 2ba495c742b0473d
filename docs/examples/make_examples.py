"""Regenerate the example images of the app (run once; the outputs are committed).

    python docs/examples/make_examples.py

Synthetic scenes come from `training.synthetic.make_scene` (seed 0, indices from
the test split of the default 8,000-image set), rendered at the model's 112 px
and upscaled 3x with NEAREST so the patch grid stays crisp on screen. The real
photos come from installed packages (see LICENSES.md): Grace Hopper from
matplotlib's sample data, and four photos from scikit-image's bundled data, saved
as JPEG. scikit-image is not a dependency of the project: install it only to
regenerate those four (``pip install scikit-image``); without it they are kept.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import matplotlib  # noqa: E402
from PIL import Image  # noqa: E402

from training.synthetic import make_scene  # noqa: E402

SEED, SIZE, UPSCALE = 0, 112, 3
SCENES = (7000, 7008, 7005, 7001)  # test split: one, one small, two and three objects
# scikit-image's bundled photos: (file in skimage/data, saved as, caption, licence).
SKIMAGE_PHOTOS = (
    ("chelsea.png", "chelsea_cat.jpg", "a tabby cat lying down and looking to the side", "CC0"),
    ("coffee.png", "coffee.jpg", "a cup of coffee on a saucer with a spoon", "CC0"),
    ("rocket.jpg", "rocket.jpg", "a rocket lifting off from a launch pad into the sky", "public domain"),
    ("astronaut.png", "astronaut.jpg", "an astronaut in an orange suit holding a helmet", "public domain"),
)


def main() -> None:
    examples = []
    for index in SCENES:
        image, _, captions = make_scene(SEED, index, SIZE)
        name = f"scene_{index}.png"
        image.resize((SIZE * UPSCALE,) * 2, Image.Resampling.NEAREST).save(HERE / name, optimize=True)
        examples.append(
            {
                "image": name,
                "caption": min(captions, key=len),
                "source": f"training.synthetic.make_scene(seed={SEED}, index={index}, size={SIZE}), "
                f"upscaled x{UPSCALE}",
            }
        )
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    shutil.copyfile(photo, HERE / "grace_hopper.jpg")
    examples.append(
        {
            "image": "grace_hopper.jpg",
            "caption": "a woman in a navy uniform and cap in front of an american flag",
            "source": "matplotlib sample data (public domain, see LICENSES.md)",
            "photo": True,
        }
    )
    try:
        import skimage
    except ImportError:
        skimage = None
        print("scikit-image is not installed: keeping the committed copies of its four photos.")
    for src, name, caption, licence in SKIMAGE_PHOTOS:
        if skimage is not None:
            Image.open(Path(skimage.__file__).parent / "data" / src).convert("RGB").save(HERE / name, quality=90)
        examples.append(
            {"image": name, "caption": caption, "source": f"scikit-image data, {src} ({licence}, see LICENSES.md)",
             "photo": True}  # fmt: skip
        )
    (HERE / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")


if __name__ == "__main__":
    main()
