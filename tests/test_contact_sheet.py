"""dalle_jax.contact_sheet: the README's picture of a generate run, with the checker's verdicts."""

import json

import numpy as np
from PIL import Image

from core_jax.data import shapes
from dalle_jax import contact_sheet


def write_run(root, rows):
    """The layout `generate --prompts_file` writes: prompts.json and NNN/000.png, 001.png, ..."""
    root.mkdir()
    (root / "prompts.json").write_text(json.dumps({f"{i:03d}": c for i, (c, _) in enumerate(rows)}))
    for i, (_, images) in enumerate(rows):
        (root / f"{i:03d}").mkdir()
        for k, im in enumerate(images):
            Image.fromarray(im).save(root / f"{i:03d}" / f"{k:03d}.png")
    return str(root)


def test_sheet_counts_what_the_checker_passes(tmp_path):
    seen = shapes.make_example("test_seen", 0)
    unseen = shapes.make_example("test_unseen", 0)
    black = np.zeros_like(seen["image"])
    run = write_run(
        tmp_path / "s",
        [
            (seen["caption"], [seen["image"], black, seen["image"]]),
            (unseen["caption"], [black, unseen["image"], black]),
            ("a photo of a cat", [black, black, black]),
        ],
    )
    rows = contact_sheet.read_run(run)
    verdicts = [contact_sheet.caption_verdict(c, ims) for c, ims in rows]
    assert verdicts == ["seen pairs; checker passes 2 of 3", "held-out pair; checker passes 1 of 3", ""]
    out = tmp_path / "sheet.png"
    assert contact_sheet.main(["--samples_dir", run, "--out", str(out), "--scale", "2"]) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (
        3 * (128 + contact_sheet.PAD) + contact_sheet.PAD,
        contact_sheet.TEXT_WIDTH + 3 * (128 + contact_sheet.PAD),
        3,
    )
    # The first caption's best image sits top-left of the image area, upscaled 2x.
    x, y = contact_sheet.TEXT_WIDTH, contact_sheet.PAD
    np.testing.assert_array_equal(sheet[y : y + 128 : 2, x : x + 128 : 2], seen["image"])


def test_a_folder_without_prompts_is_an_error(tmp_path, capsys):
    assert contact_sheet.main(["--samples_dir", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "prompts.json not found" in capsys.readouterr().err
