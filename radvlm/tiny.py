"""Write a tiny, complete Qwen3-VL checkpoint folder offline (for tests and the CPU demo).

``python -m radvlm.tiny OUT_DIR [--corpus FILE] [--seed 0]`` writes, without any network access, a folder
in exactly the Hugging Face layout of a real Qwen3-VL checkpoint (the files: ``write_tiny_checkpoint``).
Because it is a normal checkpoint folder, ``Policy.from_pretrained(OUT_DIR)`` loads it through the very
same code path as ``Qwen/Qwen3-VL-8B-Instruct``. Everything is deterministic for a given seed and corpus.

Deviations from the paper's Qwen3-VL: random weights of a miniature shape, a tokenizer trained here on chest
X-ray text, and (``--image-stats-from DIR``) pixels normalised by the training images' own statistics instead
of Qwen's 0.5 / 0.5 (why: ``image_stats``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

#: Qwen special tokens, in the order Qwen2/3 tokenizers list them (ids follow the trained vocabulary)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: added but not "special": they survive ``skip_special_tokens`` decoding, as in Qwen3
THINK_TOKENS = ("<think>", "</think>")

# Qwen2's pre-tokenisation pattern: contractions, words with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace.
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A compact Qwen3-VL chat template: for conversations of system (first only), user and assistant messages it
# renders exactly what the Qwen3-VL Instruct template (chat_template.json of Qwen/Qwen3-VL-8B-Instruct) renders
# (tests/radvlm/test_chat_templates.py checks it); tools are left out. Content is a string or a list of
# {"type": "image"|"video"|"text"} parts; an image renders as <|vision_start|><|image_pad|><|vision_end|> (one
# pad, expanded to the image's visual tokens by radvlm.chat / the processor).
CHAT_TEMPLATE = (
    "{%- macro render(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for part in content %}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' or 'video' in part %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + render(messages[0].content) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: Built-in corpus: enough chest X-ray vocabulary for a usable tokenizer when no corpus is given.
DEFAULT_CORPUS = (
    "Write a radiology report for this Chest X-ray.",
    "Generate the findings section of the report for this chest radiograph.",
    "Locate the abnormalities on this Chest X-ray.",
    "Please locate the following phrase on the image: right lower lobe consolidation.",
    "Where is the heart located on this image?",
    "Which abnormalities are present in this Chest X-ray?",
    "The heart is enlarged. There is a small right pleural effusion with adjacent atelectasis.",
    "The cardiomediastinal silhouette is within normal limits. No focal consolidation, pleural effusion or "
    "pneumothorax. There is a 1.5 cm nodule in the left upper lobe. Patchy opacity in the right lower lobe "
    "may represent pneumonia. Mild pulmonary edema. Cardiomegaly. Apical pneumothorax on the left side.",
    "The mass is located at the coordinates [0.12, 0.30, 0.50, 0.71] on the image.",
    "This phrase can be observed at [0.05, 0.10, 0.45, 0.90] and [0.55, 0.10, 0.95, 0.90] on the image.",
    "No abnormalities or lesions are detected on this Chest X-ray.",
    "Yes, there is a moderate left pleural effusion. No, the lungs are clear. No Finding.",
    "Let me look at the lungs, the heart and the costophrenic angles first. /think",
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024):
    """Train a Qwen-style byte-level BPE tokenizer on ``corpus``; returns a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    tok.add_tokens(list(THINK_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.padding_side = "left"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer, image_size: int = 128, text_hidden: int = 128, vision_hidden: int = 64,
                patch_size: int = 16, vision_depth: int = 2, text_layers: int = 2):
    """A valid miniature ``Qwen3VLConfig`` whose special token ids match ``tokenizer``."""
    from transformers import Qwen3VLConfig

    vocab = ((len(tokenizer) + 63) // 64) * 64  # (pad the embedding to a multiple of 64, as real models do)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = 16  # mrope_section must sum to head_dim / 2 = 8
    patches_per_side = image_size // patch_size
    text_config = dict(
        vocab_size=vocab,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_hidden // head_dim // 2,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision_config = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text_hidden,
        num_position_embeddings=patches_per_side**2,
        deepstack_visual_indexes=[1],
    )
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    return config


def image_stats(folder: str | Path, pattern: str = "*.png") -> tuple[float, float]:
    """Mean and standard deviation of the pixel values (on [0, 1], grey level of RGB) of the images in
    ``folder``: the normalisation of a tiny checkpoint trained from scratch on those images.

    Why the data's own pixel statistics matter for a vision tower trained from scratch: phantom radiographs are
    dark (pixel mean 0.26, std 0.16 on [0, 1]). With Qwen's 0.5 / 0.5 every patch is mostly one large negative
    offset, which the random patch projection maps to nearly one direction, so the tower's output at
    initialisation is almost the same for every image (it varies by about 1 % across images); SFT then grew
    that constant part and the images were ignored (greedy answers identical on own and shuffled images).
    Centred and scaled by the data's statistics the patches keep their differences and the tower learns
    (configs/demo/sft.yaml)."""
    import numpy as np
    from PIL import Image

    total = total_sq = count = 0.0
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no {pattern} images in {folder}")
    for path in paths:
        with Image.open(path) as img:
            a = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
        total, total_sq, count = total + a.sum(), total_sq + (a * a).sum(), count + a.size
    mean = total / count
    return round(float(mean), 3), round(float(np.sqrt(max(total_sq / count - mean * mean, 1e-12))), 3)


def image_processor_config(min_pixels: int = 32 * 32, max_pixels: int = 256 * 256, image_mean: float = 0.5,
                           image_std: float = 0.5, patch_size: int = 16) -> dict:
    """``preprocessor_config.json`` of the tiny checkpoint (Qwen3-VL values but for the pixel budget and, when
    given, the pixel normalisation)."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [image_mean] * 3,
        "image_std": [image_std] * 3,
        "do_convert_rgb": True,
        "patch_size": patch_size,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }


def write_tiny_checkpoint(
    out_dir: str | Path,
    corpus: Sequence[str] | None = None,
    seed: int = 0,
    image_size: int = 128,
    vocab_size: int = 1024,
    text_hidden: int = 128,
    vision_hidden: int = 64,
    image_mean: float = 0.5,
    image_std: float = 0.5,
    patch_size: int = 16,
    vision_depth: int = 2,
    text_layers: int = 2,
) -> Path:
    """Write the tiny checkpoint folder and return its path. Same seed and corpus → same files.

    - ``config.json`` + ``model.safetensors``: a randomly initialised ``Qwen3VLForConditionalGeneration``
      (text 128 wide × 2 layers, vision 64 wide × 2 blocks, about 0.8 M parameters);
    - ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE tokenizer trained here on chest X-ray
      prompt and report text (digits split one by one, as Qwen's pre-tokenizer does), carrying the Qwen special
      tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ``<think>`` …);
    - ``preprocessor_config.json``: the Qwen2-VL image processor (patch 16, merge 2, as Qwen3-VL uses); pixels
      are normalised with ``image_mean`` / ``image_std`` (Qwen's 0.5 / 0.5 by default; ``--image-stats-from
      DIR`` takes the mean and standard deviation of the images in DIR, as the demo does with the phantom's
      training images: ``image_stats``);
    - ``chat_template.jinja``: a compact chat template that renders our conversations exactly as the Qwen3-VL
      Instruct template does (``CHAT_TEMPLATE``).
    """
    from transformers import Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(DEFAULT_CORPUS) + list(corpus or [])
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = tiny_config(tokenizer, image_size=image_size, text_hidden=text_hidden, vision_hidden=vision_hidden,
                         patch_size=patch_size, vision_depth=vision_depth, text_layers=text_layers)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [config.eos_token_id, config.pad_token_id]
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    processor = image_processor_config(image_mean=image_mean, image_std=image_std, patch_size=patch_size)
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--corpus", help="text file, one training sentence per line, for the tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--image-stats-from", metavar="DIR",
                        help="normalise pixels with the mean and std of the PNG images in DIR (else 0.5 / 0.5)")
    args = parser.parse_args(argv)
    corpus = Path(args.corpus).read_text().splitlines() if args.corpus else None
    mean, std = image_stats(args.image_stats_from) if args.image_stats_from else (0.5, 0.5)
    path = write_tiny_checkpoint(args.out_dir, corpus=corpus, seed=args.seed, image_size=args.image_size,
                                 image_mean=mean, image_std=std)
    n = sum(p.numel() for p in __import__("safetensors.torch").torch.load_file(path / "model.safetensors").values())
    print(f"wrote a tiny Qwen3-VL checkpoint ({n / 1e6:.2f} M parameters, pixels normalised with mean {mean}, "
          f"std {std}) to {path}")


if __name__ == "__main__":
    main()
