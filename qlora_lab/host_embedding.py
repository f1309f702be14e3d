"""The input embedding table in host memory while training (train.embedding_on_host).

LoRA leaves the input embedding frozen, and a step reads only the rows of the tokens in its batch: on
Llama-3-8B the table is 0.98 GiB of GPU memory (128,256 x 4,096 in bf16) for 32 MiB of rows a step (2 x 2048
tokens). Here the table waits in pinned host memory from the start of training to its end; the collator looks
each batch's rows up on the host and the batch travels to the GPU as `inputs_embeds` (the model then skips its
embedding), copied with the rest of the batch. The GPU memory it frees pays for about two more layers left
uncheckpointed (train.uncheckpointed_layers) at the same peak. Evaluation during training takes the same path;
after training the table goes back to the GPU.

Written by hand: neither transformers nor accelerate keeps one module of a GPU model on the host with the
lookup done ahead of the step (accelerate's CPU offload moves the weight to the GPU for every call).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .config import ConfigError


class HostEmbedding(TrainerCallback):
    """Moves the table to the host when training begins and back when it ends; `collate` wraps a collator so
    that its batches carry their rows while the table is on the host."""

    def __init__(self, model):
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        blocker = (
            f"its input embedding is a {type(embedding).__name__}, not a plain torch Embedding"
            if type(embedding) is not torch.nn.Embedding or embedding.max_norm is not None
            else "the input embedding is trained (lora.target_modules or modules_to_save)"
            if embedding.weight.requires_grad
            else "the model ties its input embedding to the LM head, which needs the table on the GPU"
            if head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
            else None
        )
        if blocker:
            raise ConfigError(
                f"train.embedding_on_host=true cannot be used here: {blocker}; set it to false."
            )
        self.embedding = embedding
        self.device = None  # where the table lives outside training (set when training begins)
        self.table: torch.Tensor | None = None  # the host copy, while training

    def on_train_begin(self, args, state, control, **kwargs):
        weight = self.embedding.weight
        self.device = weight.device
        table = weight.data.to("cpu")
        # pinned: a batch's rows are copied into pinned memory too, and their copy to the GPU does not wait
        self.table = table.pin_memory() if torch.cuda.is_available() else table
        weight.data = self.table  # the GPU copy is freed: nothing else holds it

    def on_train_end(self, args, state, control, **kwargs):
        if self.table is not None:
            self.embedding.weight.data = self.table.to(self.device)
            self.table = None

    def rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The table's rows for `input_ids` (on the host), as the embedding module would return them."""
        table = self.table
        out = torch.empty(
            (*input_ids.shape, table.shape[1]), dtype=table.dtype, pin_memory=torch.cuda.is_available()
        )
        torch.index_select(table, 0, input_ids.reshape(-1), out=out.view(-1, table.shape[1]))
        return out

    def collate(self, collator):
        """`collator`, whose batches also carry `inputs_embeds` while the table is on the host (their
        `input_ids` stay: the Trainer counts tokens from them; LabTrainer drops them before the model)."""

        def collate(features):
            batch = collator(features)
            if self.table is not None:
                batch["inputs_embeds"] = self.rows(batch["input_ids"])
            return batch

        return collate
