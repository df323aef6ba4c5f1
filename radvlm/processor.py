"""The Qwen3-VL processor of a checkpoint, loaded without torchvision.

``load_processor`` rebuilds it from ``AutoTokenizer`` + ``AutoImageProcessor`` (+ the folder's chat template), so
that it also loads where torchvision is absent (the PIL image processor is used then and no video processor is
needed). ``radvlm.policy.Policy.from_pretrained`` and the data module load the processor through it.
"""

from __future__ import annotations

from pathlib import Path


def load_processor(name_or_path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """Tokenizer + image processor of a Qwen3-VL checkpoint, without needing torchvision.

    Returns a ``Qwen3VLProcessor`` whose ``video_processor`` may be ``None``. Prompts are left-padded. The
    checkpoint's chat template (``chat_template.jinja``, else ``chat_template.json``'s ``"chat_template"``, as
    ``AutoProcessor`` reads them, else the tokenizer's own) is set on the processor and on the tokenizer, whose
    ``apply_chat_template`` renders every conversation (``radvlm.chat``); ``None`` when there is none.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    tokenizer.padding_side = "left"
    kwargs = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        kwargs["max_pixels"] = int(max_pixels)
    image_processor = AutoImageProcessor.from_pretrained(str(name_or_path), **kwargs)
    template = _processor_chat_template(str(name_or_path)) or getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = template or None
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=template)


def _processor_chat_template(name_or_path: str) -> str | None:
    """The processor chat template of a checkpoint (folder or hub id): ``chat_template.jinja``, else the
    ``"chat_template"`` of ``chat_template.json``; ``None`` when it has neither."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path is not None:
            text = Path(path).read_text(encoding="utf-8")
            return text if name.endswith(".jinja") else json.loads(text).get("chat_template")
    return None


def _processor_class():
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """``Qwen3VLProcessor`` that accepts ``video_processor=None`` (no torchvision needed for images)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory, **kwargs):
            # the parent's save needs a video processor: save the two parts we have
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)
            if self.chat_template:
                (Path(save_directory) / "chat_template.jinja").write_text(self.chat_template)

    return ImageOnlyQwen3VLProcessor
