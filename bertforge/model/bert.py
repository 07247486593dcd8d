"""BERT in plain PyTorch, built for pretraining speed.

- One fused QKV projection per layer; attention and dropout go through
  `bertforge.model.ops`, which picks the kernel for the tensor's device.
- Sparse MLM prediction: given the flat indices of the masked positions, the MLM head
  (transform + vocab decoder) runs on those rows only.
- The word embedding matrix has `config.padded_vocab_size` rows (a multiple of 64);
  whether the decoder multiplies by all of them is `ops.pad_decoder`'s choice.
- The MLM decoder is tied to the word embeddings by using the embedding Parameter itself,
  so the state_dict holds that tensor once.

The model knows nothing of training: no loss, optimizer, data or device code. Layer and
attribute names follow Hugging Face where that keeps bertforge.hf's key map readable.
Why this is fast: docs/performance.md#where-the-speed-comes-from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError
from bertforge.model import ops


class Dropout(nn.Dropout):
    """nn.Dropout through `ops.dropout` (same module, same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(x, self.p, self.training)


class BertEmbeddings(nn.Module):
    """Word + position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size  # the rows past it are padding
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        T = input_ids.shape[1]
        max_len = self.position_embeddings.num_embeddings
        if T > max_len:
            raise BertforgeError(
                f"sequence of {T} tokens is longer than max_position_embeddings={max_len}"
            )
        x = self.word_embeddings(input_ids)  # (B, T, H)
        # Positions are the same for every sequence: a (T, H) slice broadcasts over B.
        x = x + self.position_embeddings.weight[:T]
        if token_type_ids is None:
            # All segment 0: add one row instead of gathering B*T copies of it.
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(_to_autocast_dtype(self.LayerNorm(x)))


def _to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast is on (bf16): the residual stream then stays
    in it, so each layer's matmuls take it as it is instead of casting an fp32 copy, and
    the adds, dropouts and LayerNorms between them move half the bytes. CPU autocast keeps
    LayerNorm's output in its input's dtype; CUDA's returns fp32, so there the stream is
    fp32 again after each LayerNorm."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # Output columns are [q | k | v], each hidden_size wide: one matmul instead of three.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
        # mask: (B, 1, 1, T) bool, True = attend; None lets SDPA use its fastest kernel.
        dropout_p = self.dropout_p if self.training else 0.0
        y = ops.attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
        return self.out(y)


class BertLayer(nn.Module):
    """One post-LayerNorm encoder layer, as in the original BERT."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))  # (B, T, H)
        # BERT's "gelu" is the exact erf form, not the tanh approximation.
        h = F.gelu(self.ffn_in(x))  # (B, T, I)
        return self.ffn_norm(x + self.dropout(self.ffn_out(h)))  # (B, T, H)


class BertPooler(nn.Module):
    """dense + tanh on the first ([CLS]) token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(sequence_output[:, 0]))  # (B, H)


class BertModel(nn.Module):
    """The encoder: embeddings, `num_hidden_layers` layers and the pooler."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config)
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        pool: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sequence_output (B, T, H), pooled_output (B, H), or None when pool=False).

        attention_mask: (B, T), 1 for real tokens and 0 for padding, or None when
        every token is real (packed sequences), which is the fast path.
        """
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T), True = attend
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, mask)
        return x, (self.pooler(x) if pool else None)


class MaskedLMHead(nn.Module):
    """transform (dense -> gelu -> LayerNorm), then the decoder tied to the word embeddings.

    The head owns only the decoder's bias; the decoder weight is the embedding Parameter,
    passed in by the caller.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))
        self.vocab_size = config.vocab_size

    def forward(
        self, hidden: torch.Tensor, decoder_weight: torch.Tensor, padded: bool = False
    ) -> torch.Tensor:
        """Logits (..., vocab_size); with `padded`, (..., padded_vocab_size) where the
        kernels want the padded width (`ops.pad_decoder`), which the loss then masks."""
        h = self.LayerNorm(F.gelu(self.dense(hidden)))  # (..., H)
        v = self.vocab_size
        if padded and ops.pad_decoder(h):
            # Rows of a multiple of 64 values are aligned for the fast GEMM kernels (cuBLAS's
            # among them), and the weight's gradient comes out whole, zero in the padding rows.
            return F.linear(h, decoder_weight, self.bias)  # (..., Vp)
        if padded:  # the CPU's eager kernels: the real rows only, no padding to mask
            return F.linear(h, _LeadingRows.apply(decoder_weight, v), self.bias[:v])  # (..., V)
        return F.linear(h, decoder_weight, self.bias)[..., :v]  # (..., V)


class _LeadingRows(torch.autograd.Function):
    """w[:n], whose backward zeroes only the rows past n of the full-size gradient.

    A plain slice's backward zero-fills the whole (padded_vocab, H) fp32 buffer and then
    copies the gradient over it: one pass over the embedding-sized matrix too many, every
    step.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, n: int) -> torch.Tensor:
        ctx.full_shape = w.shape
        return w.narrow(0, 0, n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        full = grad.new_empty(ctx.full_shape)
        full[: grad.shape[0]] = grad
        full[grad.shape[0] :] = 0
        return full, None


class BertForPreTraining(nn.Module):
    """BERT with the MLM head (sparse or dense) and the next-sentence head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.mlm = MaskedLMHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)
        init_weights(self.mlm, config)  # self.bert initialised itself
        init_weights(self.seq_relationship, config)

    @property
    def decoder_weight(self) -> torch.Tensor:
        """The MLM decoder's weight: the word embedding matrix itself (tied)."""
        return self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        padded_vocab: bool = False,
        next_sentence: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mlm_logits, nsp_logits (B, 2), or None with next_sentence=False).

        masked_positions: None for logits at every position, (B, T, vocab_size); or a
        LongTensor (N,) of flat indices into the B*T positions, for logits at those
        positions only, (N, vocab_size), in the order given.
        padded_vocab: logits over all `padded_vocab_size` columns, contiguous (training's
        choice: the loss leaves the padding columns out, `ops.cross_entropy_and_hits`).
        next_sentence: False skips the pooler and the next-sentence head (plain MLM).
        """
        sequence_output, pooled = self.bert(
            input_ids, token_type_ids, attention_mask, pool=next_sentence
        )
        hidden = sequence_output  # (B, T, H)
        if masked_positions is not None:
            hidden = hidden.flatten(0, 1).index_select(0, masked_positions)  # (N, H)
        mlm_logits = self.mlm(hidden, self.decoder_weight, padded=padded_vocab)
        return mlm_logits, (self.seq_relationship(pooled) if next_sentence else None)


class BertForSequenceClassification(nn.Module):
    """BERT with dropout and a linear classifier on the pooled output."""

    def __init__(self, config: ModelConfig, num_labels: int) -> None:
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config)  # self.bert initialised itself

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)


@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
    std = config.initializer_range
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, MaskedLMHead):
            module.bias.zero_()


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters as a BERT with an unpadded vocab would count them (tied weights once).

    exclude_embeddings: leave out the embedding tables (word, position, token type).
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() yields each once
    for module in model.modules():
        if isinstance(module, BertEmbeddings):
            tables = (
                module.word_embeddings,
                module.position_embeddings,
                module.token_type_embeddings,
            )
            if exclude_embeddings:
                total -= sum(e.weight.numel() for e in tables)
            else:
                rows, width = module.word_embeddings.weight.shape
                total -= (rows - module.vocab_size) * width
        elif isinstance(module, MaskedLMHead):
            total -= module.bias.numel() - module.vocab_size
    return total
