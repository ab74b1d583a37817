"""AdaBERT's student (Chen et al., IJCAI 2020): a stack of searched convolution cells on the teacher's
frozen embeddings.

This file is the derived (discrete) network and the pieces the search's supernet shares with it; it imports
nothing from dynaflow, so an export carries it as remote code. The search space follows the official code
(``research/other_seeds.md`` section C):

* **Input**: the fine-tuned teacher's embedding layer (frozen; its word, position and segment embeddings
  and LayerNorm), projected to ``hidden_size`` (128), LayerNorm, dropout. For sentence pairs the two
  sentences feed the first cell's two input nodes (each keeps its own tokens, the other's are zeroed);
  a single sentence feeds both.
* **Cells**: two input nodes (the two previous cells' outputs), three intermediate nodes, each summing two
  edges from earlier nodes, each edge one op of :data:`OPS`; the cell's output is a softmax-weighted sum
  of its three intermediate nodes. Every cell has its own weights; all cells share one genotype (the
  official code shares the architecture parameters across cells).
* **Output**: for each depth ``l`` a head on ``tanh(Σ softmax(w) · mean-pooled states 0..l)``; the model's
  logits are those of its last cell, the lower ones are there for the probe distillation.

Where we filled a gap or deviated: convolutions are ReLU-Conv1d-LayerNorm (the official PyTorch code uses
BatchNorm, whose statistics depend on the batch and its padding; a per-token norm makes a padded batch
give exactly what one sentence alone gives, which the tests check), and every op keeps padding at zero.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

# The candidate ops of an edge (the official PyTorch names: std_conv_k, dil_conv_k, *_pool_3, skip, none).
OPS = (
    "conv3", "conv5", "conv7", "dil_conv3", "dil_conv5", "dil_conv7",
    "max_pool3", "avg_pool3", "identity", "zero",
)  # fmt: skip
PARAMETER_FREE = ("max_pool3", "avg_pool3", "identity")  # and zero, which derivation never keeps
INPUT_NODES, NODES = 2, 3  # per cell: the two previous cells' outputs; three intermediate nodes


def edge_index(node: int, source: int) -> int:
    """The edge from state ``source`` (0, 1: the inputs; 2.. the earlier nodes) into intermediate ``node``."""
    return sum(INPUT_NODES + n for n in range(node)) + source


EDGES = edge_index(NODES, 0)  # 2 + 3 + 4 = 9


def op_shape(name: str) -> tuple[int, int]:
    """(kernel, dilation) of a convolution or pooling op; (1, 1) for identity and zero."""
    if name.startswith("dil_conv"):
        return int(name.removeprefix("dil_conv")), 2
    for prefix in ("conv", "max_pool", "avg_pool"):
        if name.startswith(prefix):
            return int(name.removeprefix(prefix)), 1
    return 1, 1


class TokenNorm(nn.LayerNorm):
    """LayerNorm over channels at every token, for ``[batch, length, hidden]`` states; zero at padding."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * mask


