"""The attention statistics the adapter computes for strategies equal eager attention's weights."""

from __future__ import annotations

import torch

from tests.conftest import model_spec
from tokcomp.decoding import last_token_attention
from tokcomp.pipeline import vision_statistics
from tokcomp.state import EncoderState


def test_received_attention_equals_eager_siglip_weights(plugins, frames):
    adapter = plugins.model("tiny").build(model_spec(attn_implementation="eager"))
    video = adapter.preprocess(frames[:2])
    layer = adapter.vision.encoder.layers[1]
    with torch.no_grad():
        h = adapter.vision.encoder.layers[0](adapter.vision.embeddings(video.pixels), None)
        _, weights = layer.self_attn(layer.layer_norm1(h))
        state = EncoderState(layer=0, num_layers=adapter.info.vision_layers, hidden=h, grid=video.grid,
                             frame_sources=[[0], [1]])
        ours = vision_statistics(adapter, 1, state, {"attention"}, video)["attention"]
    torch.testing.assert_close(ours, weights.mean(dim=(1, 2)))


def test_last_token_attention_equals_eager_decoder_weights(plugins):
    adapter = plugins.model("tiny").build(model_spec(attn_implementation="eager"))
    lm = adapter.language_model
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (1, 23)).to(adapter.device)  # drawn on the CPU: the same ids on every device
    with torch.no_grad():
        out = lm(input_ids=ids, output_attentions=True, output_hidden_states=True)
        h = out.hidden_states[2]  # input of layer 2
        pe = lm.rotary_emb(h, torch.arange(23, device=h.device)[None])
        ours = last_token_attention(adapter, lm.layers[2], h, pe)
    torch.testing.assert_close(ours, out.attentions[2][0, :, -1].mean(0))
