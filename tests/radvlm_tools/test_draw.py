import numpy as np
import pytest
from PIL import Image

from radvlm_tools.draw import (
    GT_COLOUR,
    PRED_COLOUR,
    draw_boxes,
    image_grid,
    pixel_box,
    sample_picture,
)

GREY = (90, 90, 90)


def grey(w=100, h=80):
    return Image.new("RGB", (w, h), GREY)


def test_written_picture_has_box_colours_on_the_box_edges(tmp_path):
    image_path = tmp_path / "xray.png"
    grey().convert("L").save(image_path)
    # ground truth [0.1, 0.1, 0.4, 0.5] on 100×80 → pixels x 10..40, y 8..40
    # predicted   [0.6, 0.5, 0.9, 0.9] → pixels x 60..90, y 40..72
    answer = "The mass is located at the coordinates [0.6, 0.5, 0.9, 0.9] on the image."
    picture = sample_picture(image_path, answer, [[0.1, 0.1, 0.4, 0.5]], caption=None, size=None)
    out = tmp_path / "drawn.png"
    picture.save(out)
    px = np.asarray(Image.open(out).convert("RGB"))  # (H, W, 3), indexed [y, x]
    assert px.shape == (80, 100, 3)
    for x, y in ((10, 24), (40, 24), (25, 8), (25, 40)):  # left, right, top, bottom edge of the GT box
        assert tuple(px[y, x]) == GT_COLOUR, (x, y)
    for x, y in ((60, 56), (90, 56), (75, 50 - 10), (75, 72)):  # edges of the predicted box (top: y = 40)
        assert tuple(px[y, x]) == PRED_COLOUR, (x, y)
    assert tuple(px[24, 25]) == GREY  # inside the GT box: untouched
    assert tuple(px[5, 95]) == GREY  # outside every box


def test_prediction_is_drawn_over_ground_truth_where_they_coincide():
    px = np.asarray(draw_boxes(grey(), [[0.2, 0.2, 0.6, 0.6]], [[0.2, 0.2, 0.6, 0.6]], size=None))
    assert tuple(px[32, 20]) == PRED_COLOUR  # x = 0.2·100, y between 0.2·80 = 16 and 0.6·80 = 48


def test_boxes_are_clipped_to_the_image_and_corners_ordered():
    # [1.2, 0.5, 0.8, -0.1] spans x 0.8..1 and y 0..0.5 → pixels x 80..99, y 0..40
    assert pixel_box([1.2, 0.5, 0.8, -0.1], 100, 80) == (80, 0, 99, 40)
    px = np.asarray(draw_boxes(grey(), [], [[1.2, 0.5, 0.8, -0.1]], size=None, line_width=1))
    assert tuple(px[20, 80]) == PRED_COLOUR and tuple(px[20, 99]) == PRED_COLOUR
    assert pixel_box([float("nan"), 0, 1, 1], 100, 80) is None


def test_caption_goes_in_a_band_below_the_unchanged_picture():
    plain = np.asarray(draw_boxes(grey(), [[0.1, 0.1, 0.4, 0.5]], [], size=None))
    captioned = np.asarray(draw_boxes(grey(), [[0.1, 0.1, 0.4, 0.5]], [], caption="Locate: left lower lobe mass",
                                      size=None))
    assert captioned.shape[0] > 80 and captioned.shape[1] == 100
    np.testing.assert_array_equal(captioned[:80], plain)
    band = captioned[80:]
    assert (band.max(axis=-1) < 100).sum() > 20  # dark (anti-aliased black) caption text
    assert (band == 255).all(axis=-1).mean() > 0.5  # on a white band


def test_small_images_are_scaled_up_to_size():
    picture = draw_boxes(Image.new("L", (128, 64), 50), [], [], size=512)
    assert picture.size == (512, 256) and picture.mode == "RGB"


def test_image_grid_places_pictures_in_rows():
    pictures = [Image.new("RGB", (10, 12), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(pictures, columns=2, pad=4)
    assert grid.size == (2 * 10 + 3 * 4, 3 * 12 + 4 * 4)  # 2 columns, 3 rows
    px = np.asarray(grid)
    assert tuple(px[4 + 2 * (12 + 4), 4]) == (160, 0, 0)  # 5th picture: row 2, column 0
    with pytest.raises(ValueError, match="at least one"):
        image_grid([])


def test_missing_image_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        sample_picture(tmp_path / "nope.png", "", [])


def test_box_labels_name_the_finding_of_each_box():
    from radvlm_tools.draw import box_labels

    text = ("The mass is located at the coordinates [0.1, 0.1, 0.2, 0.2] on the image. The pleural effusion is "
            "located at the coordinates [0.5, 0.5, 0.9, 0.9] and [0.1, 0.5, 0.4, 0.9] on the image.")
    assert box_labels(text) == ["mass", "pleural effusion", "pleural effusion"]  # "and [..]": same finding
    assert box_labels("This phrase can be observed at [0.1, 0.1, 0.2, 0.2] on the image.") == [""]
    assert box_labels("No abnormalities or lesions are detected on this Chest X-ray.") == []


def test_labels_are_written_above_ground_truth_and_below_predicted_boxes():
    box = [0.3, 0.3, 0.6, 0.6]  # pixels 60..120 on a 200 × 200 image
    px = np.asarray(draw_boxes(grey(200, 200), [box], [box], size=None, gt_labels=["mass"],
                               pred_labels=["nodule"])).astype(int)
    above, below = px[35:58, 60:130], px[123:150, 60:130]
    greenish = lambda a: ((a[..., 1] > 120) & (a[..., 0] < 100)).sum()  # noqa: E731
    reddish = lambda a: ((a[..., 0] > 120) & (a[..., 1] < 100)).sum()  # noqa: E731
    assert greenish(above) > 5 and reddish(above) == 0
    assert reddish(below) > 5 and greenish(below) == 0
    unlabelled = np.asarray(draw_boxes(grey(200, 200), [box], [box], size=None)).astype(int)
    assert greenish(unlabelled[35:58, 60:130]) == 0