class ConvOp(nn.Module):
    """ReLU, a same-length (dilated) 1-d convolution over the tokens, LayerNorm."""

    def __init__(self, hidden: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation)
        self.norm = TokenNorm(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Padding holds zeros, as the convolution's own zero padding: a padded batch gives each sentence
        # what it gets alone.
        return self.norm(self.conv(F.relu(x).transpose(1, 2)).transpose(1, 2), mask)


class PoolOp(nn.Module):
    """Max or mean over a window of 3 real tokens (padding never counted), then LayerNorm."""

    def __init__(self, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = TokenNorm(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            low = torch.finfo(x.dtype).min
            pooled = F.max_pool1d(x.masked_fill(mask == 0, low).transpose(1, 2), 3, 1, 1).transpose(1, 2)
            pooled = pooled.masked_fill(mask == 0, 0.0)  # padding's windows may hold no real token
        else:
            total = F.avg_pool1d((x * mask).transpose(1, 2), 3, 1, 1).transpose(1, 2)
            count = F.avg_pool1d(mask.transpose(1, 2), 3, 1, 1).transpose(1, 2)
            pooled = total / count.clamp_min(1e-6)
        return self.norm(pooled, mask)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * 0.0


def make_op(name: str, hidden: int) -> nn.Module:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; allowed: {', '.join(OPS)}")
    kernel, dilation = op_shape(name)
    if "conv" in name:
        return ConvOp(hidden, kernel, dilation)
    if "pool" in name:
        return PoolOp(hidden, name.removesuffix("_pool3"))
    return Identity() if name == "identity" else Zero()


def add_all(terms: list[torch.Tensor]) -> torch.Tensor:
    """The sum of a non-empty list, without a zero tensor to start from: in an ONNX export each zero start
    is a Shape, a ConstantOfShape and an Add, and at batch 1 the time is per node, not per FLOP."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def mix_nodes(weights: torch.Tensor, nodes: list[torch.Tensor]) -> torch.Tensor:
    """A cell's output: its intermediate nodes weighted by ``softmax(weights)``."""
    w = torch.softmax(weights, dim=0)
    return add_all([w[i] * node for i, node in enumerate(nodes)])


class AdaBertCell(nn.Module):
    """A derived cell: each intermediate node sums its two chosen edges (state, op)."""

    def __init__(self, hidden: int, links: list[list[list[Any]]]) -> None:
        super().__init__()
        self.links = [
            (node, int(source), str(op)) for node, edges in enumerate(links) for source, op in edges
        ]
        self.ops = nn.ModuleList(make_op(op, hidden) for _, _, op in self.links)
        self.node_weights = nn.Parameter(torch.zeros(NODES))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = [s0, s1]
        for node in range(NODES):
            links = zip(self.ops, self.links, strict=True)
            inflow = [op(states[src], mask) for op, (n, src, _) in links if n == node]
            states.append(add_all(inflow))
        return mix_nodes(self.node_weights, states[INPUT_NODES:])


class AdaBertEmbeddings(nn.Module):
    """The teacher's embedding layer, parameter names as BERT's (so its state dict loads as is)."""

    def __init__(self, config: AdaBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class AdaBertStem(nn.Module):
    """Teacher embeddings → projection to ``hidden_size`` → the first cell's two input nodes."""

    def __init__(self, config: AdaBertConfig) -> None:
        super().__init__()
        self.embeddings = AdaBertEmbeddings(config)
        self.projection = nn.Linear(config.embedding_size, config.hidden_size)
        self.norm = TokenNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.sentence_pairs = config.sentence_pairs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input node 0, input node 1, the whole input, mask ``[batch, length, 1]``)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = attention_mask.unsqueeze(-1).to(self.projection.weight.dtype)
        x = self.dropout(self.norm(self.projection(self.embeddings(input_ids, token_type_ids)), mask))
        if not self.sentence_pairs:
            return x, x, x, mask
        second = (token_type_ids.unsqueeze(-1) == 1).to(x.dtype)
        return x * (1 - second), x * second, x, mask


def mean_pool(state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (state * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class DepthHead(nn.Module):
    """The classifier of depth ``l``: ``tanh`` of a learned mix of the ``l + 1`` pooled states."""

    def __init__(self, states: int, hidden: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.state_weights = nn.Parameter(torch.zeros(states))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        w = torch.softmax(self.state_weights, dim=0)
        mixed = add_all([w[i] * p for i, p in enumerate(pooled)])
        return self.classifier(self.dropout(torch.tanh(mixed)))


def heads(config: AdaBertConfig, depth: int) -> nn.ModuleList:
    """One head per depth 1..``depth`` (``heads[l - 1]`` reads the states 0..l)."""
    return nn.ModuleList(
        DepthHead(level + 1, config.hidden_size, config.num_labels, config.hidden_dropout_prob)
        for level in range(1, depth + 1)
    )


class AdaBertConfig(PretrainedConfig):
    """The student's shape. ``genotype``: ``{"depth": K, "cell": [[[source, op], [source, op]] × 3]}``
    (the sources index the cell's states: 0, 1 the inputs, 2.. the earlier intermediate nodes)."""

    model_type = "adabert"

    def __init__(
        self,
        vocab_size: int = 30522,
        embedding_size: int = 768,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        hidden_size: int = 128,
        hidden_dropout_prob: float = 0.1,
        initializer_range: float = 0.02,
        sentence_pairs: bool = False,
        genotype: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.hidden_size = hidden_size
        self.hidden_dropout_prob = hidden_dropout_prob
        self.initializer_range = initializer_range
        self.sentence_pairs = sentence_pairs
        self.genotype = genotype or {"depth": 1, "cell": [[[0, "conv3"], [1, "conv3"]]] * NODES}


class AdaBertForSequenceClassification(PreTrainedModel):
    """The derived student: ``genotype["depth"]`` cells of the genotype's cell."""

    config_class = AdaBertConfig
    config: AdaBertConfig
    base_model_prefix = "adabert"

    def __init__(self, config: AdaBertConfig) -> None:
        super().__init__(config)
        depth, links = int(config.genotype["depth"]), config.genotype["cell"]
        self.num_labels = config.num_labels
        self.stem = AdaBertStem(config)
        self.cells = nn.ModuleList(AdaBertCell(config.hidden_size, links) for _ in range(depth))
        self.heads = heads(config, depth)
        self.post_init()

    def layer_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The logits of every depth 1..K (the last is the model's output)."""
        s0, s1, x, mask = self.stem(input_ids, attention_mask, token_type_ids)
        pooled, out = [mean_pool(x, mask)], []
        for cell, head in zip(self.cells, self.heads, strict=True):
            s0, s1 = s1, cell(s0, s1, mask)
            pooled.append(mean_pool(s1, mask))
            out.append(head(pooled))
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        s0, s1, x, mask = self.stem(input_ids, attention_mask, token_type_ids)
        pooled = [mean_pool(x, mask)]
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, mask)
            pooled.append(mean_pool(s1, mask))
        logits = self.heads[-1](pooled)  # only the last depth's head runs at inference
        loss = None
        if labels is not None:
            loss = (
                F.mse_loss(logits.squeeze(-1), labels.float())
                if self.num_labels == 1
                else F.cross_entropy(logits, labels)
            )
        return SequenceClassifierOutput(loss=loss, logits=logits)
