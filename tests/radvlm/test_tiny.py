import json

import torch
from safetensors.torch import load_file

from radvlm.policy import Policy
from radvlm.tiny import main, write_tiny_checkpoint


def test_tiny_checkpoint_is_a_complete_hf_folder(tiny_ckpt):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "chat_template.jinja"):
        assert (tiny_ckpt / name).is_file(), name
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"


def test_tiny_tokenizer_has_qwen_special_tokens_and_single_digits(tiny_ckpt):
    tok = Policy.from_pretrained(tiny_ckpt).tokenizer
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<think>", "</think>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert tok.tokenize("[0.12,")[:5] == ["[", "0", ".", "1", "2"]


def test_same_seed_gives_identical_weights_and_other_seed_differs(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=3)
    b = write_tiny_checkpoint(tmp_path / "b", seed=3)
    c = write_tiny_checkpoint(tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_cli_writes_folder(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A small left apical pneumothorax.\nNo focal consolidation.\n")
    main([str(tmp_path / "t"), "--corpus", str(corpus)])
    assert "M parameters" in capsys.readouterr().out
    assert (tmp_path / "t" / "model.safetensors").is_file()
