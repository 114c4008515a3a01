"""The attention statistics the adapter computes for strategies equal eager attention's weights."""

from __future__ import annotations

import torch

from tests.conftest import model_spec


def test_received_attention_equals_eager_siglip_weights(plugins, frames):
    adapter = plugins.model("tiny").build(model_spec(attn_implementation="eager"))
    pixels = adapter.preprocess(frames[:2])
    layer = adapter._vision().encoder.layers[1]
    with torch.no_grad():
        h = adapter._vision().encoder.layers[0](adapter._vision().embeddings(pixels), None)
        _, weights = layer.self_attn(layer.layer_norm1(h))
        ours = adapter._received_attention(layer, h)
    torch.testing.assert_close(ours, weights.mean(dim=(1, 2)))


def test_last_token_attention_equals_eager_decoder_weights(plugins):
    adapter = plugins.model("tiny").build(model_spec(attn_implementation="eager"))
    lm = adapter.language_model
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (1, 23))
    with torch.no_grad():
        out = lm(input_ids=ids, output_attentions=True, output_hidden_states=True)
        h = out.hidden_states[2]  # input of layer 2
        pe = lm.rotary_emb(h, torch.arange(23)[None])
        ours = adapter._last_token_attention(lm.layers[2], h, pe)
    torch.testing.assert_close(ours, out.attentions[2][0, :, -1].mean(0))
