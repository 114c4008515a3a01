"""Train the tiny LLaVA-OneVision on the synthetic video-QA set, so accuracy differences are real.

``tokcomp train-tiny --out DIR`` reproduces the checkpoint the ``tiny-synth`` preset ships: the tiny
architecture a little wider, trained from scratch on clips of ``tokcomp.synth`` generated on the fly
(fresh seeds every step, disjoint from the seeds ``tokcomp data synth`` is asked for in practice).

The forward pass is the adapter's own primitives in the pipeline's order (SigLIP layers on frames,
projector, bilinear 2x2 pooling, newline, the chat prompt around the video, contiguous positions), so
what is trained is what tokcomp runs. Training sees *compressed* inputs as well as full ones (random
frame subsets, adjacent frames averaged inside the encoder, random token subsets per frame, the grid
pooled): a model that only ever saw full-length inputs loses accuracy under any compression because
the sequence is shorter, not because information went missing, and would make every method look bad
for the wrong reason. Deterministic for a given seed, torch version and thread count.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.errors import ConfigError
from tokcomp.evaldata import LETTERS, mcq_prompt
from tokcomp.synth import OPTIONS, QUESTION_TYPES, QUESTIONS, generate_samples
from tokcomp.video import uniform_frame_indices

TEMPORAL = ("scenes", "direction", "order")
APPEARANCE = ("colour", "corner")


@dataclass
class TrainSettings:
    steps: int = 6000  # the bundled checkpoint (59 minutes on 2 cores)
    batch: int = 16  # clips per step, all of one question type (types in turn; they share a prompt length)
    # constant after the warm-up, so the checkpoint after k steps is that of --steps k; at 2e-3 and above
    # the model stalls at chance (probed: the corner question stuck at 25% after 100 steps at 3e-3,
    # 52% at 1e-3, 78% at 5e-4)
    lr: float = 5e-4
    warmup: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    frames: int = 16  # frames of each generated clip (as `tokcomp data synth` writes them)
    input_frames: int = 8  # frames the model reads, sampled uniformly (as tokcomp samples input.frames)
    size: int = 112
    full_share: float = 0.35  # steps on uncompressed inputs; the rest draw one compression at random
    # the first steps train one question type alone: a model that has learned to read one thing off the
    # clips learns the others; types interleaved from the start stayed at chance for 750 steps (probed)
    start_type: str = "corner"
    start_steps: int = 200
    compress_from: int = 1500  # steps before this one are all uncompressed (the model first learns to read clips)
    eval_every: int = 100
    eval_samples: int = 100  # held-out clips (seed below) for the progress line, 20 of each type


HELD_OUT_SEED = 987_654  # the progress line's held-out clips; training seeds are 10_000_000 + step


def untrained_adapter(seed: int) -> Any:
    """The ``tiny-synth`` architecture with seeded random weights, float32, as an adapter."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from tokcomp.models._hf import random_model
    from tokcomp.models.llava_onevision import LlavaOnevisionAdapter, synth_config
    from tokcomp.models.tiny_tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = random_model(LlavaOnevisionForConditionalGeneration, synth_config(tokenizer), torch.float32, "sdpa", seed)
    return LlavaOnevisionAdapter(model, tokenizer, "tiny-synth")


@dataclass
class Compression:
    """One training-time compression, the same for every clip of a step (equal sequence lengths)."""

    frames: int | None = None  # keep this many input frames, evenly spread (input frame sampling)
    merge_after: int | None = None  # average adjacent frame pairs after this vision layer (frame merging)
    keep: float | None = None  # keep this share of each frame's LLM tokens, a random subset in order
    pool: bool = False  # average-pool each frame's LLM grid 2x2 (4x4 -> 2x2)


def draw_compression(rng: random.Random, settings: TrainSettings, vision_layers: int, step: int) -> Compression:
    if step < settings.compress_from or rng.random() < settings.full_share:
        return Compression()
    kind = rng.choice(["frames", "merge", "keep", "pool", "merge+keep"])
    if kind == "frames":
        return Compression(frames=rng.choice([2, 3, 4, 6]))
    if kind == "merge":
        return Compression(merge_after=rng.randrange(vision_layers - 1))
    if kind == "keep":
        return Compression(keep=rng.uniform(0.15, 0.9))
    if kind == "pool":
        return Compression(pool=True)
    return Compression(merge_after=rng.randrange(vision_layers - 1), keep=rng.uniform(0.3, 0.9))


