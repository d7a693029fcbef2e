"""Learnable class prompts fed through open_clip's frozen text tower (PixelCLIP's class names).

The template is tokenised once with ``{}`` repeated ``prompt_length`` times; those placeholder
token positions then take each class's learnable vectors in token-embedding space, and the rest
of open_clip's ``encode_text`` runs as it is: positional embedding, causal transformer,
``ln_final``, pooling at the end-of-text token (the template's argmax id), ``text_projection``;
only the padding after the end-of-text token, which the causal mask keeps from it, is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

PLACEHOLDER = "{}"


def expand_template(template: str, prompt_length: int) -> str:
    """ "A photo of a {} in the scene" -> "A photo of a {} {} {} {} in the scene" (length 4)."""
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"prompt template {template!r}: expected exactly one {PLACEHOLDER!r}")
    return template.replace(PLACEHOLDER, " ".join([PLACEHOLDER] * prompt_length))


class PromptedTextEncoder(nn.Module):
    """K classes of ``prompt_length`` learnable token vectors -> (K, D) unit text embeddings.

    ``network`` is an open_clip CLIP whose text tower stays frozen; only :attr:`prompts` train.
    They start from the token embeddings of random vocabulary ids drawn with ``seed``.
    """

    def __init__(
        self,
        network: nn.Module,
        tokenizer: object,
        clusters: int,
        prompt_length: int,
        template: str,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.network = network
        tokens = tokenizer([expand_template(template, prompt_length)])[0]  # type: ignore[operator]
        placeholder_id = int(tokenizer([PLACEHOLDER])[0][1])  # type: ignore[operator]
        positions = torch.nonzero(tokens == placeholder_id).flatten()
        if len(positions) != prompt_length:
            raise ValueError(
                f"prompt template {template!r}: {PLACEHOLDER!r} must be its own token, found "
                f"{len(positions)} of {prompt_length} placeholder tokens"
            )
        # The causal mask lets no token after end-of-text reach it: the sequence stops there,
        # which gives open_clip's result at a fraction of the 77-token cost.
        length = int(tokens.argmax()) + 1
        self.register_buffer("template_tokens", tokens[None, :length], persistent=False)
        self.register_buffer("positions", positions, persistent=False)
        vocabulary = network.token_embedding.weight
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(vocabulary.shape[0], (clusters, prompt_length), generator=generator)
        self.prompts = nn.Parameter(vocabulary.detach()[ids.to(vocabulary.device)].clone())

    def forward(self) -> torch.Tensor:
        network = self.network
        cast_dtype = network.transformer.get_cast_dtype()
        clusters = self.prompts.shape[0]
        tokens = self.template_tokens.expand(clusters, -1)
        x = network.token_embedding(tokens).to(cast_dtype)
        x = x.index_copy(1, self.positions, self.prompts.to(cast_dtype))
        length = tokens.shape[1]
        x = x + network.positional_embedding[:length].to(cast_dtype)
        mask = network.attn_mask
        x = network.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
        x = network.ln_final(x)
        x = text_global_pool(
            x, tokens, network.text_pool_type, eos_token_id=getattr(network, "text_eos_id", None)
        )
        projection = network.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x.float(), dim=-1)
