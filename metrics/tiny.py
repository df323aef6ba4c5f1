"""Write tiny, randomly initialised scorer models offline, in the exact on-disk formats of the real ones.

For tests, benchmarks and the CPU demo (the real CheXbert and RadGraph weights cannot be downloaded on this
project's machines, docs/paper.md §7b). Each writer produces what the real loading code reads, so the real
loading and scoring paths run end to end:

- ``write_tiny_bert(dir)``: a BERT (``BertModel``, bert-base-uncased architecture, 2 layers × 32 wide) with a
  lower-casing WordPiece tokenizer over a radiology word list plus single characters, ``save_pretrained``;
- ``write_tiny_chexbert(path, bert_dir)``: ``chexbert.pth`` as the public checkpoint stores it,
  ``{"model_state_dict": {"module.bert.…", "module.linear_heads.N.…"}}``;
- ``write_tiny_radgraph(dir, bert_dir)``: a radgraph model folder (``config.json`` in the DyGIE layout,
  ``vocabulary/`` with the RadGraph entity and relation labels, ``weights.th``) built by the radgraph
  package's own classes, with the tiny BERT as its encoder;
- ``write_tiny_causal_lm(dir)``: a judge-shaped causal LM (``LlamaForCausalLM``, the architecture of GREEN's
  ``StanfordAIMI/GREEN-radllama2-7b``, 2 layers × 32 wide) with a byte-level BPE tokenizer trained here on
  the radiology word list and ``<s>``/``</s>``/``<unk>`` special tokens, ``save_pretrained``; its greedy
  output is random text (for plumbing tests of ``metrics.green``).
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path

import torch

#: words given their own WordPiece entry (everything else splits into characters)
RADIOLOGY_WORDS = (
    "the there is are no of and with in to a an at on or not as be may seen",
    "heart size normal mild moderate severe small large stable unchanged new left right bilateral",
    "lung lungs lobe upper lower middle base bases apex pleural effusion effusions pneumothorax",
    "edema consolidation opacity opacities atelectasis pneumonia cardiomegaly cardiac silhouette",
    "mediastinal contours hilar clear acute process cardiopulmonary tube catheter line tip",
    "findings impression chest radiograph frontal lateral view compared prior study evidence",
    "fracture rib ribs spine osseous structures intact degenerative changes device pacemaker",
    "vascular congestion enlarged enlargement focal patchy streaky retrocardiac subsegmental",
)
ENTITY_LABELS = ("ANAT-DP", "OBS-DP", "OBS-U", "OBS-DA")  # RadGraph entity types
RELATION_LABELS = ("modify", "located_at", "suggestive_of")  # RadGraph relation types


def tiny_vocab() -> dict[str, int]:
    """WordPiece vocabulary: BERT special tokens, characters (word-initial and ``##``), radiology words."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens += list(chars) + ["##" + c for c in chars]
    for line in RADIOLOGY_WORDS:
        tokens += [w for w in line.split() if w not in tokens]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tiny_bert(folder: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> str:
    """A random BERT + WordPiece tokenizer folder loadable by ``AutoModel`` / ``AutoTokenizer``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=512,
        initializer_range=0.5,  # large random weights: outputs that vary with the input (0.02 gives near-constant)
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def write_tiny_chexbert(path: str | Path, bert_dir: str | Path, seed: int = 0) -> str:
    """A random CheXbert checkpoint (public ``chexbert.pth`` layout) on the BERT config of ``bert_dir``."""
    from transformers import AutoConfig

    from metrics.chexbert import CheXbertModel

    torch.manual_seed(seed)
    model = CheXbertModel(AutoConfig.from_pretrained(str(bert_dir)))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DataParallel
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "model_state_dict": state}, path)
    return str(path)


def radgraph_config(bert_name: str, max_span_width: int = 8, hidden: int = 16, feature_size: int = 8) -> dict:
    """A DyGIE ``config.json`` (NER + relation heads, as RadGraph's) with ``bert_name`` as encoder."""
    bert = {"type": "pretrained_transformer_mismatched", "model_name": bert_name, "max_length": 512}
    return {
        "dataset_reader": {"type": "dygie", "max_span_width": max_span_width, "token_indexers": {"bert": bert}},
        "model": {
            "type": "dygie",
            "embedder": {"token_embedders": {"bert": bert}},
            "feature_size": feature_size,
            "feedforward_params": {"dropout": 0.4, "hidden_dims": hidden, "num_layers": 2},
            "initializer": {"regexes": [["_span_width_embedding.weight", {"type": "xavier_normal"}]]},
            "loss_weights": {"coref": 0.0, "events": 0.0, "ner": 1.0, "relation": 1.0},
            "max_span_width": max_span_width,
            "module_initializer": {"regexes": [[".*weight", {"type": "xavier_normal"}]]},
            "modules": {
                "coref": {"coref_prop": 0, "max_antecedents": 100, "spans_per_word": 0.3},
                "events": {
                    "argument_spans_per_word": 0.8,
                    "loss_weights": {"arguments": 1.0, "trigger": 0.2},
                    "trigger_spans_per_word": 0.3,
                },
                "ner": {},
                "relation": {"spans_per_word": 0.5},
            },
            "target_task": "relation",
        },
    }


def write_tiny_radgraph(folder: str | Path, bert_dir: str | Path, model_type: str = "radgraph-xl",
                        seed: int = 0) -> str:
    """A random radgraph model folder (``config.json``, ``vocabulary/``, ``weights.th``) for ``model_type``."""
    from dotmap import DotMap
    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie

    from metrics import _compat

    _compat.apply()
    folder = Path(folder)
    (folder / "vocabulary").mkdir(parents=True, exist_ok=True)
    config = radgraph_config(str(Path(bert_dir).resolve()))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    vocab_dir = folder / "vocabulary"
    (vocab_dir / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    # NER labels: the null label "" must be index 0; relation labels carry no null entry
    (vocab_dir / f"{model_type}__ner_labels.txt").write_text("\n".join(("",) + ENTITY_LABELS) + "\n")
    (vocab_dir / f"{model_type}__relation_labels.txt").write_text("\n".join(RELATION_LABELS) + "\n")

    # the same construction as radgraph.RadGraph.__init__, then random weights saved as weights.th
    cfg = DotMap(config)
    vocab = Vocabulary.from_files(str(vocab_dir))
    embedder = text_field_embedders.BasicTextFieldEmbedder({"bert": token_embedders.PretrainedTransformerMismatchedEmbedder(
        model_name=cfg.model.embedder.token_embedders.bert.model_name,
        max_length=cfg.model.embedder.token_embedders.bert.max_length,
    )})
    model_kwargs = cfg.model.toDict()
    for name in ("type", "embedder", "initializer", "module_initializer"):
        del model_kwargs[name]
    torch.manual_seed(seed)
    model = dygie.DyGIE(vocab=vocab, embedder=embedder, **model_kwargs)
    torch.save(model.state_dict(), folder / "weights.th")
    return str(folder)


def calibrate_label_scorer(linear: torch.nn.Linear, logits: torch.Tensor, rate: float, scale: float) -> None:
    """Rewrite ``linear`` (a label scorer whose null class scores 0) in place so that, on the inputs that gave
    ``logits`` (N, L), about ``rate`` of the rows have a label above 0, the labels sharing them about evenly:
    logits become ``scale · (z − mean_l) − t`` with ``t`` the (1 − rate) quantile of the row maxima."""
    centred = scale * (logits - logits.mean(dim=0))  # (N, L)
    threshold = torch.quantile(centred.max(dim=1).values, 1.0 - rate)
    with torch.no_grad():
        linear.weight.mul_(scale)
        linear.bias.copy_(scale * (linear.bias - logits.mean(dim=0)) - threshold)


def calibrate_tiny_radgraph(folder: str | Path, texts: Sequence[str], model_type: str = "radgraph-xl",
                            entity_rate: float = 0.07, relation_rate: float = 0.5, scale: float = 30.0) -> dict:
    """Make a tiny random RadGraph (``write_tiny_radgraph``) predict as sparsely as a trained one, on ``texts``.

    Random label scorers give nearly the same logits to every span, so a random model labels most enumerated
    spans (about 8 per word) as entities and most pruned span pairs as relations, and decoding then costs far
    more than on real reports. Here the NER and relation label scorers are rescaled (``calibrate_label_scorer``)
    so that about ``entity_rate`` of the enumerated spans and ``relation_rate`` of the scored span pairs of
    ``texts`` get a label; ``weights.th`` is rewritten. Returns the density reached on ``texts``:
    ``{"entities_per_word", "relations_per_word"}`` (relations whose ends are both entities, as decoded)."""
    from metrics.radgraph import load_annotator
    from metrics.radgraph_annotate import annotate_words, report_words

    annotator = load_annotator(model_type, str(folder), "cpu")
    model = annotator.model
    ner = model._ner._ner_scorers[f"{model_type}__ner_labels"][1]._module
    relation = model._relation._relation_scorers[f"{model_type}__relation_labels"]
    reports = [words for words in (report_words(annotator, text)[0] for text in texts) if words]
    if not reports:
        raise ValueError("calibrate_tiny_radgraph: no text with words to calibrate on")
    def logits_of(layer) -> torch.Tensor:  # (rows scored on the reports, labels)
        seen: list[torch.Tensor] = []
        hook = layer.register_forward_hook(  # a copy: the relation head adds mention scores to it in place
            lambda _m, _i, out: seen.append(out.detach().reshape(-1, out.shape[-1]).clone()))
        try:
            annotate_words(annotator, reports)
        finally:
            hook.remove()
        return torch.cat(seen)

    calibrate_label_scorer(ner, logits_of(ner), entity_rate, scale)
    # the relation head pairs the spans its pruner keeps: rank them as the NER head scores entities (its
    # feedforward, its mean label logit), as a trained pruner keeps entity-like spans
    pruner = model._relation._mention_pruners[f"{model_type}__relation_labels"]._scorer
    with torch.no_grad():
        pruner[0]._module.load_state_dict(model._ner._ner_scorers[f"{model_type}__ner_labels"][0]._module.state_dict())
        pruner[1]._module.weight.copy_(ner.weight.mean(dim=0, keepdim=True) / scale)  # the same ranking, and
        pruner[1]._module.bias.copy_(ner.bias.mean().reshape(1) / scale)  # small: relation logits add it
    calibrate_label_scorer(relation, logits_of(relation), relation_rate, scale)
    torch.save(model.state_dict(), Path(folder) / "weights.th")
    annotations = [a for words in reports for a in annotate_words(annotator, [words])]
    n_words = sum(len(words) for words in reports)
    entities = [e for a in annotations for e in a["entities"].values()]
    return {"entities_per_word": len(entities) / n_words,
            "relations_per_word": sum(len(e["relations"]) for e in entities) / n_words}


def write_tiny_causal_lm(folder: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, vocab_size: int = 512,
                         seed: int = 0) -> str:
    """A random ``LlamaForCausalLM`` + byte-level BPE tokenizer folder loadable by ``AutoModelForCausalLM`` /
    ``AutoTokenizer`` (2048 positions, as GREEN's judge budget)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [line for line in RADIOLOGY_WORDS] + [string.ascii_letters + string.digits + string.punctuation]
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        model_max_length=2048)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)
