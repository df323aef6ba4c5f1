"""Metrics of radvlm: each is a torchmetrics ``Metric`` usable both as a GRPO reward and a validation metric."""

from metrics.base import PerSampleMetric
from metrics.bertscore import BERTScore, minilm_path
from metrics.boxes import format_boxes, pairwise_iou, parse_boxes
from metrics.chexbert import CheXbert, CheXbertF1, CheXbertModel, CheXbertSimilarity
from metrics.grounding import BoxFormat, GroundingMAP, SoftF1, average_precision, soft_f1
from metrics.radcliq import RadCliQ, radcliq_v1
from metrics.radgraph import RadGraphF1, radgraph_feature
from metrics.text import BLEU, GLEU, ROUGEL, bleu, gleu, rouge_l
