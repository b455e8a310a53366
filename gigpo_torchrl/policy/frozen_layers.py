"""An update's frozen bottom layers, encoded once for the whole batch.

With ``--train_layers K`` every decoder layer below the top K, and the input embedding,
stays fixed for a whole update: the hidden state entering the lowest trained layer at a
token depends on the tokens up to it alone. Encoded with each mini-batch, those layers
were most of an update's time on a CPU (65 % of the main job's, measured), and a
mini-batch of rows drawn at random shares few prompts: the rows' prompts open alike
across a batch (the system prompt, a task's text, an episode's history), so over the
whole batch's token trie far fewer positions need encoding. :func:`encode_frozen`
(in :mod:`~gigpo_torchrl.policy.packing`) encodes the frozen layers once over the whole
batch, one state per trie node (:class:`FrozenStates`), and every mini-batch's packed
forward starts at the lowest trained layer from those states (:func:`run_layers`).

The numbers are the ones the whole forward computes, up to float rounding (the calls
differ in shape). Only decoders whose forward hands ``inputs_embeds`` to their first layer
unchanged are supported (:data:`SUPPORTED`): Gemma's, for one, scales it first.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from gigpo_torchrl.policy import weight_copies

# model types whose decoder forward feeds ``inputs_embeds`` to its first layer as it is
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def frozen_depth(model: torch.nn.Module) -> int:
    """How many of the decoder's bottom layers require no grad, counted only when the input
    embedding requires none either and some layer above them does (0 otherwise, and for a
    model type outside :data:`SUPPORTED`)."""
    if getattr(model.config, "model_type", None) not in SUPPORTED:
        return 0
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    embedding = decoder.get_input_embeddings()
    if layers is None or any(p.requires_grad for p in embedding.parameters()):
        return 0
    for depth, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return depth
    return 0  # nothing trained above them: nothing to start from


@dataclass
class FrozenStates:
    """The hidden states entering decoder layer ``depth`` at every node of a batch's token
    trie.

    Attributes:
        depth: the frozen layers below (all of them require no grad).
        index: ``(parent node, token) -> node``, the trie of the batch's rows (prompt, then
            reply; a root's parent is -1): a packed sequence's positions find their node
            through it (:func:`~gigpo_torchrl.policy.packing.pack_rows`'s ``index``).
        hidden: float ``[nodes, hidden size]``, row ``node``'s state, on the model's device.
        positions: the positions the frozen layers encoded (more than the nodes where the
            packed sequences, of bounded length, each encode an opening they share).
    """

    depth: int
    index: dict[tuple[int, int], int]
    hidden: Tensor
    positions: int


@contextmanager
def layer_range(decoder: torch.nn.Module, start: int, stop: int | None, final_norm: bool):
    """``decoder`` running only its layers ``[start:stop]`` (and its final norm only when
    ``final_norm``) inside the context, as it was after it, even on an error."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


_LAYER = re.compile(r"layers\.(\d+)\.(.*)")


def run_layers(
    model: torch.nn.Module,
    copies: weight_copies._Copies | None,
    start: int,
    stop: int | None,
    *,
    final_norm: bool,
    **inputs,
) -> Tensor:
    """``model``'s decoder over its layers ``[start:stop]`` only: ``last_hidden_state``
    ``[S, L, H]`` (before the final norm unless ``final_norm``). ``inputs`` are the
    decoder's (``input_ids`` when ``start`` is 0, else ``inputs_embeds``: the states
    entering layer ``start``); its frozen linear weights read ``copies``
    (:func:`~gigpo_torchrl.policy.weight_copies.copies`) where there are any."""
    decoder = model.get_decoder()
    tensors = {}
    for name, tensor in weight_copies.frozen_within(copies, model, decoder).items():
        match = _LAYER.fullmatch(name)
        if match is None:
            tensors[name] = tensor
        elif start <= int(match[1]) < (stop if stop is not None else len(decoder.layers)):
            tensors[f"layers.{int(match[1]) - start}.{match[2]}"] = tensor
    with layer_range(decoder, start, stop, final_norm):
        return weight_copies.call(decoder, tensors, **inputs).last_hidden_state
