"""``python -m radvlm_tools.infer``: one image and one question through the real loading and prompt path."""

import json

import numpy as np
from PIL import Image

from radvlm_tools import infer


def test_infer_answers_one_question_on_the_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    image = tmp_path / "cxr.png"
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype("uint8")).save(image)
    result = infer.main([str(image), "Write a radiology report for this Chest X-ray.", "--model", str(tiny_ckpt),
                         "--max-new-tokens", "5", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    assert 1 <= result["tokens"] <= 5 and result["thinking"] is False and result["answer"] == result["completion"].strip()
    thinking = infer.main([str(image), "Where is the heart?", "--model", str(tiny_ckpt), "--max-new-tokens", "4",
                           "--thinking", "on"])
    assert thinking["thinking"] is True
    assert capsys.readouterr().out.strip() == thinking["answer"]  # without --json: the answer only