def prompt_ids(adapter: Any, kind: str) -> tuple[list[int], list[int]]:
    """The chat prompt's ids before and after the video for a question type, as ``tokcomp eval`` asks it."""
    from tokcomp.models.llava_onevision import chat_segments

    before, after = chat_segments(mcq_prompt(QUESTIONS[kind], OPTIONS[kind]))
    encode = adapter.tokenizer
    return (encode(before, add_special_tokens=False).input_ids, encode(after, add_special_tokens=False).input_ids)


def batch_logits(adapter: Any, clips: Tensor, kind: str, answers: Tensor, compression: Compression,
                 generator: torch.Generator, input_frames: int | None = None) -> Tensor:
    """Logits (B, 2, vocab) at the last prompt position and after the answer letter, for ``clips``
    uint8 (B, T, H, W, 3) of one question type, ``input_frames`` of them sampled uniformly (as
    ``tokcomp.video.read_video`` samples), under ``compression``."""
    if input_frames is not None and input_frames < clips.shape[1]:
        clips = clips[:, uniform_frame_indices(clips.shape[1], input_frames)]
    batch, frames = clips.shape[:2]
    if compression.frames is not None and compression.frames < frames:
        keep = torch.linspace(0, frames - 1, compression.frames).round().long()
        clips, frames = clips[:, keep], compression.frames
    video = adapter.preprocess(clips.flatten(0, 1))
    hidden = adapter.embed_video(video)
    for index in range(adapter.info.vision_layers):
        hidden = adapter.vision_layer(index, hidden, None, video)
        if compression.merge_after == index and frames % 2 == 0:
            hidden = hidden.view(batch, frames // 2, 2, *hidden.shape[1:]).mean(2).flatten(0, 1)
            frames //= 2
    out = adapter.vision_to_llm(hidden, video.grid, {}, video)
    grid = out.features  # (B*T, h, w, D)
    if compression.pool:
        grid = F.avg_pool2d(grid.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    tokens = grid.flatten(1, 2)  # (B*T, n, D)
    if compression.keep is not None:
        n = tokens.shape[1]
        kept = max(1, round(n * compression.keep))
        order = torch.rand(tokens.shape[0], n, generator=generator).argsort(1)[:, :kept].sort(1).values
        tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    visual = tokens.reshape(batch, -1, tokens.shape[-1])
    before, after = prompt_ids(adapter, kind)
    letters = torch.tensor([adapter.tokenizer.convert_tokens_to_ids(LETTERS[i]) for i in range(4)])
    ids_before = torch.tensor(before)[None].expand(batch, -1)
    ids_after = torch.cat([torch.tensor(after)[None].expand(batch, -1), letters[answers][:, None]], 1)
    embeds = torch.cat([adapter.embed_tokens(ids_before), visual, out.specials[None].expand(batch, -1, -1),
                        adapter.embed_tokens(ids_after)], 1)
    positions = torch.arange(embeds.shape[1])[None].expand(batch, -1)
    hidden = adapter.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    return adapter.model.lm_head(hidden[:, -2:])


def clip_batch(kind: str, count: int, seed: int, settings: TrainSettings) -> tuple[Tensor, Tensor]:
    """``count`` clips of one question type (answers balanced) and their answer indices."""
    samples = generate_samples(count, seed=seed, frames=settings.frames, size=settings.size, kinds=(kind,))
    clips = torch.stack([s.frames for s in samples])
    answers = torch.tensor([OPTIONS[kind].index(s.answer) for s in samples])
    return clips, answers


@torch.no_grad()
def held_out_accuracy(adapter: Any, held_out: dict[str, tuple[Tensor, Tensor]],
                      compression: Compression | None = None, input_frames: int | None = None) -> dict[str, float]:
    """Accuracy per question type: the arg-max letter at the answer position (what greedy decoding says)."""
    compression = compression or Compression()
    adapter.model.eval()
    generator = torch.Generator().manual_seed(0)
    letters = torch.tensor([adapter.tokenizer.convert_tokens_to_ids(LETTERS[i]) for i in range(4)])
    result = {}
    for kind, (clips, answers) in held_out.items():
        correct = 0
        for start in range(0, len(clips), 20):
            logits = batch_logits(adapter, clips[start:start + 20], kind, answers[start:start + 20], compression,
                                  generator, input_frames)[:, 0]
            predicted = logits.argmax(-1)
            correct += int((predicted == letters[answers[start:start + 20]]).sum())
        result[kind] = correct / len(clips)
    adapter.model.train()
    return result


def train(out: str | Path, settings: TrainSettings, log: Callable[[str], None] = print,
          snapshots: str | Path | None = None) -> dict[str, Any]:
    """Train from scratch and save the checkpoint (``save_pretrained``, float16 weights, tokenizer,
    ``training.json`` with the settings and held-out accuracy) to ``out``; with ``snapshots``, also
    the float32 model at every progress line there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    if settings.start_type not in QUESTION_TYPES:
        raise ConfigError(f"start_type {settings.start_type!r} is not a question type: {', '.join(QUESTION_TYPES)}")
    if settings.steps < 1 or settings.batch < 4:
        raise ConfigError(f"need --steps >= 1 and --batch >= 4, got {settings.steps} and {settings.batch}")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    adapter = untrained_adapter(settings.seed)
    model = adapter.model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / max(1, settings.warmup)))
    per_type = max(4, settings.eval_samples // len(QUESTION_TYPES))
    held_out = {kind: clip_batch(kind, per_type, HELD_OUT_SEED + i, settings) for i, kind in enumerate(QUESTION_TYPES)}
    eos = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    letters = torch.tensor([adapter.tokenizer.convert_tokens_to_ids(LETTERS[i]) for i in range(4)])
    started, losses, history = time.time(), [], []

    def kind_of(step: int) -> str:  # one question type per step: the start type, then every type in turn
        return settings.start_type if step < settings.start_steps else QUESTION_TYPES[step % len(QUESTION_TYPES)]

    def step_clips(step: int) -> tuple[Tensor, Tensor]:
        return clip_batch(kind_of(step), settings.batch, 10_000_000 + step, settings)

    pool = ThreadPoolExecutor(max_workers=1)  # the next step's clips are drawn while this one trains
    upcoming = pool.submit(step_clips, 0)
    for step in range(settings.steps):
        clips, answers = upcoming.result()
        if step + 1 < settings.steps:
            upcoming = pool.submit(step_clips, step + 1)
        kind = kind_of(step)
        compression = draw_compression(rng, settings, adapter.info.vision_layers, step)
        logits = batch_logits(adapter, clips, kind, answers, compression, generator, settings.input_frames)
        letter = letters[answers]  # the answer letter, then the end of the turn after it
        loss = F.cross_entropy(logits[:, 0], letter) + F.cross_entropy(logits[:, 1], torch.full_like(letter, eos))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            accuracy = held_out_accuracy(adapter, held_out, input_frames=settings.input_frames)
            recent = losses[-settings.eval_every:]
            history.append({"step": step + 1, "loss": sum(recent) / len(recent), **accuracy})
            log(f"step {step + 1}/{settings.steps} loss {history[-1]['loss']:.3f} "
                + " ".join(f"{k} {v:.0%}" for k, v in accuracy.items()) + f" ({time.time() - started:.0f} s)")
            if snapshots is not None:  # the run so far, reproducible with --steps step + 1
                snapshot = Path(snapshots) / f"step-{step + 1:05d}"
                model.save_pretrained(snapshot)
                adapter.tokenizer.save_pretrained(snapshot)
    pool.shutdown()
    return save_checkpoint(adapter, out, settings, history, time.time() - started)


def save_checkpoint(adapter: Any, out: str | Path, settings: TrainSettings, history: list[dict],
                    seconds: float) -> dict[str, Any]:
    """The bundled form of a trained model: float16 weights, tokenizer, and ``training.json`` (settings,
    progress, held-out accuracy uncompressed and under three compressions at 25%)."""
    out = Path(out)
    adapter.model.eval()
    per_type = max(4, settings.eval_samples // len(QUESTION_TYPES))
    held_out = {kind: clip_batch(kind, per_type, HELD_OUT_SEED + i, settings) for i, kind in enumerate(QUESTION_TYPES)}
    final = {"uncompressed": held_out_accuracy(adapter, held_out, input_frames=settings.input_frames)}
    for name, compression in {"frames_25": Compression(frames=max(1, settings.input_frames // 4)),
                              "keep_25": Compression(keep=0.25), "pool_2x2": Compression(pool=True)}.items():
        final[name] = held_out_accuracy(adapter, held_out, compression, settings.input_frames)
    out.mkdir(parents=True, exist_ok=True)
    adapter.model.to(torch.float16).save_pretrained(out)
    adapter.tokenizer.save_pretrained(out)
    report = {"settings": asdict(settings), "held_out": final, "history": history, "seconds": round(seconds, 1),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
